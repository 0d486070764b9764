"""`pcav convert cavmae`: a CAV-MAE checkpoint imported exactly, and strictly.

The checkpoints come from ``cavmae_reference``, a re-implementation of CAV-MAE's forward with
CAV-MAE's parameter names, random weights and tiny sizes; after import pcav's forward must give
the reference's numbers.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pcavmae_cli.engine import config
from pcavmae_cli.engine.convert import convert_cavmae
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.evaluate.predict import backbone_features
from pcavmae_cli.engine.model import PCAVMAE, Classifier, load_pretrained
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
    model, cfg = load_converted(result.checkpoint, "pretrain")
    assert cfg.model.projection_heads is False
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
@pytest.mark.parametrize("mode, cavmae_mode", [("av", "multimodal"), ("a", "audioonly"), ("v", "videoonly")])
def test_finetune_import_reproduces_cavmaeft_logits(tmp_path, mode, cavmae_mode):
    ref = reference_finetune()
    result = convert_cavmae(save(tmp_path, checkpoint_state(ref)), tmp_path / "run", mode=mode, overrides=OVERRIDES)
    assert result.kind == "finetune" and result.num_classes == 5
    assert result.conversion.pos_embed == "learned"  # CAVMAEFT trains its positions (tr_pos=True)
    model, _ = load_converted(result.checkpoint, "finetune")
    audio, frames = inputs()
    torch.testing.assert_close(model(audio, frames), ref(audio, frames, cavmae_mode), atol=ATOL, rtol=0)


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
    with pytest.raises(UserError, match="unexpected key 'cls_token'"):
        convert_cavmae(save(tmp_path, state), tmp_path / "run", overrides=OVERRIDES)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_missing_source_key_fails_naming_the_target(tmp_path):
    state = checkpoint_state(reference_pretrain())
    del state["module.blocks_u.0.attn.qkv.weight"]
    with pytest.raises(UserError, match="'backbone.joint.blocks.0.attn.qkv.weight'"):
        convert_cavmae(save(tmp_path, state), tmp_path / "run", overrides=OVERRIDES)


def test_a_shape_mismatch_fails_naming_the_key(tmp_path):
    state = checkpoint_state(reference_pretrain())
    with pytest.raises(UserError, match="shape"):
        convert_cavmae(save(tmp_path, state), tmp_path / "run", overrides=[*OVERRIDES, "model.mlp_ratio=2.0"])


def test_a_foreign_checkpoint_is_refused(tmp_path):
    with pytest.raises(UserError, match="not a CAV-MAE checkpoint"):
        convert_cavmae(save(tmp_path, {"module.encoder.weight": torch.zeros(2)}), tmp_path / "run", overrides=OVERRIDES)


def test_pickled_code_is_not_run(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": checkpoint_state(reference_pretrain()), "extra": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(UserError, match="weights-only"):
        convert_cavmae(path, tmp_path / "run", overrides=OVERRIDES)


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
