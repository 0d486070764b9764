"""`pcav convert cavmae`: a CAV-MAE checkpoint imported exactly, and strictly.

The checkpoints come from ``cavmae_reference``, a re-implementation of CAV-MAE's forward with
CAV-MAE's parameter names, random weights and tiny sizes; after import pcav's forward must give
the reference's numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pcavmae_cli.engine import config
from pcavmae_cli.engine.convert import convert_cavmae
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.evaluate.predict import backbone_features
from pcavmae_cli.engine.model import PCAVMAE, Classifier, load_pretrained
from pcavmae_cli.engine.tensor_io import load_tensors_only
from pcavmae_cli.engine.train import checkpoint as ckpt
from tests.cavmae_reference import CAVMAE, CAVMAEFT, checkpoint_state, randomise

SIZES = dict(dim=32, depth_mod=2, depth_joint=1, heads=4, mlp_ratio=4.0, p=16, mel=32, frames=64, image=32)
OVERRIDES = [
    "model.embed_dim=32", "model.depth_modality=2", "model.depth_joint=1", "model.num_heads=4",
    "model.mlp_ratio=4.0", "model.patch_size=16", "model.mel_bins=32", "model.audio_frames=64",
    "model.image_size=32", "model.decoder_dim=16", "model.decoder_depth=1", "model.decoder_heads=2",
    "model.decoder_mlp_dim=64", "model.proj_dim=32",
    "data.audio.fbank.num_mel_bins=32", "data.audio.fbank.target_frames=64", "data.video.crop_size=32",
]  # fmt: skip
ATOL = 2e-5


def reference_pretrain() -> CAVMAE:
    return randomise(CAVMAE(**SIZES, dec_dim=16, dec_depth=1, dec_heads=2), seed=1).eval()


def reference_finetune(classes: int = 5) -> CAVMAEFT:
    return randomise(CAVMAEFT(classes, **SIZES), seed=2).eval()


def inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(batch, 64, 32, generator=g), torch.randn(batch, 3, 32, 32, generator=g)


def save(tmp_path, state, name="cavmae.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def load_converted(folder, kind):
    cfg = config.load_recipe(str(folder / "config.yaml"))
    if kind == "pretrain":
        model = PCAVMAE(cfg.model)
    else:
        import safetensors.torch as st

        rows = st.load_file(str(folder / "model.safetensors"))["head.1.weight"].shape[0]
        model = Classifier(cfg.model, rows, cfg.finetune.mode)
    ckpt.load_module(folder / "model.safetensors", model, torch.device("cpu"))
    return model.eval(), cfg


@torch.no_grad()
def test_pretrain_import_reproduces_cavmae_forward(tmp_path):
    ref = reference_pretrain()
    result = convert_cavmae(save(tmp_path, checkpoint_state(ref)), tmp_path / "run", overrides=OVERRIDES)
    assert result.kind == "pretrain" and result.conversion.pos_embed == "fixed"
    assert result.conversion.decoder_pos_embed == "fixed"
    model, cfg = load_converted(result.checkpoint, "pretrain")
    assert cfg.model.projection_heads is False and cfg.model.decoder_pos_embed == "fixed"
    assert_same_pretrain_forward(ref, model)


def assert_same_pretrain_forward(ref: CAVMAE, model: PCAVMAE) -> None:
    """Masks, joint tokens, contrastive embeddings, reconstructions and unmasked features agree."""
    audio, frames = inputs()

    torch.manual_seed(3)
    x, mask_a, ids_a, mask_v, ids_v, ca, cv = ref.forward_encoder(audio, frames, 0.75, 0.75)
    torch.manual_seed(3)
    enc = model.forward_encoder(audio, frames, 0.75, 0.75)
    assert torch.equal(enc.mask_a, mask_a) and torch.equal(enc.ids_restore_v, ids_v)
    torch.testing.assert_close(enc.joint, x, atol=ATOL, rtol=0)
    # CAV-MAE's contrastive embeddings: mean-pooled norm_a / norm_v outputs, normalised.
    z_a, z_v = model.clip_embeddings(enc.tokens_a, enc.tokens_v)
    torch.testing.assert_close(z_a, F.normalize(ca.mean(dim=1), dim=-1), atol=ATOL, rtol=0)
    torch.testing.assert_close(z_v, F.normalize(cv.mean(dim=1), dim=-1), atol=ATOL, rtol=0)
    pred_a, pred_v = ref.forward_decoder(x, mask_a, ids_a, mask_v, ids_v)
    dec = model.forward_decoder(enc)
    torch.testing.assert_close(dec.pred_a, pred_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(dec.pred_v, pred_v, atol=ATOL, rtol=0)
    # Unmasked features (CAV-MAE's forward_feat) through pcav's feature code.
    fa, fv = ref.forward_feat(audio, frames)
    feats = backbone_features(model.backbone, audio, frames.unsqueeze(1))
    torch.testing.assert_close(feats["audio"], fa.mean(dim=1), atol=ATOL, rtol=0)
    torch.testing.assert_close(feats["video"], fv.mean(dim=1), atol=ATOL, rtol=0)


@torch.no_grad()
def test_learned_decoder_positions_are_imported_exactly(tmp_path):
    """A CAVMAE trained with tr_pos=True: every position table moved away from sin-cos."""
    ref = reference_pretrain()
    g = torch.Generator().manual_seed(5)
    for name in ("pos_embed_a", "pos_embed_v", "decoder_pos_embed_a", "decoder_pos_embed_v"):
        table = getattr(ref, name)
        table.add_(torch.randn(table.shape, generator=g) * 0.3)
    result = convert_cavmae(save(tmp_path, checkpoint_state(ref)), tmp_path / "run", overrides=OVERRIDES)
    conv = result.conversion
    assert (conv.pos_embed, conv.decoder_pos_embed) == ("learned", "learned")
    assert conv.mapped["decoder_pos_embed_v"] == "decoder.pos_embed_v" and "decoder_pos_embed_v" not in conv.dropped
    model, cfg = load_converted(result.checkpoint, "pretrain")
    assert cfg.model.decoder_pos_embed == "learned"
    assert torch.equal(model.decoder.pos_embed_a, ref.decoder_pos_embed_a)  # bit for bit
    assert torch.equal(model.decoder.pos_embed_v, ref.decoder_pos_embed_v)
    assert torch.equal(model.backbone.encoder_v.pos_embed, ref.pos_embed_v)
    assert_same_pretrain_forward(ref, model)
    # Only the decoder's tables trained: the encoders' stay fixed, the decoder's are kept.
    ref = reference_pretrain()
    ref.decoder_pos_embed_a.add_(0.5)
    ref.decoder_pos_embed_v.add_(0.5)
    path = save(tmp_path, checkpoint_state(ref), "dec.pth")
    conv = convert_cavmae(path, tmp_path / "dec", overrides=OVERRIDES).conversion
    assert (conv.pos_embed, conv.decoder_pos_embed) == ("fixed", "learned")
    model, _ = load_converted(tmp_path / "dec" / "checkpoints" / "last", "pretrain")
    assert_same_pretrain_forward(ref, model)


def test_a_learned_decoder_table_trains():
    from pcavmae_cli.engine.losses import reconstruction_loss
    from pcavmae_cli.engine.train.optim import build_optimizer

    cfg = config.load_recipe("cavmae_base", [*OVERRIDES, "model.decoder_pos_embed=learned"])
    torch.manual_seed(0)
    model = PCAVMAE(cfg.model)
    assert "decoder.pos_embed_a" in model.state_dict() and "decoder.pos_embed_a" in model.named_parts()["decoder"]
    before = model.decoder.pos_embed_a.detach().clone()
    optimizer = build_optimizer(model, cfg.optim, fused=False)
    out = model(*inputs(), pool_decoder=False)
    reconstruction_loss(out.pred_a, out.target_a, out.mask_a).backward()
    optimizer.step()
    assert not torch.equal(model.decoder.pos_embed_a.detach(), before)


@torch.no_grad()
@pytest.mark.parametrize("mode, cavmae_mode", [("av", "multimodal"), ("a", "audioonly"), ("v", "videoonly")])
def test_finetune_import_reproduces_cavmaeft_logits(tmp_path, mode, cavmae_mode):
    ref = reference_finetune()
    result = convert_cavmae(save(tmp_path, checkpoint_state(ref)), tmp_path / "run", mode=mode, overrides=OVERRIDES)
    assert result.kind == "finetune" and result.num_classes == 5
    assert result.conversion.pos_embed == "learned"  # CAVMAEFT trains its positions (tr_pos=True)
    model, _ = load_converted(result.checkpoint, "finetune")
    audio, frames = inputs()
    torch.testing.assert_close(model(audio, frames), ref(audio, frames, cavmae_mode), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_the_run_folder_records_cavmae_input_normalisation(tmp_path, kind):
    """CAV-MAE's dataloader feeds (fbank - mean) / std with its AudioSet/VGGSound statistics: the
    converted run says so even when the recipe asks for another scale, so evaluate and embed
    feed the model what it was trained on."""
    ref = reference_pretrain() if kind == "pretrain" else reference_finetune()
    recipe = tmp_path / "ast_scaled.yaml"
    base = "cavmae_base" if kind == "pretrain" else "finetune_cavmae"
    recipe.write_text(f"extends: {base}\ndata:\n  audio:\n    fbank: {{mean: -4.2, std: 4.0, std_scale: 2.0}}\n")
    for name, out in ((None, "default"), (str(recipe), "ast")):
        convert_cavmae(save(tmp_path, checkpoint_state(ref)), tmp_path / out, recipe=name, overrides=OVERRIDES)
        fbank = config.load_recipe(str(tmp_path / out / "config.yaml")).data.audio.fbank
        assert (fbank.mean, fbank.std, fbank.std_scale) == (-5.081, 4.4849, 1.0)


def test_every_source_key_is_mapped_or_dropped_with_a_reason(tmp_path):
    state = checkpoint_state(reference_pretrain())
    result = convert_cavmae(save(tmp_path, state), tmp_path / "run", overrides=OVERRIDES)
    record = json.loads((tmp_path / "run" / "conversion.json").read_text())
    source = {k.removeprefix("module.") for k in state}
    assert set(record["mapped"]) | set(record["dropped"]) == source
    assert not set(record["mapped"]) & set(record["dropped"])
    assert "blocks_a.0.norm1_a.weight" in record["dropped"] and "decoder_pos_embed_v" in record["dropped"]
    assert record["mapped"]["blocks_u.0.norm2_v.bias"] == "backbone.joint.blocks.0.norm2.v.bias"
    assert record["mapped"]["norm.weight"] == "backbone.joint.norm.av.weight"
    assert (result.checkpoint / "momentum.safetensors").is_file()


def test_an_extra_source_key_fails_naming_it(tmp_path):
    state = checkpoint_state(reference_pretrain())
    state["module.cls_token"] = torch.zeros(1, 1, 32)
    with pytest.raises(UserError, match="unexpected key 'module.cls_token'"):  # as the file spells it
        convert_cavmae(save(tmp_path, state), tmp_path / "run", overrides=OVERRIDES)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_missing_source_key_fails_naming_the_cavmae_key_and_the_target(tmp_path):
    state = checkpoint_state(reference_pretrain())
    del state["module.blocks_u.0.attn.qkv.weight"]
    named = r"no key 'module.blocks_u.0.attn.qkv.weight' for 'backbone.joint.blocks.0.attn.qkv.weight'"
    with pytest.raises(UserError, match=named):
        convert_cavmae(save(tmp_path, state), tmp_path / "run", overrides=OVERRIDES)
    finetune = {k.removeprefix("module."): v for k, v in checkpoint_state(reference_finetune()).items()}
    del finetune["blocks_a.1.norm2.bias"]  # no DataParallel prefix: none in the message either
    with pytest.raises(UserError, match=r"no key 'blocks_a.1.norm2.bias' for 'encoder_a.blocks.1.norm2.x.bias'"):
        convert_cavmae(save(tmp_path, finetune), tmp_path / "ft", overrides=OVERRIDES)


def test_a_shape_mismatch_fails_naming_the_key(tmp_path):
    state = checkpoint_state(reference_pretrain())
    with pytest.raises(UserError, match="shape"):
        convert_cavmae(save(tmp_path, state), tmp_path / "run", overrides=[*OVERRIDES, "model.mlp_ratio=2.0"])


def test_a_foreign_checkpoint_is_refused(tmp_path):
    with pytest.raises(UserError, match="not a CAV-MAE checkpoint"):
        convert_cavmae(save(tmp_path, {"module.encoder.weight": torch.zeros(2)}), tmp_path / "run", overrides=OVERRIDES)


class Payload:
    """An object whose unpickling runs code: it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_is_not_run_and_the_refusal_says_so_plainly(tmp_path):
    from tests.cli_helpers import pcav

    path, marker = tmp_path / "evil.pth", tmp_path / "code-ran"
    torch.save({"state_dict": checkpoint_state(reference_pretrain()), "extra": Payload(marker)}, path)
    with pytest.raises(UserError, match="holds pickled Python code") as err:
        convert_cavmae(path, tmp_path / "run", overrides=OVERRIDES)
    assert "\x1b" not in str(err.value) and "weights_only=False" not in str(err.value)
    result = pcav("convert", "cavmae", str(path), str(tmp_path / "run"), *OVERRIDES)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and str(path) in lines[0], result.stderr
    assert "pcav will not run it" in lines[0]
    assert "\x1b" not in result.stderr and "weights_only=False" not in result.stderr
    assert not marker.exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_every_torch_file_pcav_reads_refuses_pickled_code(tmp_path):
    """One loader (``tensor_io.load_tensors_only``) for a run's ``state.pt`` and ``.pt`` prototypes too."""
    from pcavmae_cli.engine.prototypes.step import load_prototypes

    marker = tmp_path / "code-ran"
    (tmp_path / "last").mkdir()
    torch.save({"train": {"step": 1}, "extra": Payload(marker)}, tmp_path / "last" / "state.pt")
    torch.save({"tensors": {}, "extra": Payload(marker)}, tmp_path / "prototypes-epoch0003.pt")
    with pytest.raises(UserError, match=r"state\.pt.*holds pickled Python code"):
        ckpt.load_state(tmp_path / "last")
    with pytest.raises(UserError, match=r"prototypes-epoch0003\.pt.*holds pickled Python code"):
        load_prototypes(tmp_path, 2)  # index 2: the file of epoch 3
    assert not marker.exists()


