"""The pre-training loop: schedule, losses, stages, start-up checks, divergence, resume, checkpoints.

Runs use a tiny model (16-d, patch 4) on a small synthetic corpus written straight to disk (WAV +
JPEG frames, 32 x 8 fbank, 16 px frames), so a whole run takes a few seconds on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal

import numpy as np
import pytest
import safetensors.torch as st
import torch
import torch.nn.functional as F
from torchvision.io import write_jpeg

from pcavmae_cli.engine import config
from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.model import PCAVMAE, MomentumEncoder
from pcavmae_cli.engine.prototypes import Prototypes, load_prototypes
from pcavmae_cli.engine.schema import OptimConfig
from pcavmae_cli.engine.train import checkpoint as ckpt
from pcavmae_cli.engine.train import objective
from pcavmae_cli.engine.train.data import EpochBatchSampler, sample_seed
from pcavmae_cli.engine.train.metrics import LOSS_PARTS, Meter, read_metrics
from pcavmae_cli.engine.train.optim import build_optimizer
from pcavmae_cli.engine.train.pretrain import StepInfo, Trainer, TrainingDiverged, pretrain
from pcavmae_cli.engine.train.runtime import Runtime
from pcavmae_cli.engine.train.schedule import Schedule, lr_at
from pcavmae_cli.engine.train.stop import Interrupted
from tests.test_fbank import write_wav

N_CLIPS = 10  # batches of 2, 2 per optimiser step: 3 steps per epoch, the last one a single batch
TINY = [
    "data.audio.fbank.num_mel_bins=8", "data.audio.fbank.target_frames=32", "data.video.crop_size=16",
    "data.loader.batch_size=2", "data.loader.num_workers=0", "data.label_csv=null", "data.eval_manifest=null",
    "model.embed_dim=16", "model.depth_modality=1", "model.depth_joint=1", "model.num_heads=2",
    "model.mlp_ratio=2.0", "model.decoder_dim=8", "model.decoder_depth=1", "model.decoder_heads=2",
    "model.decoder_mlp_dim=16", "model.patch_size=4", "model.audio_frames=32", "model.mel_bins=8",
    "model.image_size=16", "model.proj_dim=8", "model.momentum=0.9",
    "prototypes.num_clusters=[2, 3]", "prototypes.warmup_epochs=1",
    "optim.effective_batch=4", "optim.warmup_epochs=1",
    "stages.0.epochs=2", "stages.1.epochs=1", "train.log_every=1", "train.device=cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """``N_CLIPS`` clips of 1 s, two classes (low tone + dark frames, high tone + bright frames)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(N_CLIPS):
        cls = i % 2
        folder = root / "clips" / f"c{i}"
        folder.mkdir(parents=True)
        for k in range(10):
            level = 60 + 120 * cls + 5 * k
            pixels = np.clip(level + rng.normal(0, 20, (3, 20, 20)), 0, 255).astype(np.uint8)
            write_jpeg(torch.from_numpy(pixels), str(folder / f"frame_{k}.jpg"), quality=95)
        t = np.arange(16000) / 16000
        tone = np.sin(2 * np.pi * (300 + 900 * cls + 20 * i) * t) + 0.1 * rng.normal(size=t.size)
        write_wav(folder / "audio.wav", (0.3 * 32767 * tone / np.abs(tone).max()).astype(np.int16))
        lines.append(json.dumps({"id": f"c{i}", "video": f"clips/c{i}", "audio": f"clips/c{i}/audio.wav",
                                 "labels": [], "duration": 1.0, "n_frames": 10}))  # fmt: skip
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def stop_at(step: int):
    """An ``on_step`` callback that presses Ctrl-C when the run reaches ``step``."""

    def press(info: StepInfo) -> None:
        if info.step == step:
            raise KeyboardInterrupt

    return press


def recipe(corpus, run_dir, *overrides):
    return config.load_recipe("demo", [*TINY, f"data.train_manifest={corpus}", f"train.run_dir={run_dir}", *overrides])


def tensors_of(folder):
    """Every tensor of a checkpoint: both weight files and the optimiser state."""
    out = {f"model.{k}": v for k, v in st.load_file(str(folder / "model.safetensors")).items()}
    out |= {f"momentum.{k}": v for k, v in st.load_file(str(folder / "momentum.safetensors")).items()}
    state = torch.load(folder / "state.pt", weights_only=True)
    for pid, slots in state["optimizer"]["state"].items():
        out |= {f"adam.{pid}.{k}": v for k, v in slots.items()}
    return out


# ---------------------------------------------------------------- schedule


