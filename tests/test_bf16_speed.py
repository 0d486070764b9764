"""``precision: auto`` on a CPU: bf16 where this machine's bf16 products of the model's width are
fast (measured), fp32 elsewhere; the run header says why; a resumed run keeps its precision."""

from __future__ import annotations

import math

import pytest
import torch

from pcavmae_cli.engine import bf16_speed
from pcavmae_cli.engine.prototypes import kmeans
from pcavmae_cli.engine.train import runtime
from pcavmae_cli.engine.train.pretrain import pretrain
from pcavmae_cli.engine.train.runtime import Runtime, describe_precision, keep_started_precision, model_width
from pcavmae_cli.engine.train.stop import Interrupted
from tests.test_pretrain import corpus, recipe, stop_at, tensors_of  # noqa: F401

CPU = torch.device("cpu")
WIDE = (768, 3072)


def machine(monkeypatch, *, native: bool, speedup: float) -> list[tuple[int, int]]:
    """A CPU with or without bf16 instructions whose bf16 products run ``speedup`` x fp32's;
    returns the shapes the probe was asked for."""
    asked: list[tuple[int, int]] = []

    def probe(k: int, n: int) -> float:
        asked.append((k, n))
        return speedup

    monkeypatch.setattr(bf16_speed, "native_bf16", lambda: native)
    monkeypatch.setattr(bf16_speed, "cpu_bf16_speedup", probe)
    return asked


def test_the_probe_measures_a_ratio_once_per_shape_and_keeps_the_threads():
    threads = torch.get_num_threads()
    bf16_speed.cpu_bf16_speedup.cache_clear()
    first = bf16_speed.cpu_bf16_speedup(256, 1024)
    assert math.isfinite(first) and first > 0
    assert bf16_speed.cpu_bf16_speedup(256, 1024) == first  # cached: one answer per process
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize(
    ("native", "speedup", "width", "bf16"),
    [
        (True, 4.4, WIDE, True),  # an EPYC of family 26
        (True, 2.2, WIDE, True),  # family 25
        (True, 0.6, WIDE, False),  # a Xeon with AVX512-BF16 and no AMX
        (True, 1.4, WIDE, False),  # below MIN_SPEEDUP: the casts would eat it
        (False, 4.4, WIDE, False),  # emulated bf16: not even asked
        (True, 4.4, (64, 256), False),  # a narrow model: fp32 whatever the probe says
    ],
)
def test_auto_on_a_cpu_follows_the_measured_ratio(monkeypatch, native, speedup, width, bf16):
    asked = machine(monkeypatch, native=native, speedup=speedup)
    assert runtime.resolve_precision("auto", CPU, width) == (torch.bfloat16 if bf16 else None)
    wide_enough = width[0] * width[1] >= bf16_speed.MIN_PRODUCT
    assert asked == ([width] if native and wide_enough else [])
    # explicit settings are never second-guessed
    assert runtime.resolve_precision("fp32", CPU, width) is None
    assert runtime.resolve_precision("bf16", CPU, width) == torch.bfloat16


def test_the_header_says_what_auto_chose_and_why(monkeypatch):
    machine(monkeypatch, native=True, speedup=4.4)
    assert describe_precision("auto", CPU, WIDE) == "bf16 (auto: bf16 products 4.4x fp32's here)"
    assert describe_precision("fp32", CPU, WIDE) == "fp32"
    assert describe_precision("auto", CPU, (64, 256)).startswith("fp32 (auto: ")
    machine(monkeypatch, native=True, speedup=0.6)
    assert describe_precision("auto", CPU, WIDE) == "fp32 (auto: bf16 products 0.6x fp32's here)"
    machine(monkeypatch, native=False, speedup=4.4)
    assert describe_precision("auto", CPU, WIDE) == "fp32 (auto: no bf16 instructions)"


def test_the_probed_width_is_the_models_mlp(corpus, tmp_path):  # noqa: F811
    cfg = recipe(corpus, tmp_path, "model.embed_dim=32", "model.mlp_ratio=3.0")
    assert model_width(cfg.model) == (32, 96)
    assert model_width(None) == WIDE


def test_kmeans_auto_probes_its_own_product(monkeypatch):
    asked = machine(monkeypatch, native=True, speedup=3.0)
    x = torch.nn.functional.normalize(torch.randn(2200, 128, generator=torch.Generator().manual_seed(0)), dim=1)
    start = x[:2100]  # 128 x 2100: wide enough to be probed
    auto = kmeans.spherical_kmeans(x, 2100, iters=2, seed=0, comm=None, init=start, precision="auto")
    assert asked == [(128, 2100)]
    fp32 = kmeans.spherical_kmeans(x, 2100, iters=2, seed=0, comm=None, init=start, precision="fp32")
    assert torch.equal(auto[1], fp32[1])  # the bf16 assignment is the fp32 one


def test_a_resumed_run_keeps_the_precision_it_started_in():
    rt = Runtime(CPU, None)
    message = keep_started_precision(rt, "auto", "bf16")
    assert rt.dtype == torch.bfloat16 and "resuming in bf16, as the run started (fp32 would be chosen here)" in message
    assert keep_started_precision(rt, "auto", "bf16") is None  # already so
    assert keep_started_precision(rt, "auto", None) is None and rt.dtype == torch.bfloat16  # an older checkpoint
    rt = Runtime(CPU, None)
    assert keep_started_precision(rt, "fp32", "bf16") is None and rt.dtype is None  # asked for: the recipe wins


def test_a_resumed_run_where_auto_answers_otherwise_equals_the_uninterrupted_one(corpus, tmp_path, monkeypatch):  # noqa: F811
    wide = ("model.embed_dim=64", "model.mlp_ratio=64.0")  # a product of 64 x 4096: probed
    machine(monkeypatch, native=True, speedup=3.0)
    whole = pretrain(recipe(corpus, tmp_path / "whole", *wide))
    assert whole.precision == "bf16"
    with pytest.raises(Interrupted):
        pretrain(recipe(corpus, tmp_path / "resumed", *wide), on_step=stop_at(5))
    machine(monkeypatch, native=True, speedup=0.6)  # now auto would choose fp32
    with pytest.warns(UserWarning, match="resuming in bf16, as the run started"):
        resumed = pretrain(recipe(corpus, tmp_path / "resumed", *wide, "train.resume=true"))
    assert resumed.resumed_from_step == 5 and resumed.precision == "bf16"
    mine, theirs = tensors_of(tmp_path / "resumed/checkpoints/last"), tensors_of(tmp_path / "whole/checkpoints/last")
    assert [k for k in mine if not torch.equal(mine[k], theirs[k])] == []


def test_ranks_run_bf16_only_if_every_rank_chose_it(monkeypatch):
    import dataclasses

    from pcavmae_cli.engine import config

    machine(monkeypatch, native=True, speedup=3.0)
    train = dataclasses.replace(config.load_recipe("demo").train, device="cpu", threads=torch.get_num_threads())
    paper = config.load_recipe("pretrain_audioset").model  # 768 x 3072: probed
    monkeypatch.setattr(runtime, "agree", lambda flag, device: flag)  # every rank as this one
    assert runtime.resolve_runtime(train, paper).dtype == torch.bfloat16
    monkeypatch.setattr(runtime, "agree", lambda flag, device: True)  # another rank chose fp32
    assert runtime.resolve_runtime(train, paper).dtype is None
