"""Fine-tuning and evaluation: strict loading, fresh head, frame averaging, mixup pairs, balanced
sampling, learning-rate groups, schedules, start-up checks, resume, and ``pcav evaluate``'s outputs.

Runs use the tiny model of tests/tiny_corpus.py on a synthetic labelled corpus written straight to
disk; a whole pre-training + fine-tuning run takes a second or two on a CPU.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import safetensors.torch as st
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from pcavmae_cli.engine import config
from pcavmae_cli.engine.data.frames import normalise as normalise_frames
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.evaluate.predict import backbone_features, clip_scores
from pcavmae_cli.engine.evaluate.runner import evaluate
from pcavmae_cli.engine.model import PCAVMAE, Classifier, load_pretrained
from pcavmae_cli.engine.model.classifier import PRETRAINED_DROPPED
from pcavmae_cli.engine.schema import OptimConfig
from pcavmae_cli.engine.train import augment
from pcavmae_cli.engine.train import checkpoint as ckpt
from pcavmae_cli.engine.train.data import EpochBatchSampler, balanced_weights
from pcavmae_cli.engine.train.finetune import FineTuner, finetune
from pcavmae_cli.engine.train.metrics import read_metrics
from pcavmae_cli.engine.train.optim import build_finetune_optimizer, set_lr
from pcavmae_cli.engine.progress import SilentReporter
from pcavmae_cli.engine.train.pretrain import TrainingDiverged, pretrain
from pcavmae_cli.engine.train.replicas import Replicas
from pcavmae_cli.engine.train.runtime import Runtime
from pcavmae_cli.engine.train.schedule import StepSchedule
from pcavmae_cli.engine.train.stop import Interrupted
from tests.test_pretrain import stop_at
from tests.tiny_corpus import TINY_FINETUNE, TINY_MODEL, write_corpus

CPU = Runtime(torch.device("cpu"), None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """3 classes: 12 training clips, 6 held-out clips, and a label CSV."""
    root = tmp_path_factory.mktemp("ft_corpus")
    return {"train": write_corpus(root, 3, 4, name="train"), "eval": write_corpus(root, 3, 2, seed=1, name="eval"),
            "labels": root / "labels.csv"}  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    """A tiny pre-training run (3 epochs, prototypes from epoch 1): its run folder."""
    run_dir = tmp_path_factory.mktemp("pre") / "run"
    cfg = config.load_recipe("demo", [
        *TINY_MODEL, f"data.train_manifest={corpus['train']}", f"train.run_dir={run_dir}", "data.label_csv=null",
        "prototypes.num_clusters=[2, 3]", "prototypes.warmup_epochs=1", "optim.effective_batch=4",
        "stages.0.epochs=2", "stages.1.epochs=1",
    ])  # fmt: skip
    pretrain(cfg)
    return run_dir


def ft_recipe(corpus, pretrained, run_dir, *overrides):
    return config.load_recipe("finetune_demo", [
        *TINY_FINETUNE, f"data.train_manifest={corpus['train']}", f"data.eval_manifest={corpus['eval']}",
        f"data.label_csv={corpus['labels']}", f"finetune.init_from={pretrained}", f"train.run_dir={run_dir}",
        "finetune.epochs=3", "finetune.eval_every_epochs=1", *overrides,
    ])  # fmt: skip


def tiny_model_cfg():
    return config.load_recipe("finetune_demo", TINY_FINETUNE).model


# ---------------------------------------------------------------- strict loading, fresh head


def test_pretrained_weights_load_strictly_and_the_head_starts_fresh(tmp_path):
    cfg = tiny_model_cfg()
    torch.manual_seed(0)
    source = PCAVMAE(cfg)
    path = tmp_path / "model.safetensors"
    st.save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))

    torch.manual_seed(1)
    model = Classifier(cfg, num_classes=5, mode="av")
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    report = load_pretrained(model, path)

    # Every encoder and joint-layer weight comes from the checkpoint, under its mapped name.
    own = {k for k in model.state_dict() if not k.startswith("head.")}
    assert set(report.loaded) == own
    theirs = source.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, theirs["backbone." + key]), key
    # The decoder and the projections are dropped on purpose, and listed.
    assert report.dropped == sorted(k for k in theirs if k.startswith(PRETRAINED_DROPPED))
    assert {k.split(".")[0] for k in report.dropped} == {"backbone", "decoder", "dproj_a", "dproj_v"}
    # The head is untouched by loading: CAV-MAE's fresh init (LayerNorm 1/0, zero bias).
    assert all(torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())
    norm, linear = model.head
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0) and torch.all(linear.bias == 0)
    assert linear.weight.shape == (5, cfg.embed_dim) and linear.weight.abs().sum() > 0


@pytest.mark.parametrize(
    "edit, message",
    [
        ("drop", "no weight for 'encoder_v.blocks.0.attn.qkv.weight'"),
        ("unexpected", "unexpected key 'backbone.extra.weight'"),
        ("no_place", "key 'joint.blocks.7.attn.qkv.weight' has no place in the fine-tuning model"),
        ("shape", "key 'encoder_a.blocks.0.mlp.fc1.bias' has shape (3,) in the checkpoint but (32,)"),
    ],
)
def test_a_missing_unexpected_or_misshapen_key_fails_naming_it(tmp_path, edit, message):
    cfg = tiny_model_cfg()
    state = {k: v.contiguous() for k, v in PCAVMAE(cfg).state_dict().items()}
    if edit == "drop":
        del state["backbone.encoder_v.blocks.0.attn.qkv.weight"]
    elif edit == "unexpected":
        state["backbone.extra.weight"] = torch.zeros(2)
    elif edit == "no_place":
        state["backbone.joint.blocks.7.attn.qkv.weight"] = torch.zeros(2)
    else:
        state["backbone.encoder_a.blocks.0.mlp.fc1.bias"] = torch.zeros(3)
    path = tmp_path / "model.safetensors"
    st.save_file(state, str(path))
    with pytest.raises(UserError) as err:
        load_pretrained(Classifier(cfg, 3, "av"), path)
    assert message in str(err.value) and str(path) in str(err.value)


# ---------------------------------------------------------------- frame averaging


DATA = config.load_recipe("demo", TINY_MODEL).data


def frame_levels(i: int, k: int) -> torch.Tensor:
    """Grey levels of clip i's K compact frames: frame k is 100 + 10 (i + 1) (k - 2)."""
    return torch.tensor([100 + 10 * (i + 1) * (j - 2) for j in range(k)], dtype=torch.uint8)