def test_schedule_warmup_then_cosine_to_min_lr():
    # T = 50 steps, W = 10: lr * n / W while n <= W, then min + (lr - min)(1 + cos(pi (n - W) / 40)) / 2.
    sched = Schedule(steps_per_epoch=10, epochs=5, optim=OptimConfig(
        lr=1e-3, betas=[0.9, 0.95], weight_decay=0.05, effective_batch=8, warmup_epochs=1.0, min_lr=1e-5))  # fmt: skip
    assert (sched.total_steps, sched.warmup_steps) == (50, 10)
    assert sched.lr(0) == pytest.approx(1e-4)  # n = 1
    assert sched.lr(4) == pytest.approx(5e-4)
    assert sched.lr(9) == pytest.approx(1e-3)  # the end of warm-up is the peak
    assert sched.lr(10) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi / 40)) / 2)
    assert sched.lr(29) == pytest.approx((1e-3 + 1e-5) / 2)  # half way through the cosine
    assert sched.lr(49) == pytest.approx(1e-5)  # the last step is min_lr
    # Fractional warm-up epochs, and no warm-up at all.
    assert dataclasses.replace(sched, optim=dataclasses.replace(sched.optim, warmup_epochs=0.5)).warmup_steps == 5
    assert lr_at(0, total=4, warmup=0, peak=1.0, min_lr=0.0) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


# ---------------------------------------------------------------- objective


def tiny_model(corpus, tmp_path):
    cfg = recipe(corpus, tmp_path / "unused")
    torch.manual_seed(0)
    return cfg, PCAVMAE(cfg.model)


def fixed_batch(cfg, n=6):
    g = torch.Generator().manual_seed(3)
    m = cfg.model
    return {
        "fbank": torch.randn(n, m.audio_frames, m.mel_bins, generator=g),
        "frames": torch.randn(n, 3, m.image_size, m.image_size, generator=g),
        "index": torch.arange(n),
    }


def fixed_prototypes(cfg, n=6, k=3):
    g = torch.Generator().manual_seed(4)
    d = cfg.model.proj_dim
    unit = lambda: F.normalize(torch.randn(k, d, generator=g), dim=1)  # noqa: E731
    assignments = torch.arange(n) % k
    return [Prototypes(unit(), unit(), unit(), torch.full((k,), 0.1), assignments, torch.bincount(assignments))]


def test_a_few_steps_on_a_fixed_batch_lower_every_loss(corpus, tmp_path):
    cfg, model = tiny_model(corpus, tmp_path)
    batch, protos, loss = fixed_batch(cfg), fixed_prototypes(cfg), cfg.stages[0].loss
    rt = Runtime(torch.device("cpu"), None)
    opt = build_optimizer(model, dataclasses.replace(cfg.optim, lr=3e-3, weight_decay=0.0))

    def losses():
        torch.manual_seed(0)  # the same masks every time: a fixed batch
        total, logged = objective.batch_losses(model, batch, loss, protos, rt)
        return total, objective.loss_values(logged)

    _, before = losses()
    for _ in range(25):
        total, _ = losses()
        opt.zero_grad()
        total.backward()
        opt.step()
    _, after = losses()
    for part in ("pje", "pcpe", "infonce", "r", "total"):
        assert after[part] < 0.9 * before[part], (part, before[part], after[part])


def test_gradients_reach_the_stage_parts_only(corpus, tmp_path):
    cfg, model = tiny_model(corpus, tmp_path)
    batch, protos = fixed_batch(cfg), fixed_prototypes(cfg)
    rt = Runtime(torch.device("cpu"), None)
    opt = build_optimizer(model, cfg.optim)  # weight decay 0.05: frozen weights must not decay either
    parts = model.named_parts()
    for stage in cfg.stages:  # joint: everything, all losses; encoders: no decoder, L_PJE + InfoNCE
        model.set_trainable(stage.trainable)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        total, _ = objective.batch_losses(model, batch, stage.loss, protos, rt)
        total.backward()
        reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        trainable = {n for part in stage.trainable for n in parts[part]}
        frozen = set(before) - trainable
        assert not {n for n, p in model.named_parameters() if n in frozen and p.grad is not None}
        if stage.name == "joint":
            assert reached == trainable
        else:
            # Without the decoder the joint layer's audio+video stream (which only feeds the
            # decoder) affects no loss: its LayerNorms are the only trainable parameters left out.
            unreached = trainable - reached
            assert unreached and all(".av." in n for n in unreached)
            assert all(n.startswith("backbone.joint.") for n in unreached)
            assert reached == trainable - unreached
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n in frozen)
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in trainable)