def test_a_damaged_torch_file_is_named_as_damaged_not_as_pickled_code(tmp_path):
    """Garbage and a cut file are not code: the message must not send the user hunting for it."""
    whole = tmp_path / "whole.pt"
    torch.save({"a": torch.ones(3)}, whole)
    (tmp_path / "cut.pt").write_bytes(whole.read_bytes()[:60])
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02" + b"not a torch file" * 8)
    for name in ("cut.pt", "garbage.pt"):
        with pytest.raises(UserError, match=rf"{name}: not a readable torch file of tensors") as err:
            load_tensors_only(tmp_path / name)
        assert "pickled" not in str(err.value) and "\x1b" not in str(err.value)


def test_converted_pretraining_initialises_cavmae_style_finetuning(tmp_path):
    result = convert_cavmae(save(tmp_path, checkpoint_state(reference_pretrain())), tmp_path / "run", overrides=OVERRIDES)
    cfg = config.load_recipe("finetune_cavmae", OVERRIDES)
    assert cfg.model.pos_embed == "learned"
    model = Classifier(cfg.model, 4, "av")
    report = load_pretrained(model, result.checkpoint / "model.safetensors")
    assert "encoder_a.blocks.1.mlp.fc2.weight" in report.loaded
    pcav, _ = load_converted(result.checkpoint, "pretrain")
    torch.testing.assert_close(model.encoder_a.pos_embed.detach(), pcav.backbone.encoder_a.pos_embed)


