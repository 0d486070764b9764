"""Which parameters take weight decay: weight matrices only, never embeddings or position tables."""

from __future__ import annotations

from pcavmae_cli.engine import config
from pcavmae_cli.engine.model import PCAVMAE
from pcavmae_cli.engine.train.optim import build_optimizer
from tests.test_pretrain import TINY

POSITION_TABLES = {"backbone.encoder_a.pos_embed", "backbone.encoder_v.pos_embed", "decoder.pos_embed_a", "decoder.pos_embed_v"}


def groups_of(pos: str):
    cfg = config.load_recipe("demo", [*TINY, f"model.pos_embed={pos}", f"model.decoder_pos_embed={pos}"])
    model = PCAVMAE(cfg.model)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, cfg.optim, fused=False)
    decayed, plain = ({names[id(p)] for p in g["params"]} for g in optimizer.param_groups)
    return model, decayed, plain


def test_learned_position_tables_are_trained_without_weight_decay():
    model, decayed, plain = groups_of("learned")
    assert POSITION_TABLES <= plain and not POSITION_TABLES & decayed
    assert "backbone.encoder_a.blocks.0.attn.qkv.weight" in decayed
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)


def test_fixed_position_tables_are_buffers_outside_the_optimiser():
    model, decayed, plain = groups_of("fixed")
    assert not POSITION_TABLES & (decayed | plain)
    assert POSITION_TABLES <= {n for n, _ in model.named_buffers()}