def test_a_batch_of_one_clip_logs_no_infonce_and_the_means_skip_it(corpus, tmp_path):
    cfg, model = tiny_model(corpus, tmp_path)
    batch, protos = fixed_batch(cfg), fixed_prototypes(cfg)
    rt, loss = Runtime(torch.device("cpu"), None), cfg.stages[0].loss
    one = {k: v[:1] for k, v in batch.items()}
    total_one, logged_one = objective.batch_losses(model, one, loss, protos, rt)
    assert "infonce" not in logged_one and "r" in logged_one  # no negatives: nothing measured
    _, logged = objective.batch_losses(model, batch, loss, protos, rt)
    assert "infonce" in logged
    meter = Meter()
    meter.add({"infonce": 2.0, "r": 1.0}, 3)
    meter.add({"r": 4.0}, 1)  # the batch of one clip
    assert meter.means()["infonce"] == 2.0 and meter.means()["r"] == pytest.approx((3 * 1.0 + 4.0) / 4)
    again = Meter()
    again.load_state_dict({"sums": {"r": 7.0}, "samples": 4})  # a checkpoint from before per-part counts
    assert again.means()["r"] == pytest.approx(7.0 / 4)


# ---------------------------------------------------------------- start-up checks


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.audio_frames=64", "key 'model.audio_frames' (64) must equal 'data.audio.fbank.target_frames' (32)"),
        ("model.mel_bins=16", "key 'model.mel_bins' (16) must equal 'data.audio.fbank.num_mel_bins' (8)"),
        ("model.image_size=32", "key 'model.image_size' (32) must equal 'data.video.crop_size' (16)"),
        ("optim.effective_batch=3", "key 'optim.effective_batch' (3) must be a multiple of 'data.loader.batch_size' (2)"),
        ("prototypes=null", "key 'prototypes' is null, but stage 'joint' (stages.0.loss) has w_pje = 1.0"),
        ("data.train_manifest=null", "key 'data.train_manifest' is not set"),
        ("train=null", "pre-training needs the recipe section 'train'"),
        ("model=null", "pre-training needs the recipe section 'model'"),
        ("optim=null", "pre-training needs the recipe section 'optim'"),
        ("stages=null", "pre-training needs the recipe section 'stages'"),
        ("prototypes.num_clusters=[4, 11]", "key 'prototypes.num_clusters' asks for 11 clusters but 'data.train_manifest' has 10 clips"),
        ("train.resume=true", "key 'train.resume' is true but"),
        ("stages.1.trainable=[]", "key 'stages.1.trainable' must name at least one model part"),
        ("train.log_every=0", "key 'train.log_every' must be >= 1"),
    ],
)  # fmt: skip
def test_startup_checks_name_the_key_before_any_work(corpus, tmp_path, override, message):
    run_dir = tmp_path / "run"
    cfg = config.load_recipe("demo", [*TINY, f"data.train_manifest={corpus}", f"train.run_dir={run_dir}", override])
    with pytest.raises(UserError) as err:
        pretrain(cfg)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert not run_dir.exists()


def test_prototypes_may_be_null_when_no_stage_uses_them(corpus, tmp_path):
    no_protos = ["prototypes=null", "train.max_steps_per_epoch=1", "stages.1.epochs=1",
                 *(f"stages.{i}.loss.{w}=0" for i in (0, 1) for w in ("w_pje", "w_pcpe"))]  # fmt: skip
    result = pretrain(recipe(corpus, tmp_path / "run", *no_protos))
    assert [e["loss_pje"] for e in result.epochs] == [None, None, None]
    assert result.steps == 3 and not (tmp_path / "run" / "prototypes").exists()


def test_a_run_folder_is_not_overwritten_without_resume(corpus, tmp_path):
    cfg = recipe(corpus, tmp_path / "run", "stages.0.epochs=1", "stages.1.epochs=1", "train.max_steps_per_epoch=1")
    pretrain(cfg)
    with pytest.raises(UserError, match="already holds a run .* set train.resume=true"):
        pretrain(cfg)


# ---------------------------------------------------------------- divergence


def poison_batch_6(monkeypatch):
    """L_r of the 6th batch (epoch 2's first: step 4) is NaN."""
    calls = {"n": 0}
    real = objective.reconstruction_loss

    def poisoned(pred, target, mask):  # audio then video of each batch; batch 6 opens epoch 1
        calls["n"] += 1
        value = real(pred, target, mask)
        return value * float("nan") if calls["n"] == 2 * 6 else value

    monkeypatch.setattr(objective, "reconstruction_loss", poisoned)
    # the memory estimate's dry forward passes (memory.py) would count as batches here
    monkeypatch.setattr(Trainer, "_estimate_step", lambda self, stage: None)