def frame_values(i: int, k: int) -> torch.Tensor:
    """(K,) the channel mean of clip i's normalised frames: what KnownFrameModel reads."""
    return normalise_frames(frame_levels(i, k).view(k, 1, 1, 1).expand(k, 3, 1, 1), DATA.video).mean(dim=(1, 2, 3))


class FramesDataset(Dataset):
    """Clip i has K compact (uint8) frames, frame k a flat grey of level ``frame_levels``."""

    def __init__(self, n: int = 4, k: int = 5):
        self.n, self.k = n, k

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        levels = frame_levels(i, self.k)
        return {"fbank": torch.zeros(6, 2), "frames": levels.view(self.k, 1, 1, 1).expand(self.k, 3, 2, 2).clone(),
                "label": torch.tensor(i % 3), "index": torch.tensor(i)}  # fmt: skip


class KnownFrameModel(torch.nn.Module):
    """Per-frame logits known in closed form: logit_c = (c + 1) x frame value - c."""

    def frame_logits(self, fbank, frames):  # (B, K, 3, S, S) -> (B, K, 3)
        v = frames.mean(dim=(2, 3, 4))  # (B, K)
        c = torch.arange(3.0)
        return v[..., None] * (c + 1) - c


@pytest.mark.parametrize("label_mode", ["multi_hot", "single"])
def test_clip_scores_average_the_probabilities_of_every_frame(label_mode):
    data = FramesDataset()
    loader = DataLoader(data, batch_size=3, shuffle=False)
    scores, targets = clip_scores(KnownFrameModel(), loader, label_mode, CPU, data=DATA)
    assert torch.equal(targets, torch.tensor([0, 1, 2, 0]))
    for i in range(len(data)):
        values = frame_values(i, data.k)
        logits = values[:, None] * (torch.arange(3.0) + 1) - torch.arange(3.0)  # (K, C)
        probs = torch.sigmoid(logits) if label_mode == "multi_hot" else torch.softmax(logits, dim=-1)
        assert torch.allclose(scores[i], probs.mean(dim=0), atol=1e-6)
        # Probabilities are averaged, not logits: the two differ for these frames.
        of_mean = torch.sigmoid(logits.mean(0)) if label_mode == "multi_hot" else torch.softmax(logits.mean(0), -1)
        assert not torch.allclose(scores[i], of_mean, atol=1e-4)


