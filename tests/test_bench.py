"""``pcav bench`` and its engine: matmul peak, step FLOPs and rate, loader, E-step, Markdown."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pcavmae_cli.engine.bench import flops
from pcavmae_cli.engine.bench.kmeans import bench_kmeans, objective, unit_features
from pcavmae_cli.engine.bench.peak import matmul_peak
from pcavmae_cli.engine.bench.step import count_flops
from pcavmae_cli.engine.prototypes.kmeans import init_centroids
from pcavmae_cli.engine.prototypes.comm import Comm
from tests.cli_helpers import pcav
from tests.test_pretrain import TINY, corpus, recipe  # noqa: F401

CPU = torch.device("cpu")


def test_matmul_peak_is_a_positive_rate_for_both_dtypes():
    for dtype in (torch.float32, torch.bfloat16):
        rate = matmul_peak(dtype, CPU, shape=(256, 128, 192), seconds=0.02, repeats=2)
        assert 0 < rate < 1e5  # GFLOP/s: positive and below any CPU or GPU


def test_mfu_divides_by_the_faster_of_the_two_products(monkeypatch):
    """A GPU runs the small ViT-B MLP product below its peak: the square product sets the bar."""
    from pcavmae_cli.engine.bench import peak

    rates = {peak.VIT_B_MLP: 562.0, (8192, 8192, 8192): 790.0}
    monkeypatch.setattr(peak, "matmul_peak", lambda dtype, device, shape=peak.VIT_B_MLP, seconds=1.0: rates[shape])
    got = peak.device_peak(torch.bfloat16, torch.device("cuda"))
    assert (got.vit_b_mlp, got.square, got.square_side, got.best) == (562.0, 790.0, 8192, 790.0)
    rates[(2048, 2048, 2048)] = 100.0
    assert peak.device_peak(torch.float32, CPU).best == 562.0  # on a CPU the ViT-B shape may be faster


def test_attention_flops_are_counted_on_the_cpu():
    """torch's counter has no formula for the CPU attention kernel; without ``flops`` it counts 0.

    B=2, H=3, N=5 tokens, d=4: each attention product is 2*B*H*N*N*d = 1200 FLOPs; the forward
    has two (Q K^T, P V), the backward five (four gradient products and the recomputed scores,
    as torch counts its GPU kernels).
    """
    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))
    assert flops.count(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * 1200
    assert flops.count(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()) == 7 * 1200


def test_step_flops_grow_with_the_model(corpus, tmp_path):  # noqa: F811
    small = count_flops(recipe(corpus, tmp_path), 2, CPU)
    wider = count_flops(recipe(corpus, tmp_path, "model.embed_dim=32"), 2, CPU)
    assert 0 < small < wider


def test_kmeans_bench_improves_on_its_start_and_times_init_apart():
    x = unit_features(600, 8, seed=1, device=CPU)
    start = init_centroids(x, 12, seed=0, comm=Comm())
    given = bench_kmeans(600, 8, 12, iters=3, seed=1, init=start)
    assert given.init_seconds == 0.0 and given.iter_seconds > 0
    assert objective(x, start) < given.objective <= 1.0
    drawn = bench_kmeans(600, 8, 12, iters=3, seed=1)
    assert drawn.init_seconds > 0 and drawn.objective > 0.5


def cells(row: str) -> list[str]:
    """The cells of a Markdown table row."""
    return [c.strip() for c in row.strip().strip("|").split("|")]


def rows_starting(text: str, *first: str) -> list[list[str]]:
    return [cells(line) for line in text.splitlines() if line.startswith("|") and cells(line)[0] in first]


def test_pcav_bench_prints_and_appends_sane_positive_figures(corpus, tmp_path):  # noqa: F811
    out = tmp_path / "benchmarks.md"
    result = pcav(
        "bench", "--recipe", "demo", *TINY, "--batch", "2", "--steps", "1", "--peak-seconds", "0.02",
        "--data", str(corpus), "--workers", "0", "--passes", "1",
        "--estep-n", "400", "--estep-d", "8", "--estep-k", "6", "--estep-iters", "2", "--append", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for title in ("Matrix-multiply peak", "Pre-training step", "Data loader", "E-step"):
        assert title in result.stdout
    assert "train.precision auto: fp32 (auto: " in result.stdout  # what a run would choose (tiny: fp32)
    text = out.read_text()
    assert text.startswith("# Benchmarks") and "### pcav bench" in text and "load average" in text
    assert "`pcav bench --recipe demo" in text
    peaks = rows_starting(text, "fp32", "bf16")
    assert len(peaks) == 2 and all(len(row) == 3 and float(row[1]) > 0 and float(row[2]) > 0 for row in peaks)
    assert "2048x2048 @ 2048x2048" in text  # the square product's shape on a CPU
    assert "Pre-training step of demo" in text
    steps = [row for row in rows_starting(text, "plain", "fast") if row[1] in ("fp32", "bf16")]
    assert [(row[0], row[1]) for row in steps] == [("plain", "fp32"), ("fast", "fp32"), ("plain", "bf16"), ("fast", "bf16")]
    for _, _, batch, gflop, rate, achieved, mfu, ratio in steps:
        assert int(batch) == 2 and float(gflop) > 0 and float(rate) > 0 and float(achieved) > 0
        assert 0 < float(mfu.rstrip(" %")) < 100 and float(ratio.rstrip("x")) > 0
    loaders = [row for row in rows_starting(text, "plain", "packed") if row[1] not in ("fp32", "bf16")]
    assert [row[0] for row in loaders] == ["plain", "packed"], text
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in loaders), text
    (kmeans_row,) = rows_starting(text, "400")
    n, d, k, iters, init_s, iter_s, obj = kmeans_row
    assert (n, d, k, iters) == ("400", "8", "6", "2")
    assert float(init_s) > 0 and float(iter_s) > 0 and 0 < float(obj) <= 1


def test_pcav_bench_rejects_an_unknown_precision():
    result = pcav("bench", "--recipe", "demo", "--precision", "fp8", "--no-loader", "--no-estep")
    assert result.returncode == 1 and "--precision must be fp32 or bf16" in result.stderr