# log_every 1: read at step 4's step line; 100: at the end of epoch 2 (step 6), two steps later
@pytest.mark.parametrize("log_every", [1, 100])
def test_a_non_finite_loss_stops_naming_step_part_and_checkpoint(corpus, tmp_path, monkeypatch, log_every):
    poison_batch_6(monkeypatch)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as err:
        pretrain(recipe(corpus, run_dir, f"train.log_every={log_every}"))
    last = run_dir / "checkpoints" / "last"
    assert str(err.value) == (
        f"loss part 'r' is nan at step 4 (epoch 2, stage 'joint'); the run stopped, "
        f"the last good checkpoint is {last} (step 3)"
    )
    assert ckpt.load_state(last)["train"]["step"] == 3


def test_a_stop_with_an_unread_nan_raises_instead_of_saving(corpus, tmp_path, monkeypatch):
    """The losses are read at flush points; the one before writing ``last`` finds the NaN of step
    4 still pending when the run is stopped at step 5, and nothing is written over step 3's."""
    poison_batch_6(monkeypatch)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="loss part 'r' is nan at step 4 .*/checkpoints/last \\(step 3\\)"):
        pretrain(recipe(corpus, run_dir, "train.log_every=100"), on_step=stop_at(5))
    assert ckpt.load_state(run_dir / "checkpoints" / "last")["train"]["step"] == 3


# ---------------------------------------------------------------- resume and checkpoints


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted run: 3 epochs (2 joint + 1 encoders), prototypes from epoch 1, 9 steps."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = pretrain(recipe(corpus, run_dir))
    return run_dir, result


def test_the_run_folder_holds_config_metrics_checkpoints_prototypes(reference):
    run_dir, result = reference
    assert result.steps == 9 and len(result.epochs) == 3
    assert config.load_recipe(str(run_dir / "config.yaml")).model.embed_dim == 16
    lines = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in lines if r["kind"] == "step"] == list(range(1, 10))
    for line in lines:
        assert {f"loss_{p}" for p in LOSS_PARTS} <= set(line) and line["lr"] > 0 and line["samples_per_s"] > 0
    warmup, joint, encoders = result.epochs
    assert warmup["loss_pje"] is None and warmup["loss_pcpe"] is None and warmup["prototypes"] is False
    assert None not in (joint["loss_pje"], joint["loss_pcpe"], joint["loss_r"], joint["loss_infonce"])
    assert encoders["loss_r"] is None and encoders["loss_pcpe"] is None and encoders["loss_pje"] is not None
    assert joint["loss_r"] == pytest.approx(joint["loss_r_a"] + joint["loss_r_v"])
    assert joint["num_prototypes"] == [2, 3]
    assert all(e["peak_memory_gb"] > 0 for e in result.epochs)  # the process's peak (memory.py), on Linux
    assert sorted(p.name for p in (run_dir / "prototypes").iterdir()) == [
        "prototypes-epoch0002.safetensors", "prototypes-epoch0003.safetensors"]  # fmt: skip
    assert len(load_prototypes(run_dir / "prototypes", 1)[0].assignments) == N_CLIPS
    for name in ("last", "best"):
        assert sorted(p.name for p in (run_dir / "checkpoints" / name).iterdir()) == sorted(ckpt.FILES)
    state = torch.load(run_dir / "checkpoints/last/state.pt", weights_only=True)
    assert state["train"] == {"step": 9, "epoch": 3, "position": 0, "best_metric": state["train"]["best_metric"],
                              "best_epoch": 2, "best_regime": [1, 1], "best_by": "loss", "health": None}  # fmt: skip
    model = PCAVMAE(config.load_recipe(str(run_dir / "config.yaml")).model)
    ckpt.load_weights(run_dir / "checkpoints" / "last", model, MomentumEncoder(model), torch.device("cpu"))


