"""``pcav bench``: throughput of the pre-training step, the data loader and the E-step here."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from pcavmae_cli.cli import options
from pcavmae_cli.cli.console import console
from pcavmae_cli.engine import config
from pcavmae_cli.engine.errors import UserError

PRECISIONS = ("fp32", "bf16")


def bench(
    recipe: str = typer.Option("pretrain_audioset", "--recipe", "-r", help=options.RECIPE_HELP, metavar="NAME|PATH"),
    overrides: Optional[list[str]] = options.Overrides,
    device: str = typer.Option("auto", "--device", help="auto (CUDA when visible), cpu or cuda."),
    batch: int = typer.Option(4, "--batch", help="Samples per pre-training step."),
    steps: int = typer.Option(2, "--steps", help="Timed steps per configuration (after one warm-up step)."),
    precision: Optional[list[str]] = typer.Option(None, "--precision", help="fp32 and/or bf16 (default both)."),
    peak_seconds: float = typer.Option(1.0, "--peak-seconds", help="Seconds per matmul-peak measurement."),
    step_part: bool = typer.Option(True, "--step/--no-step", help="Measure the pre-training step."),
    loader_part: bool = typer.Option(True, "--loader/--no-loader", help="Measure the data loader."),
    estep_part: bool = typer.Option(True, "--estep/--no-estep", help="Measure the E-step clustering."),
    data: Optional[Path] = typer.Option(None, "--data", help="Plain manifest for the loader (default: a tiny demo corpus in a temp dir)."),
    workers: int = typer.Option(1, "--workers", help="Loader worker processes."),
    passes: int = typer.Option(2, "--passes", help="Loader epochs to time."),
    estep_n: int = typer.Option(200_000, "--estep-n", help="E-step: feature rows N."),
    estep_d: int = typer.Option(128, "--estep-d", help="E-step: feature width D."),
    estep_k: int = typer.Option(5_000, "--estep-k", help="E-step: clusters K."),
    estep_iters: int = typer.Option(10, "--estep-iters", help="E-step: Lloyd iterations."),
    append: Optional[Path] = typer.Option(None, "--append", help="Append the results as a Markdown section to this file (e.g. docs/benchmarks.md)."),
) -> None:  # fmt: skip
    """Measure this machine: FLOPs/sample, step samples/s and MFU, loader samples/s, E-step seconds.

    MFU is the step's achieved FLOP/s over the matrix-multiply peak measured in the same run
    (fp32 and bf16; the faster of a ViT-B MLP-shaped and a large square product). The step uses
    synthetic full-size inputs; "plain" is the eager step with torch's default AdamW, "fast" the
    recipe's settings with fused AdamW (add train.compile=true to compile it). The first lines say
    which precision the recipe's train.precision (auto: measured on a CPU) takes on this machine.

    Example: pcav bench --recipe pretrain_cavmae --batch 4 --estep-n 200000 --append docs/benchmarks.md
    """
    import torch  # imported here: `pcav --help` must not import torch

    from pcavmae_cli.engine.bench import kmeans as kmeans_bench
    from pcavmae_cli.engine.bench import loader_section, peak, report, step
    from pcavmae_cli.engine.train.runtime import describe_precision, model_width, resolve_device

    precisions = precision or list(PRECISIONS)
    for p in precisions:
        if p not in PRECISIONS:
            raise UserError(f"--precision must be fp32 or bf16, got {p!r}")
    if batch < 1 or steps < 1:
        raise UserError("--batch and --steps must be >= 1")
    cfg = config.load_recipe(recipe, overrides or [])
    dev = resolve_device(device)
    tables: list[tuple[str, list[str], list[list[str]]]] = []
    console.print(f"[bold]pcav bench[/] recipe {recipe}, device {dev}; {report.machine()}; load {report.load()}")
    if cfg.train is not None and cfg.model is not None:  # what a run of this recipe would train in here
        chosen = describe_precision(cfg.train.precision, dev, model_width(cfg.model))
        console.print(f"train.precision {cfg.train.precision}: {chosen}", highlight=False)

    if step_part:
        peaks = {p: peak.device_peak(step.PRECISIONS[p] or torch.float32, dev, seconds=peak_seconds) for p in precisions}
        side = next(iter(peaks.values())).square_side
        tables.append(("Matrix-multiply peak, GFLOP/s (MFU divides by the larger)",
                       ["dtype", "2048x768 @ 768x3072", f"{side}x{side} @ {side}x{side}"],
                       [[p, f"{peaks[p].vit_b_mlp:.0f}", f"{peaks[p].square:.0f}"] for p in precisions]))  # fmt: skip
        show(*tables[-1])
        flops = step.count_flops(cfg, batch, dev)
        measured, plain_rate = {}, {}
        for fast in (False, True):  # every plain step before any fast one (build_step's docstring)
            for p in precisions:
                try:
                    r = step.measure_step(cfg, batch, dev, p, fast=fast, steps=steps, warmup=1, flops_per_sample=flops)
                except RuntimeError as exc:  # e.g. a compiled backward failing at run time
                    if not fast:
                        raise
                    first = (str(exc).strip().splitlines() or [""])[-1][:120]
                    console.print(f"fast {p} step failed ({type(exc).__name__}: {first}); set train.compile=false")
                    continue
                plain_rate.setdefault(p, r.samples_per_s)
                measured[p, fast] = [
                    r.variant, p, str(batch), f"{flops / 1e9:.4g}", f"{r.samples_per_s:.3g}",
                    f"{r.flops_per_s / 1e9:.4g}", f"{100 * r.flops_per_s / 1e9 / peaks[p].best:.3g} %",
                    f"{r.samples_per_s / plain_rate[p]:.2f}x",
                ]  # fmt: skip
        rows = [measured[key] for key in sorted(measured, key=lambda key: (precisions.index(key[0]), key[1]))]
        tables.append((
            f"Pre-training step of {recipe} (forward, losses, backward, AdamW; synthetic full-size inputs)",
            ["step", "precision", "batch", "GFLOP/sample", "samples/s", "GFLOP/s", "MFU", "vs plain"],
            rows,
        ))  # fmt: skip
        show(*tables[-1])

    if loader_part:
        if not loader_section.loader_available():
            console.print("loader: skipped, engine/bench/loader.py (the packed data path) is not installed")
        else:
            results = loader_section.bench_layouts(cfg.data, data, workers=workers, passes=passes)
            tables.append(("Data loader (one random frame + fbank per sample)",
                           ["layout", "workers", "samples/s", "samples/s per worker", "ms/sample"],
                           [[r["layout"], str(r["workers"]), f"{r['samples_per_s']:.1f}",
                             f"{r['samples_per_s_per_worker']:.1f}", f"{r['ms_per_sample']:.2f}"] for r in results]))  # fmt: skip
            show(*tables[-1])

    if estep_part:
        r = kmeans_bench.bench_kmeans(estep_n, estep_d, estep_k, iters=estep_iters, device=dev)
        tables.append(("E-step spherical k-means (random unit vectors)",
                       ["N", "D", "K", "iterations", "init s (k-means++)", "iterations s", "objective"],
                       [[str(r.n), str(r.d), str(r.k), str(r.iters), f"{r.init_seconds:.3g}",
                         f"{r.iter_seconds:.3g}", f"{r.objective:.4f}"]]))  # fmt: skip
        show(*tables[-1])

    if append is not None:
        command = "pcav " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        path = report.append_section(append, report.section(command, tables))
        console.print(f"appended to {path}")


def show(title: str, header: list[str], rows: list[list[str]]) -> None:
    console.print(f"[bold]{title}[/]")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)  # fits 80 columns
    for name in header:
        justify = "left" if name in ("step", "precision", "layout", "dtype") else "right"
        # whole header words; a narrow terminal folds the cells, never cuts them
        table.add_column(name, justify=justify, overflow="fold", min_width=len(name))
    for row in rows:
        table.add_row(*row)
    console.print(table)