def test_one_frame_per_clip_is_scored_as_it_is():
    class MiddleOnly(FramesDataset):
        def __getitem__(self, i):
            sample = super().__getitem__(i)
            sample["frames"] = sample["frames"][2]  # (3, S, S): the "middle" policy's shape
            return sample

    scores, _ = clip_scores(KnownFrameModel(), DataLoader(MiddleOnly(), batch_size=2), "single", CPU, data=DATA)
    value = frame_values(0, 5)[2]  # frame 2 has level 100 in every clip
    expected = torch.softmax(value * (torch.arange(3.0) + 1) - torch.arange(3.0), -1)
    assert torch.allclose(scores, expected.expand(4, 3), atol=1e-6)


@pytest.mark.parametrize("mode", ["av", "a", "v", "sum"])
def test_classifier_frame_logits_equal_one_forward_per_frame(mode):
    cfg = tiny_model_cfg()
    torch.manual_seed(0)
    model = Classifier(cfg, 4, mode).eval()
    fbank, frames = torch.randn(2, 32, 8), torch.randn(2, 3, 3, 16, 16)
    with torch.no_grad():
        together = model.frame_logits(fbank, frames)
        apart = torch.stack([model(fbank, frames[:, k]) for k in range(3)], dim=1)
    assert together.shape == (2, 3, 4) and torch.allclose(together, apart, atol=1e-5)
    if mode == "a":  # frames do not matter to an audio-only model
        assert torch.allclose(together[:, 0], together[:, 2])


def test_backbone_features_of_one_frame_are_the_backbones_embeddings():
    backbone = PCAVMAE(tiny_model_cfg()).backbone.eval()
    fbank, frames = torch.randn(3, 32, 8), torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        mine, theirs = backbone_features(backbone, fbank, frames[:, None]), backbone.embed(fbank, frames)
    for name in ("z_a", "z_v", "joint"):
        assert torch.allclose(mine[name], getattr(theirs, name), atol=1e-5), name


# ---------------------------------------------------------------- augmentations and targets


def test_mixup_mixes_inputs_and_targets_with_the_same_partner_and_weight():
    B = 8
    fbank = torch.arange(B, dtype=torch.float32).view(B, 1, 1).expand(B, 4, 3).clone()  # clip i is all i
    frames = 10 * torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, 2, 2).clone()
    targets = torch.eye(B)  # clip i is class i
    torch.manual_seed(0)
    mixed = augment.mixup(fbank, frames, targets, prob=0.5, alpha=10.0)
    mixed_any = False
    for i in range(B):
        j, lam = int(mixed.partner[i]), float(mixed.lam[i])
        assert torch.allclose(mixed.fbank[i], torch.full((4, 3), lam * i + (1 - lam) * j))
        assert torch.allclose(mixed.frames[i], torch.full((3, 2, 2), 10 * (lam * i + (1 - lam) * j)))
        want = torch.zeros(B)
        want[i] += lam
        want[j] += 1 - lam
        assert torch.allclose(mixed.targets[i], want)
        if lam < 1 and j != i:
            mixed_any = True
            # The audio alone tells which clip was mixed in: the frame and label agree with it.
            recovered = (mixed.fbank[i, 0, 0] - lam * i) / (1 - lam)
            assert round(float(recovered)) == j and mixed.targets[i].argmin() != j
    assert mixed_any
    assert sorted(mixed.partner.tolist()) == list(range(B))  # one permutation of the batch
    assert ((mixed.lam > 0.2) & (mixed.lam <= 1)).all()  # Beta(10, 10) stays near 0.5


def test_mixup_probability_zero_and_one():
    x = torch.randn(6, 4, 3)
    none = augment.mixup(x, x, torch.eye(6), prob=0.0, alpha=10.0)
    assert torch.equal(none.fbank, x) and torch.all(none.lam == 1)
    every = augment.mixup(x, x, torch.eye(6), prob=1.0, alpha=10.0)
    assert torch.all(every.lam < 1)