def test_convert_command_reports_and_fails_in_one_line(tmp_path):
    from tests.cli_helpers import pcav

    state = checkpoint_state(reference_pretrain())
    good = pcav("convert", "cavmae", str(save(tmp_path, state)), str(tmp_path / "run"), *OVERRIDES)
    assert good.returncode == 0, good.stderr
    assert "pre-training (CAVMAE)" in good.stdout and "dropped on purpose" in good.stdout
    del state["module.norm_v.bias"]
    bad = pcav("convert", "cavmae", str(save(tmp_path, state, "bad.pth")), str(tmp_path / "bad"), *OVERRIDES)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "'backbone.joint.norm.v.bias'" in bad.stderr


def test_without_projection_heads_the_contrastive_space_is_the_encoder_width():
    from pcavmae_cli.engine.model import check_config

    cfg = config.load_recipe("cavmae_base", OVERRIDES)
    check_config(cfg.model)
    model = PCAVMAE(cfg.model)
    assert not any(k.startswith(("backbone.proj_", "dproj_")) for k in model.state_dict())
    with pytest.raises(UserError, match="model.proj_dim must equal model.embed_dim"):
        check_config(config.load_recipe("cavmae_base", [*OVERRIDES, "model.proj_dim=16"]).model)


def test_an_imported_finetuned_model_predicts_a_video_with_given_labels(tmp_path):
    """The most asked question of CAV-MAE's users: its fine-tuned model on my own video."""
    import pcavmae_cli
    from pcavmae_cli.engine.data.manifest import LabelSet, write_label_csv
    from tests.conftest import make_mp4

    ref = reference_finetune(classes=5)
    result = convert_cavmae(save(tmp_path, checkpoint_state(ref)), tmp_path / "run", overrides=OVERRIDES)
    video = make_mp4(tmp_path / "mine.mp4", 4.0, size="64x48")
    model = pcavmae_cli.load(tmp_path / "run", device="cpu")
    with pytest.raises(UserError, match="--labels"):
        model.predict(video)
    labels = tmp_path / "labels.csv"
    write_label_csv(labels, LabelSet([f"/m/{k}" for k in range(5)], [f"sound {k}" for k in range(5)]))
    # fp32, as CAV-MAE's forward below (precision auto could choose bf16 on this CPU)
    model = pcavmae_cli.load(result.out, device="cpu", labels=labels, overrides=["train.precision=fp32"])
    assert model.precision == "fp32" and repr(model).endswith(", cpu, fp32)")
    pred = model.predict(video, top_k=3)
    assert [t.name for t in pred.top] == [model.labels[i] for i in np.argsort(-pred.scores)[:3]]
    clip = model.read_video(video)
    cfg = config.load_recipe(str(result.checkpoint / "config.yaml"))
    from pcavmae_cli.engine.data import fbank as fb
    from pcavmae_cli.engine.data import frames as fr

    audio = fb.normalise(clip.fbank, cfg.data.audio.fbank)[None]
    logits = torch.stack([ref(audio, fr.normalise(clip.frames[k], cfg.data.video)[None], "multimodal")[0]
                          for k in range(clip.frames.shape[0])])  # CAV-MAE's own forward, frame by frame
    probs = torch.sigmoid(logits) if cfg.data.label_mode == "multi_hot" else torch.softmax(logits, dim=-1)
    torch.testing.assert_close(torch.from_numpy(pred.scores), probs.mean(dim=0), atol=1e-4, rtol=0)