def test_kill_and_resume_ends_with_exactly_the_same_weights(corpus, reference, tmp_path):
    ref_dir, ref = reference
    run_dir = tmp_path / "run"
    seen = []

    def stop_at_step_5(info: StepInfo) -> None:  # epoch 1 (prototypes on), after 4 of its 5 batches
        seen.append(info)
        if info.step == 5:
            raise KeyboardInterrupt

    # The interrupted and the resumed part load clips in 2 worker processes, the reference in none.
    workers = "data.loader.num_workers=2"
    with pytest.raises(Interrupted) as stop:
        pretrain(recipe(corpus, run_dir, workers), on_step=stop_at_step_5)
    assert (stop.value.step, stop.value.epoch) == (5, 1)
    saved = ckpt.load_state(run_dir / "checkpoints" / "last")["train"]
    assert (saved["step"], saved["epoch"], saved["position"]) == (5, 1, 4)
    assert seen[-1].losses["pje"] is not None

    result = pretrain(recipe(corpus, run_dir, workers, "train.resume=true"))
    assert result.resumed_from_step == 5 and result.steps == 9
    mine, theirs = tensors_of(run_dir / "checkpoints" / "last"), tensors_of(ref_dir / "checkpoints" / "last")
    assert mine.keys() == theirs.keys()
    different = [k for k in mine if not torch.equal(mine[k], theirs[k])]
    assert not different, different[:5]
    assert [e["loss_total"] for e in result.epochs] == [e["loss_total"] for e in ref.epochs]
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl", "step")]
    assert steps == list(range(1, 10))  # no step logged twice


def test_a_stop_between_step_lines_resumes_with_the_same_means(corpus, reference, tmp_path):
    """Step lines every 3 steps (an epoch): stopped at step 5, the checkpoint holds the running
    means up to it, read from the device before writing; the resumed run's lines are the
    uninterrupted ones."""
    ref_dir, ref = reference
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupted):
        pretrain(recipe(corpus, run_dir, "train.log_every=3"), on_step=stop_at(5))
    result = pretrain(recipe(corpus, run_dir, "train.log_every=3", "train.resume=true"))
    mine, theirs = tensors_of(run_dir / "checkpoints" / "last"), tensors_of(ref_dir / "checkpoints" / "last")
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    fields = [f"loss_{p}" for p in LOSS_PARTS]
    assert [[e[f] for f in fields] for e in result.epochs] == [[e[f] for f in fields] for e in ref.epochs]
    lines = read_metrics(run_dir / "metrics.jsonl", "step")
    assert [r["step"] for r in lines] == [3, 6, 9]
    assert [lines[1][f] for f in fields] == [result.epochs[1][f] for f in fields]  # step 6's window is epoch 1


def test_sigterm_stops_at_the_next_batch_with_a_checkpoint(corpus, tmp_path):
    def term_at_step_2(info: StepInfo) -> None:
        if info.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = recipe(corpus, tmp_path / "run", "stages.0.epochs=1", "stages.1.epochs=1")
    with pytest.raises(Interrupted) as stop:
        pretrain(cfg, on_step=term_at_step_2)
    assert stop.value.reason == "SIGTERM" and stop.value.step == 2
    assert ckpt.load_state(tmp_path / "run" / "checkpoints" / "last")["train"]["position"] == 4
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


def test_a_failed_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    model, other = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)
    save = lambda step: ckpt.save_checkpoint(  # noqa: E731
        tmp_path, "last", model=model, momentum=other, state={"step": step}, config_text="seed: 0\n")
    save(1)

    def crash(obj, fh, *args, **kwargs):  # a half-written state file, then the disk fills up
        fh.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError):
        save(2)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["last"]  # no temporary folder left behind
    assert torch.load(root / "last" / "state.pt", weights_only=True) == {"step": 1}
    # A crash between the two renames leaves the previous checkpoint as .last.old: still found.
    os.replace(root / "last", root / ".last.old")
    assert ckpt.find_checkpoint(tmp_path, "last") == root / ".last.old"
    save(3)
    assert sorted(p.name for p in root.iterdir()) == ["last"]
    assert ckpt.load_state(ckpt.find_checkpoint(tmp_path, "last")) == {"step": 3}


# ---------------------------------------------------------------- data order


def test_epoch_order_and_sample_seeds_are_functions_of_seed_and_epoch(corpus, tmp_path):
    a, b = EpochBatchSampler(10, 3, seed=0), EpochBatchSampler(10, 3, seed=0)
    a.set_epoch(2)
    full = list(a)
    assert [len(x) for x in full] == [3, 3, 3, 1]
    assert sorted(i for batch in full for i, _ in batch) == list(range(10))
    b.set_epoch(2, start=2)
    assert list(b) == full[2:] and len(b) == 2
    a.set_epoch(3)
    assert list(a) != full  # another epoch, another order
    assert sample_seed(0, 2, 5) != sample_seed(0, 3, 5) != sample_seed(1, 2, 5)
    # The dataset draws the random training frame from the pair's seed, not the global RNG.
    cfg = recipe(corpus, tmp_path)
    data = AudioVisualDataset(corpus, cfg.data, frames="random")
    torch.manual_seed(1)
    first = data[(4, 123)]["frames"]
    torch.manual_seed(2)
    assert torch.equal(data[(4, 123)]["frames"], first)