def test_spec_augment_masks_one_band_per_axis():
    torch.manual_seed(0)
    x = torch.ones(16, 40, 12)
    out = augment.spec_augment(x, freq_mask=5, time_mask=9)
    for clip in out:
        zero_freq = (clip == 0).all(dim=0).nonzero().flatten()  # bins masked at every time
        zero_time = (clip == 0).all(dim=1).nonzero().flatten()
        for band, width in ((zero_freq, 5), (zero_time, 9)):
            assert len(band) < width
            if len(band):
                assert band.tolist() == list(range(int(band[0]), int(band[0]) + len(band)))  # contiguous
        masked = (clip == 0).sum()
        assert masked == len(zero_freq) * 40 + len(zero_time) * 12 - len(zero_freq) * len(zero_time)
    assert torch.equal(augment.spec_augment(x, 0, 0), x)


def test_fbank_noise_adds_at_most_a_tenth_and_rolls_in_time():
    torch.manual_seed(0)
    x = torch.arange(50.0).view(1, 50, 1).expand(4, 50, 3).clone()
    out = augment.fbank_noise(x)
    for clip in out:
        shift = -int(torch.round(clip[0, 0])) % 50  # rolled[0] = x[-shift]
        base = torch.roll(torch.arange(50.0), shift)[:, None]
        noise = clip - base
        assert (noise >= 0).all() and (noise < 0.1).all()


def test_label_smoothing_matches_torch_and_bce_targets():
    logits = torch.randn(5, 4)
    y = torch.tensor([0, 3, 1, 1, 2])
    soft = augment.smooth_targets(augment.one_hot_targets(y, "single", 4), 0.1)
    assert torch.allclose(soft.sum(1), torch.ones(5))
    assert torch.allclose(augment.classification_loss(logits, soft, "single"), F.cross_entropy(logits, y, label_smoothing=0.1))
    multi = augment.smooth_targets(torch.tensor([[1.0, 0, 1, 0]]), 0.1)
    assert torch.allclose(multi, torch.tensor([[0.925, 0.025, 0.925, 0.025]]))


# ---------------------------------------------------------------- sampling, optimiser, schedule


def test_balanced_weights_are_inverse_label_frequencies_summed_per_clip():
    multi = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float32)
    # counts (2, 2, 1): clip weights 1/2, 1/2 + 1/2, 1/2, 1/1
    assert torch.allclose(balanced_weights(multi, 3), torch.tensor([0.5, 1.0, 0.5, 1.0], dtype=torch.float64))
    single = torch.tensor([0, 0, 0, 1])
    assert torch.allclose(balanced_weights(single, 3), torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0], dtype=torch.float64))
    # The weighted sampler draws n clips with replacement, seeded per epoch: classes come out even.
    weights = balanced_weights(torch.tensor([0] * 9 + [1]), 2)
    sampler = EpochBatchSampler(10, 5, seed=0, weights=weights)
    drawn = []
    for epoch in range(200):
        sampler.set_epoch(epoch)
        drawn += [i for batch in sampler for i, _ in batch]
    share_rare = sum(i == 9 for i in drawn) / len(drawn)
    assert abs(share_rare - 0.5) < 0.03 and len(drawn) == 2000
    sampler.set_epoch(3)
    assert list(sampler) == list(sampler)


