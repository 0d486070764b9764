"""The PCAV-MAE model: shapes, masking, (un)patchify, positions, joint norms, EMA, parts, SDPA."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.model import PARTS, PCAVMAE, MomentumEncoder
from pcavmae_cli.engine.model.blocks import Attention, Block
from pcavmae_cli.engine.model.embed import audio_image, patchify, sincos_2d, unpatchify
from pcavmae_cli.engine.model.masking import random_masking, unshuffle
from pcavmae_cli.engine.schema import ModelConfig

TINY = ModelConfig(
    embed_dim=32, depth_modality=1, depth_joint=1, num_heads=2, mlp_ratio=2.0,
    decoder_dim=16, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=32,
    patch_size=16, audio_frames=1024, mel_bins=128, image_size=224,
    mask_ratio_audio=0.5, mask_ratio_video=0.75, proj_dim=8, momentum=0.9,
    norm_pix_loss=True, joint_norms="per_modality", layer_norm_eps=1e-6,
)  # fmt: skip
# Smaller inputs for speed: audio 2 x 8 = 16 tokens, video 3 x 3 = 9 tokens.
SMALL = dataclasses.replace(TINY, patch_size=4, audio_frames=32, mel_bins=8, image_size=12, depth_modality=2)


def inputs(cfg: ModelConfig, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    audio = torch.randn(batch, cfg.audio_frames, cfg.mel_bins, generator=g)
    frames = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    return audio, frames


def model(cfg: ModelConfig = SMALL, seed: int = 0) -> PCAVMAE:
    torch.manual_seed(seed)
    return PCAVMAE(cfg)


# ---------------------------------------------------------------- shapes


def test_output_shapes_at_the_paper_token_counts():
    out = model(TINY)(*inputs(TINY, batch=2))
    assert out.z_a.shape == out.z_v.shape == out.zd_a.shape == out.zd_v.shape == (2, 8)
    assert out.pred_a.shape == out.target_a.shape == (2, 512, 256)
    assert out.pred_v.shape == out.target_v.shape == (2, 196, 768)
    assert out.mask_a.shape == (2, 512) and out.mask_v.shape == (2, 196)
    assert out.mask_a.sum(1).tolist() == [256, 256]  # 50 % of audio tokens masked
    assert out.mask_v.sum(1).tolist() == [147, 147]  # 75 % of 196


def test_encoder_decoder_and_embed_shapes_small_inputs():
    m = model()
    audio, frames = inputs(SMALL)
    enc = m.forward_encoder(audio, frames, 0.5, 0.75)
    assert enc.tokens_a.shape == (3, 8, 32) and enc.tokens_v.shape == (3, 2, 32)  # int(16*.5), int(9*.25)
    assert enc.joint.shape == (3, 10, 32)
    assert enc.mask_a.shape == enc.ids_restore_a.shape == (3, 16)
    assert enc.mask_v.shape == enc.ids_restore_v.shape == (3, 9)
    dec = m.forward_decoder(enc)
    assert dec.pred_a.shape == (3, 16, 16) and dec.pred_v.shape == (3, 9, 48)
    assert dec.zd_a.shape == dec.zd_v.shape == (3, 8)
    emb = m.embed(audio, frames)
    assert emb.z_a.shape == emb.z_v.shape == (3, 8) and emb.joint.shape == (3, 32)


def test_without_pooling_the_decoder_projections_are_not_in_the_graph():
    """``pool_decoder=False`` (no L_PCPE this batch): zd_a, zd_v are None and the projections get
    no gradient at all (None, not zeros), the same reconstructions as with pooling."""
    m = model()
    audio, frames = inputs(SMALL)
    torch.manual_seed(0)
    pooled = m(audio, frames)
    torch.manual_seed(0)
    out = m(audio, frames, pool_decoder=False)
    assert out.zd_a is None and out.zd_v is None and torch.equal(out.pred_a, pooled.pred_a)
    (out.pred_a.sum() + out.pred_v.sum() + out.z_a.sum()).backward()
    projections = [*m.dproj_a.parameters(), *m.dproj_v.parameters()]
    assert projections and all(p.grad is None for p in projections)
    assert m.decoder.pred_a.weight.grad is not None


def test_mlp_projection_heads_and_bad_sizes():
    m = model(dataclasses.replace(SMALL, proj_hidden_dim=12))
    assert m.backbone.proj_a[0].out_features == 12 and m.dproj_v[-1].out_features == 8
    assert m(*inputs(SMALL)).zd_v.shape == (3, 8)
    with pytest.raises(UserError, match="num_heads"):
        PCAVMAE(dataclasses.replace(SMALL, num_heads=5))
    with pytest.raises(UserError, match="patch_size"):
        PCAVMAE(dataclasses.replace(SMALL, audio_frames=30))
    with pytest.raises(UserError, match="mask_ratio"):
        PCAVMAE(dataclasses.replace(SMALL, mask_ratio_video=1.0))


def test_decode_false_skips_the_decoder():
    m = model()
    out = m(*inputs(SMALL), decode=False)
    assert out.pred_a is None and out.zd_v is None and out.target_v is None
    (out.z_a.sum() + out.z_v.sum()).backward()
    assert all(p.grad is None for p in m.decoder.parameters())
    assert m.backbone.proj_a.weight.grad is not None


# ---------------------------------------------------------------- masking


@pytest.mark.parametrize("n, ratio", [(512, 0.5), (196, 0.75), (9, 0.75), (16, 0.0), (7, 0.3)])
def test_masking_keeps_the_configured_count_and_restores_order(n, ratio):
    torch.manual_seed(0)
    x = torch.randn(4, n, 5)
    kept, mask, ids_restore = random_masking(x, ratio)
    keep = int(n * (1 - ratio))
    assert kept.shape == (4, keep, 5)
    assert (mask.sum(1) == n - keep).all() and set(mask.unique().tolist()) <= {0.0, 1.0}
    token = torch.full((1, 1, 5), 99.0)
    full = unshuffle(kept, token, ids_restore)
    visible = mask == 0
    assert torch.equal(full[visible], x[visible])  # kept tokens land back at their own positions
    assert (full[~visible] == 99.0).all()
    # ids_restore is the inverse of the shuffle: kept tokens are x's tokens in shuffled order.
    ids_shuffle = ids_restore.argsort(1)
    assert torch.equal(kept, x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, 5)))


def test_masking_differs_between_samples_and_ratio_zero_keeps_all():
    torch.manual_seed(0)
    _, mask, _ = random_masking(torch.randn(8, 196, 4), 0.75)
    assert len({tuple(row.tolist()) for row in mask}) == 8
    x = torch.randn(2, 10, 4)
    kept, mask, ids_restore = random_masking(x, 0.0)
    assert kept.shape == x.shape and mask.sum() == 0
    assert torch.equal(unshuffle(kept, torch.zeros(1, 1, 4), ids_restore), x)


def test_masks_are_per_modality_and_independent_per_sample():
    out = model()(*inputs(SMALL, batch=6))
    assert (out.mask_a.sum(1) == 8).all() and (out.mask_v.sum(1) == 7).all()
    assert len({tuple(r.tolist()) for r in out.mask_v}) > 1


# ---------------------------------------------------------------- patches and positions


def test_patchify_unpatchify_are_inverse_both_modalities():
    audio, frames = inputs(TINY, batch=2)
    img_a = audio_image(audio)
    assert img_a.shape == (2, 1, 128, 1024)
    pa = patchify(img_a, 16)
    assert pa.shape == (2, 512, 256)
    assert torch.equal(unpatchify(pa, 16, (8, 64), 1), img_a)
    pv = patchify(frames, 16)
    assert pv.shape == (2, 196, 768)
    assert torch.equal(unpatchify(pv, 16, (14, 14), 3), frames)
    # Row-major over (frequency, time): token 64 starts at frequency bin 16, time frame 0.
    assert pa[0, 64, 0] == audio[0, 0, 16] and pa[0, 1, 0] == audio[0, 16, 0]
    assert torch.equal(pa[0, 1, :16], audio[0, 16:32, 0])  # first row of a patch: one bin, 16 frames
    # Within a patch: (row, column, channel), as MAE.
    assert torch.equal(pv[1, 15, :3], frames[1, :, 16, 16]) and pv[1, 0, 3] == frames[1, 0, 0, 1]


def test_patch_embedding_order_matches_patchify():
    m = model()
    audio, _ = inputs(SMALL, batch=1)
    emb = m.backbone.encoder_a.patch_embed
    tokens = emb(audio_image(audio))
    w = emb.proj.weight  # (D, 1, p, p): as a Linear over patchify's (row, column, channel) order
    expected = patchify(audio_image(audio), 4) @ w.permute(0, 2, 3, 1).reshape(32, -1).T + emb.proj.bias
    torch.testing.assert_close(tokens, expected)


def test_unmasked_token_stream_is_row_major():
    """Inference runs every token unmasked: the encoders' residual stream must be (B, N, D) in
    row-major memory, not the convolution's transposed view, whose layout every add kept and on
    which each LayerNorm and add ran several times slower."""
    m = model()
    audio, frames = inputs(SMALL)
    enc = m.backbone.encoder_a
    tokens = enc.embed(audio_image(audio))
    assert tokens.is_contiguous()
    assert enc(tokens).is_contiguous()
    assert m.backbone.encoder_v.embed(frames).is_contiguous()


def test_sincos_positions_fixed_distinct_and_as_mae_lays_them_out():
    pe = sincos_2d(16, 3, 5)
    assert pe.shape == (15, 16) and pe.dtype == torch.float32
    assert torch.cdist(pe, pe).add(torch.eye(15) * 10).min() > 1e-3  # all rows distinct
    row, col, k = 2, 3, 1  # token 13; quarter widths of 4: sin(col), cos(col), sin(row), cos(row)
    w = 1 / 10000 ** (k / 4)
    expected = [math.sin(col * w), math.cos(col * w), math.sin(row * w), math.cos(row * w)]
    assert pe[row * 5 + col, [k, 4 + k, 8 + k, 12 + k]].tolist() == pytest.approx(expected, abs=1e-6)
    m = model()
    names = {n for n, _ in m.named_parameters()}
    for module, key in [(m.backbone.encoder_a, "pos_embed"), (m.decoder, "pos_embed_v")]:
        buf = getattr(module, key)
        assert not buf.requires_grad and all(not n.endswith(key) for n in names)
        assert not any(n.endswith(key) for n in m.state_dict())
    assert torch.equal(m.backbone.encoder_a.pos_embed[0], sincos_2d(32, 2, 8))
    assert torch.equal(m.decoder.pos_embed_v[0], sincos_2d(16, 3, 3))


# ---------------------------------------------------------------- embeddings and gradients


def test_embeddings_are_unit_norm():
    m = model()
    out = m(*inputs(SMALL))
    emb = m.embed(*inputs(SMALL))
    for z in (out.z_a, out.z_v, out.zd_a, out.zd_v, emb.z_a, emb.z_v):
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))


def test_gradient_reaches_every_parameter():
    m = model()
    out = m(*inputs(SMALL))
    g = torch.Generator().manual_seed(3)
    outputs = (out.z_a, out.z_v, out.zd_a, out.zd_v, out.pred_a, out.pred_v)
    total = sum((t * torch.randn(t.shape, generator=g)).sum() for t in outputs)
    total.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_norm_pix_targets():
    audio, frames = inputs(SMALL)
    t_a, t_v = model().targets(audio, frames)
    torch.testing.assert_close(t_v.mean(-1), torch.zeros(3, 9), atol=1e-5, rtol=0)
    raw_a, _ = model(dataclasses.replace(SMALL, norm_pix_loss=False)).targets(audio, frames)
    assert torch.equal(raw_a, patchify(audio_image(audio), 4))


# ---------------------------------------------------------------- joint layer norms


def encode(m: PCAVMAE):
    torch.manual_seed(7)  # the same masks every call
    enc = m.forward_encoder(*inputs(SMALL), 0.5, 0.75)
    return enc.joint, *m.clip_embeddings(enc.tokens_a, enc.tokens_v)


def test_joint_layer_has_distinct_norms_per_stream():
    m = model()
    blk = m.backbone.joint.blocks[0]
    assert set(blk.norm1) == set(blk.norm2) == set(m.backbone.joint.norm) == {"av", "a", "v"}
    assert len({id(n) for n in blk.norm1.values()}) == 3
    assert set(m.backbone.encoder_a.blocks[0].norm1) == {"x"}
    joint, z_a, z_v = encode(m)
    with torch.no_grad():
        blk.norm1["a"].weight.mul_(3).add_(0.5)
    joint2, z_a2, z_v2 = encode(m)
    assert not torch.allclose(z_a2, z_a) and torch.equal(z_v2, z_v) and torch.equal(joint2, joint)
    with torch.no_grad():
        m.backbone.joint.norm["av"].bias.add_(1.0)
    joint3, z_a3, z_v3 = encode(m)
    assert not torch.allclose(joint3, joint) and torch.equal(z_a3, z_a2) and torch.equal(z_v3, z_v)


def test_shared_joint_norms_route_every_stream_to_one_pair():
    m = model(dataclasses.replace(SMALL, joint_norms="shared"))
    blk = m.backbone.joint.blocks[0]
    assert set(blk.norm1) == set(m.backbone.joint.norm) == {"av"}
    joint, z_a, z_v = encode(m)
    with torch.no_grad():
        blk.norm2["av"].weight.mul_(2)
    joint2, z_a2, z_v2 = encode(m)
    assert not torch.allclose(joint2, joint) and not torch.allclose(z_a2, z_a) and not torch.allclose(z_v2, z_v)


# ---------------------------------------------------------------- attention


def test_attention_equals_manual_softmax():
    torch.manual_seed(0)
    attn = Attention(8, 2)
    x = torch.randn(2, 5, 8)
    q, k, v = (attn.qkv(x).reshape(2, 5, 3, 2, 4)[:, :, i].transpose(1, 2) for i in range(3))  # (B, nh, N, hd)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(4), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(attn(x), expected)
    blk = Block(8, 2, 16, 1e-6)
    y = x + blk.attn(blk.norm1["x"](x))
    torch.testing.assert_close(blk(x), y + blk.mlp(blk.norm2["x"](y)))


# ---------------------------------------------------------------- momentum encoder


def test_momentum_encoder_ema_math():
    m = model()
    ema = MomentumEncoder(m)
    assert all(not p.requires_grad for p in ema.parameters())
    assert not any(n.startswith("decoder") for n, _ in ema.named_parameters())
    torch.testing.assert_close(ema.embed(*inputs(SMALL)).z_a, m.embed(*inputs(SMALL)).z_a)
    old = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    ema.update(m, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(old, ema.parameters()))
    ema.update(m, 0.9)
    for o, new, got in zip(old, m.backbone.parameters(), ema.parameters()):
        torch.testing.assert_close(got, 0.9 * o + 0.1 * new)
    assert not torch.allclose(ema.embed(*inputs(SMALL)).z_v, m.embed(*inputs(SMALL)).z_v)


# ---------------------------------------------------------------- determinism, init, parts


def test_determinism_under_a_fixed_seed():
    a, b = model(seed=5), model(seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    torch.manual_seed(11)
    out_a = a(*inputs(SMALL))
    torch.manual_seed(11)
    out_b = b(*inputs(SMALL))
    for f in dataclasses.fields(out_a):
        assert torch.equal(getattr(out_a, f.name), getattr(out_b, f.name)), f.name
    out_c = b(*inputs(SMALL))  # the RNG moved on: new masks
    assert not torch.equal(out_c.mask_v, out_a.mask_v)
    assert not torch.equal(model(seed=6).decoder.pred_a.weight, a.decoder.pred_a.weight)


def test_initialisation_like_mae():
    m = model(TINY)
    blk = m.backbone.joint.blocks[0]
    for n in blk.norm1.values():
        assert torch.equal(n.weight, torch.ones(32)) and torch.equal(n.bias, torch.zeros(32))
    assert torch.equal(blk.attn.qkv.bias, torch.zeros(96))
    assert torch.equal(m.backbone.encoder_v.patch_embed.proj.bias, torch.zeros(32))
    w = m.backbone.encoder_v.patch_embed.proj.weight  # xavier over (fan_out=32, fan_in=768)
    assert w.abs().max() <= math.sqrt(6 / (32 + 768)) and w.std() > 0.5 * math.sqrt(2 / (32 + 768))
    for p in (m.decoder.mask_token, m.backbone.encoder_a.modality):
        assert 0.01 < p.std() < 0.04


def test_parts_cover_every_parameter_exactly_once():
    m = model(dataclasses.replace(SMALL, proj_hidden_dim=6))
    parts = m.parts()
    assert list(parts) == list(PARTS) and all(parts.values())
    ids = [id(p) for params in parts.values() for p in params]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in m.parameters() if p.requires_grad}
    assert {id(p) for p in parts["decoder"]} == {id(p) for p in m.decoder.parameters()}
    m.set_trainable([part for part in PARTS if part not in ("decoder", "dproj")])  # stage 2
    assert not any(p.requires_grad for p in m.decoder.parameters()) and m.backbone.joint.norm["a"].weight.requires_grad
    with pytest.raises(UserError, match="unknown model part"):
        m.set_trainable(["encoders"])


def test_decoder_embeddings_pool_only_the_masked_tokens():
    m = model()
    torch.manual_seed(2)
    enc = m.forward_encoder(*inputs(SMALL), 0.5, 0.75)
    dec = m.forward_decoder(enc)
    _, _, h_a, h_v = m.decoder(enc.joint, enc.tokens_a.shape[1], enc.ids_restore_a, enc.ids_restore_v)
    for i in range(3):
        pooled_a = h_a[i][enc.mask_a[i] == 1].mean(0)
        pooled_v = h_v[i][enc.mask_v[i] == 1].mean(0)
        torch.testing.assert_close(dec.zd_a[i], torch.nn.functional.normalize(m.dproj_a(pooled_a), dim=-1))
        torch.testing.assert_close(dec.zd_v[i], torch.nn.functional.normalize(m.dproj_v(pooled_v), dim=-1))