def test_head_lr_multiplier_and_layer_decay_set_the_group_rates():
    cfg = tiny_model_cfg()  # 1 modality block + 1 joint block: num_layers 2
    model = Classifier(cfg, 3, "av")
    optim = OptimConfig(lr=1e-3, betas=[0.9, 0.999], weight_decay=0.05, effective_batch=4, warmup_epochs=0, min_lr=0)
    plain = build_finetune_optimizer(model, optim, head_lr_multiplier=10.0, layer_decay=None)
    set_lr(plain, 2e-4)
    rate = {id(p): g["lr"] for g in plain.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert rate[id(p)] == pytest.approx(2e-3 if name.startswith("head.") else 2e-4), name
    assert sum(len(g["params"]) for g in plain.param_groups) == len(list(model.parameters()))

    decayed = build_finetune_optimizer(model, optim, head_lr_multiplier=10.0, layer_decay=0.5)
    set_lr(decayed, 1e-3)
    rate = {id(p): g["lr"] for g in decayed.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    expected = {
        "encoder_a.patch_embed.proj.weight": 1e-3 * 0.5**3,  # embeddings: layer 0
        "encoder_v.modality": 1e-3 * 0.5**3,
        "encoder_v.blocks.0.attn.qkv.weight": 1e-3 * 0.5**2,  # modality block 0: layer 1
        "joint.blocks.0.mlp.fc1.weight": 1e-3 * 0.5,  # joint block 0: layer 2
        "joint.norm.av.weight": 1e-3,  # the final norms: layer 3 = num_layers + 1
        "head.1.weight": 1e-2,
    }
    for name, lr in expected.items():
        assert rate[id(params[name])] == pytest.approx(lr), name
    decay = {id(p): g["weight_decay"] for g in decayed.param_groups for p in g["params"]}
    assert decay[id(params["head.1.weight"])] == 0.05 and decay[id(params["head.1.bias"])] == 0.0


def test_step_schedule_is_cavmae_multistep_after_warmup():
    optim = OptimConfig(lr=5e-5, betas=[0.95, 0.999], weight_decay=0, effective_batch=36, warmup_epochs=0, min_lr=0)
    sched = StepSchedule(steps_per_epoch=10, epochs=15, optim=optim, start_epoch=5, every_epochs=1, decay=0.5)
    per_epoch = [sched.lr(10 * e) for e in range(15)]
    assert per_epoch[:5] == [5e-5] * 5  # epochs 1..5 (1-based) at lr
    assert per_epoch[5] == pytest.approx(2.5e-5) and per_epoch[6] == pytest.approx(1.25e-5)
    assert per_epoch[14] == pytest.approx(5e-5 * 0.5**10)
    assert sched.lr(19) == sched.lr(10)  # constant within an epoch
    warm = StepSchedule(10, 15, OptimConfig(**{**optim.__dict__, "warmup_epochs": 1.0}), 5, 2, 0.5)
    assert warm.lr(0) == pytest.approx(5e-6) and warm.lr(9) == pytest.approx(5e-5)
    assert warm.lr(60) == pytest.approx(2.5e-5) and warm.lr(70) == pytest.approx(1.25e-5)  # every 2 epochs


# ---------------------------------------------------------------- the loop


@pytest.mark.parametrize(
    "override, message",
    [
        ("finetune=null", "fine-tuning needs the recipe section 'finetune'"),
        ("data.label_csv=null", "key 'data.label_csv' is not set"),
        ("finetune.mixup=1.5", "key 'finetune.mixup' is a probability, in [0, 1], got 1.5"),
        ("finetune.freq_mask=9", "key 'finetune.freq_mask' must lie in [0, model.mel_bins = 8], got 9"),
        ("finetune.lr_schedule=step", "key 'finetune.lr_schedule' is 'step', which needs 'finetune.step_start_epoch'"),
        ("finetune.average_from_epoch=4", "key 'finetune.average_from_epoch' must lie in [1, finetune.epochs = 3]"),
        ("finetune.init_from=/nonexistent", "key 'finetune.init_from': /nonexistent is neither"),
        ("model.layer_norm_eps=1e-5", "key 'model.layer_norm_eps' is 1e-05 in the recipe but 1e-06 in"),
        ("finetune.mode=both", "key 'finetune.mode' expects one of 'a', 'v', 'av', 'sum', got 'both'"),
    ],
)  # fmt: skip
def test_startup_checks_name_the_key_before_any_work(corpus, pretrained, tmp_path, override, message):
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as err:
        finetune(ft_recipe(corpus, pretrained, run_dir, override))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not run_dir.exists()


@pytest.fixture(scope="module")
def reference(corpus, pretrained, tmp_path_factory):
    """An uninterrupted run: 3 epochs x 3 steps, balanced sampling, averaging from epoch 2."""
    run_dir = tmp_path_factory.mktemp("ft_reference") / "run"
    cfg = ft_recipe(corpus, pretrained, run_dir, "finetune.balanced_sampling=true", "finetune.average_from_epoch=2")
    return run_dir, finetune(cfg)


def test_the_fine_tuning_run_folder(reference, pretrained):
    run_dir, result = reference
    assert sorted(p.name for p in run_dir.iterdir()) == ["README.md", "checkpoints", "config.yaml", "labels.csv",
                                                         "metrics.jsonl", "tensorboard"]  # fmt: skip
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["averaged", "best", "last"]
    last = run_dir / "checkpoints" / "last"
    assert {p.name for p in last.iterdir()} == {*ckpt.FINETUNE_FILES, "average.safetensors"}
    assert result.init is not None and result.init.path == pretrained / "checkpoints/last/model.safetensors"
    assert result.steps == 9 and result.metric == "top1"
    lines = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in lines if r["kind"] == "step"] == list(range(1, 10))
    epochs = [r for r in lines if r["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert all(0 <= e["val_top1"] <= 1 and e["val_top5"] == 1.0 and e["loss"] > 0 for e in epochs)
    assert all(e["peak_memory_gb"] > 0 for e in epochs)  # the process's peak (memory.py), on Linux
    assert result.averaged["averaged_epochs"] == [2, 3] and "val_top1" in result.averaged
    state = ckpt.load_state(last)
    assert state["train"]["averaged_epochs"] == 2 and state["train"]["epoch"] == 3
    best = max(e["val_top1"] for e in epochs)
    assert state["train"]["best_metric"] == best
    # The averaged checkpoint holds the mean of the weights at the end of epochs 2 and 3.
    summed = st.load_file(str(last / "average.safetensors"))
    averaged = st.load_file(str(run_dir / "checkpoints/averaged/model.safetensors"))
    assert all(torch.allclose(averaged[k], summed[k] / 2) for k in averaged)
    final = st.load_file(str(last / "model.safetensors"))
    assert any(not torch.equal(averaged[k], final[k]) for k in final)


def test_kill_and_resume_ends_with_exactly_the_same_weights(corpus, pretrained, reference, tmp_path):
    ref_dir, ref = reference
    run_dir = tmp_path / "run"
    extra = ["finetune.balanced_sampling=true", "finetune.average_from_epoch=2"]
    with pytest.raises(Interrupted) as stop:  # at step 5: epoch 1, mid-epoch, after mixup draws
        finetune(ft_recipe(corpus, pretrained, run_dir, *extra), on_step=stop_at(5))
    assert (stop.value.step, stop.value.epoch) == (5, 1)
    result = finetune(ft_recipe(corpus, pretrained, run_dir, *extra, "train.resume=true"))
    assert result.resumed_from_step == 5 and result.steps == 9
    for name in ("last", "averaged"):
        mine = st.load_file(str(run_dir / "checkpoints" / name / "model.safetensors"))
        theirs = st.load_file(str(ref_dir / "checkpoints" / name / "model.safetensors"))
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), name
    assert [e["loss"] for e in result.epochs] == [e["loss"] for e in ref.epochs]
    assert [e["val_top1"] for e in result.epochs] == [e["val_top1"] for e in ref.epochs]


@pytest.mark.parametrize("n, slice_clips", [(2, 8), (3, 8), (2, 2)])
def test_threads_give_the_classifiers_logits_and_gradients(n, slice_clips, monkeypatch):
    """Fine-tuning on threads (``Replicas.forward_rows``): each thread's rows of the batch, put
    back together, are the whole batch's logits, and the gradients collected from the threads the
    whole batch's, to rounding; the threads' own gradients are collected, not kept.
    ``slice_clips`` 2: each thread runs its rows in two slices, one after the other."""
    monkeypatch.setattr("pcavmae_cli.engine.train.replicas.SLICE_CLIPS", slice_clips)
    cfg = tiny_model_cfg()
    torch.manual_seed(0)
    model = Classifier(cfg, 4, "av").train()
    g = torch.Generator().manual_seed(2)
    fbank, frames = torch.randn(7, 32, 8, generator=g), torch.randn(7, 3, 16, 16, generator=g)
    targets = torch.rand(7, 4, generator=g)

    def gradients(replicas):
        model.zero_grad(set_to_none=True)
        if replicas is None:
            logits = model(fbank, frames)
        else:
            logits = replicas.forward_rows(7, CPU, lambda net, rows: net(fbank[rows], frames[rows]))
        F.binary_cross_entropy_with_logits(logits, targets).backward()
        if replicas is not None:
            replicas.backward()
            replicas.collect_grads()
        return logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    whole_logits, whole = gradients(None)
    replicas = Replicas(model, n, n)
    try:
        split_logits, split = gradients(replicas)
        again_logits, again = gradients(replicas)
    finally:
        replicas.close()
    assert torch.allclose(split_logits, whole_logits, atol=1e-6)
    assert split.keys() == whole.keys() and whole
    for name, grad in whole.items():
        assert torch.allclose(split[name], grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item()), name
        assert torch.equal(again[name], split[name]), name  # deterministic
    assert all(p.grad is None for c in replicas.copies for p in c.parameters())


def test_fine_tuning_on_threads_resumes_to_the_bit_and_matches_one_thread(corpus, pretrained, tmp_path):
    threads = ("train.threads=2", "train.replicas=2", "data.loader.batch_size=4")
    whole = finetune(ft_recipe(corpus, pretrained, tmp_path / "whole", *threads))
    with pytest.raises(Interrupted):
        finetune(ft_recipe(corpus, pretrained, tmp_path / "resumed", *threads), on_step=stop_at(4))
    resumed = finetune(ft_recipe(corpus, pretrained, tmp_path / "resumed", *threads, "train.resume=true"))
    assert resumed.resumed_from_step == 4 and resumed.steps == whole.steps
    mine = st.load_file(str(tmp_path / "resumed/checkpoints/last/model.safetensors"))
    theirs = st.load_file(str(tmp_path / "whole/checkpoints/last/model.safetensors"))
    assert [k for k in mine if not torch.equal(mine[k], theirs[k])] == []
    # against one thread on the whole batch: the same run to rounding
    single = finetune(ft_recipe(corpus, pretrained, tmp_path / "single", "train.threads=2", "train.replicas=1",
                                "data.loader.batch_size=4"))  # fmt: skip
    assert [e["loss"] for e in whole.epochs] == pytest.approx([e["loss"] for e in single.epochs], rel=1e-4)
    tuner = FineTuner(ft_recipe(corpus, pretrained, tmp_path / "probe", *threads), SilentReporter(), None)
    assert tuner.replicas is not None and tuner.replicas.n == 2  # the threads did run
    tuner.replicas.close()


def test_the_loop_trains_the_head_at_its_multiplier(corpus, pretrained, tmp_path):
    cfg = ft_recipe(corpus, pretrained, tmp_path / "run", "finetune.epochs=1", "finetune.head_lr_multiplier=7")
    tuner = FineTuner(cfg, SilentReporter(), None)
    tuner.run()
    lr = tuner.schedule.lr(tuner.state.step - 1)
    head = {id(p) for p in tuner.model.head.parameters()}
    for group in tuner.optimizer.param_groups:
        is_head = {id(p) in head for p in group["params"]}
        assert len(is_head) == 1
        assert group["lr"] == pytest.approx(lr * (7 if is_head.pop() else 1))


@pytest.mark.parametrize("log_every", [1, 100])
def test_a_non_finite_loss_stops_fine_tuning_naming_its_step(corpus, tmp_path, monkeypatch, log_every):
    """Batch 8 (step 4, epoch 1) is NaN; read at step 4's line or at the end of epoch 1."""
    calls = []
    real = augment.classification_loss

    def poisoned(logits, targets, label_mode):
        calls.append(1)
        return real(logits, targets, label_mode) * (float("nan") if len(calls) == 8 else 1.0)

    monkeypatch.setattr(augment, "classification_loss", poisoned)
    run_dir = tmp_path / "run"
    cfg = config.load_recipe("finetune_demo", [
        *TINY_FINETUNE, f"data.train_manifest={corpus['train']}", f"data.label_csv={corpus['labels']}",
        "data.eval_manifest=null", "finetune.init_from=null", f"train.run_dir={run_dir}", "finetune.epochs=2",
        f"train.log_every={log_every}",
    ])  # fmt: skip
    with pytest.raises(TrainingDiverged) as err:
        finetune(cfg)
    last = run_dir / "checkpoints" / "last"
    assert str(err.value) == (
        f"the fine-tuning loss is nan at step 4 (epoch 2); the run stopped, the last good checkpoint is {last} (step 3)"
    )
    assert ckpt.load_state(last)["train"]["step"] == 3


def test_random_init_fine_tuning_needs_no_checkpoint(corpus, tmp_path):
    cfg = config.load_recipe("finetune_demo", [
        *TINY_FINETUNE, f"data.train_manifest={corpus['train']}", f"data.label_csv={corpus['labels']}", "data.eval_manifest=null",
        "finetune.init_from=null", f"train.run_dir={tmp_path / 'run'}", "finetune.epochs=1", "finetune.mode=a",
    ])  # fmt: skip
    result = finetune(cfg)
    assert result.init is None and result.steps == 3 and result.best is None  # no eval manifest: no best
    assert result.epochs[0].get("val_top1") is None


# ---------------------------------------------------------------- evaluate


def test_evaluate_classification_writes_metrics_and_the_per_class_table(corpus, reference, tmp_path):
    run_dir, _ = reference
    out = tmp_path / "out"
    result = evaluate("classification", run_dir, corpus["eval"], out=out)
    assert result.checkpoint.folder == run_dir / "checkpoints" / "averaged"  # averaged, never best, by default
    record = json.loads((out / "metrics.json").read_text())
    assert record["frames"] == "all" and record["n_clips"] == 6 and record["label_mode"] == "single"
    assert record["metrics"]["top1"] == pytest.approx(result.metrics["top1"])
    rows = list(csv.DictReader((out / "per_class.csv").open()))
    assert [r["rank"] for r in rows] == ["1", "2", "3"] and {r["name"] for r in rows} == {"class 0", "class 1", "class 2"}
    accuracies = [float(r["accuracy"]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    assert sum(accuracies) / 3 == pytest.approx(record["metrics"]["top1"])  # 2 clips per class

    # The same numbers from the averaged model run here frame by frame: softmax per frame, mean
    # over the 10 frames, argmax per clip.
    from pcavmae_cli.engine.data.dataset import AudioVisualDataset
    from pcavmae_cli.engine.data.manifest import read_label_csv
    from pcavmae_cli.engine.evaluate.runner import checkpoint_recipe

    cfg = checkpoint_recipe(result.checkpoint.folder)
    labels = read_label_csv(corpus["labels"])
    model = Classifier(cfg.model, 3, "av").eval()
    ckpt.load_module(result.checkpoint.folder / "model.safetensors", model, torch.device("cpu"))
    data = AudioVisualDataset(corpus["eval"], cfg.data, frames="all", labels=labels)
    correct = torch.zeros(3)
    with torch.no_grad():
        for i in range(len(data)):
            sample = data[i]
            assert sample["frames"].shape[0] == 10
            logits = torch.stack([model(sample["fbank"][None], frame[None])[0] for frame in sample["frames"]])
            correct[int(sample["label"])] += int(torch.softmax(logits, dim=-1).mean(0).argmax() == sample["label"])
    assert record["metrics"]["top1"] == pytest.approx(float(correct.sum()) / 6)
    assert {r["name"]: float(r["accuracy"]) for r in rows} == {labels.names[c]: float(correct[c]) / 2 for c in range(3)}


def test_evaluate_refuses_the_wrong_kind_of_checkpoint(corpus, pretrained, reference):
    run_dir, _ = reference
    with pytest.raises(UserError, match="classification needs a fine-tuning checkpoint; .* is a pre-training"):
        evaluate("classification", pretrained, corpus["eval"])
    with pytest.raises(UserError, match="--task retrieval needs a pre-training checkpoint"):
        evaluate("retrieval", run_dir, corpus["eval"])
    with pytest.raises(UserError, match="predicts 3 classes but the label CSV lists 2"):
        two = corpus["labels"].parent / "two.csv"
        two.write_text("index,mid,display_name\n0,/t/c0,a\n1,/t/c1,b\n")
        evaluate("classification", run_dir, corpus["eval"], labels_csv=two)


def test_evaluate_frozen_features_and_the_random_init_baseline(corpus, pretrained, tmp_path):
    kw = dict(train_data=corpus["train"], labels_csv=corpus["labels"])
    probe = evaluate("linear-probe", pretrained, corpus["eval"], out=tmp_path / "lp", **kw)
    assert probe.record["n_train_clips"] == 12 and probe.record["features"] == "joint"
    assert (tmp_path / "lp" / "per_class.csv").is_file()
    near = evaluate("knn", pretrained, corpus["eval"], out=tmp_path / "knn", overrides=["evaluate.knn_k=3"], **kw)
    assert 0 <= near.metrics["top1"] <= 1
    fresh = evaluate("linear-probe", pretrained, corpus["eval"], random_init=True, out=tmp_path / "rand", **kw)
    assert fresh.record["random_init"] is True
    retrieval = evaluate("retrieval", pretrained, corpus["eval"], out=tmp_path / "ret")
    assert retrieval.metrics["n"] == 6 and set(retrieval.metrics) >= {"a2v_r1", "v2a_r10", "a2v_median_rank"}
    record = json.loads((tmp_path / "ret" / "metrics.json").read_text())
    assert record["frames"] == "middle" and not (tmp_path / "ret" / "per_class.csv").exists()
    assert all(v is None or math.isfinite(v) for v in record["metrics"].values())
