"""``pcav visualize tsne|reconstruct|curves|health|prototypes``: PNG figures of a run (and an HTML page)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pcavmae_cli.cli import options
from pcavmae_cli.cli.console import console

app = typer.Typer(
    help="Figures of a run: t-SNE by class (paper Fig. 2), reconstructions, training curves, representation health, "
    "prototype galleries.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

CHECKPOINT_HELP = "A pre-training run folder (its checkpoints/last) or a checkpoint folder."
DEVICE_HELP = "auto (the GPU if there is one), cpu or cuda."


def _wrote(*paths: Path) -> None:
    for path in paths:
        console.print(f"wrote [bold]{path}[/]", highlight=False)


@app.command("tsne")
def tsne(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help=CHECKPOINT_HELP),
    data: Path = typer.Option(..., "--data", "-d", help="Manifest of the clips to embed."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Figure to write: .png, .pdf or .svg (default RUN/plots/tsne.png)."),
    level: Optional[int] = typer.Option(None, "--level", help="Granularity of the prototypes shown (default: the finest)."),
    prototypes: bool = typer.Option(True, "--prototypes/--no-prototypes", help="Overlay the run's prototypes."),
    max_clips: int = typer.Option(2000, "--max-clips", help="Embed at most this many clips (evenly spaced)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    seed: int = typer.Option(0, "--seed", help="t-SNE seed."),
    overrides: Optional[list[str]] = options.Overrides,
) -> None:
    """t-SNE of the audio, video and joint clip embeddings, coloured by class, prototypes overlaid.

    Example: pcav visualize tsne --checkpoint pcav-demo/runs/pretrain --data pcav-demo/data/train/manifest.jsonl
    """
    from pcavmae_cli.engine.viz.draw import check_figure_path

    check_figure_path(out)
    from pcavmae_cli.engine.viz.run import open_run
    from pcavmae_cli.engine.viz.tsne import tsne_for_run

    result = tsne_for_run(open_run(checkpoint, overrides=overrides or []), data, out, level=level, overlay=prototypes, max_clips=max_clips,
                          device=device, seed=seed)  # fmt: skip
    console.print(f"{result.n_clips} clips, {len(result.classes)} classes, {result.n_prototypes} prototypes shown")
    _wrote(result.path)


@app.command("reconstruct")
def reconstruct(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help=CHECKPOINT_HELP),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Manifest (default: the run's eval manifest)."),
    clips: Optional[list[str]] = typer.Option(None, "--clip", help="Clip id to show (repeatable); default: --n clips."),
    n: int = typer.Option(3, "--n", help="Clips to show, evenly spaced over the manifest."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Figure to write: .png, .pdf or .svg (default RUN/plots/reconstruct.png)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of the random masks."),
    overrides: Optional[list[str]] = options.Overrides,
) -> None:
    """Frame and spectrogram as input, masked, reconstructed, and reconstructed with the visible patches pasted.

    Example: pcav visualize reconstruct --checkpoint pcav-demo/runs/pretrain --n 3
    """
    from pcavmae_cli.engine.viz.draw import check_figure_path

    check_figure_path(out)
    from pcavmae_cli.engine.viz.reconstruct import reconstruct_for_run
    from pcavmae_cli.engine.viz.run import open_run

    _wrote(reconstruct_for_run(open_run(checkpoint, overrides=overrides or []), data, out, clips=clips, n=n, device=device, seed=seed))


@app.command("curves")
def curves(
    runs: list[Path] = typer.Argument(..., help="A run folder (with metrics.jsonl) or a metrics.jsonl file; several "
                                      "to compare them.", metavar="RUN...", show_default=False),  # fmt: skip
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Figure to write: .png, .pdf or .svg (default "
                                       "RUN/plots/curves.png; for several runs compare-curves.png here)."),  # fmt: skip
) -> None:
    """Every loss part and metric of metrics.jsonl against optimiser steps; several runs overlaid.

    One run: every logged line (steps and epochs), stages and warm-up marked. Several runs: their
    epoch means in one panel per quantity, a colour per run, named in the legend.

    Example: pcav visualize curves pcav-demo/runs/pretrain pcav-demo/runs/pretrain_cavmae -o compare.png
    """
    from pcavmae_cli.engine.viz.draw import check_figure_path

    check_figure_path(out)
    if len(runs) > 1:
        from pcavmae_cli.engine.viz.compare import compare_figure

        _wrote(compare_figure(runs, out if out is not None else Path("compare-curves.png")))
        return
    from pcavmae_cli.engine.viz.curves import curves_for_run

    _wrote(curves_for_run(runs[0], out))


@app.command("health")
def health(
    run: Path = typer.Argument(..., help="A pre-training run folder (with metrics.jsonl) or a metrics.jsonl file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Figure to write: .png, .pdf or .svg (default RUN/plots/health.png)."),
) -> None:
    """Representation health per epoch: mean cosine, effective rank, cosine spread to the prototypes, agreement.

    Example: pcav visualize health pcav-demo/runs/pretrain
    """
    from pcavmae_cli.engine.viz.draw import check_figure_path

    check_figure_path(out)
    from pcavmae_cli.engine.viz.draw import fmt
    from pcavmae_cli.engine.viz.health import health_for_run

    report = health_for_run(run, out)
    last = report.last
    console.print(f"epoch {last['epoch']} (of {len(report.epochs)} measured):", highlight=False)
    for m, name in (("a", "audio"), ("v", "video"), ("joint", "joint")):
        spread = last.get(f"health_spread_{m}")
        agree = last.get(f"health_agree_{m}")
        console.print(
            f"  {name}: mean cosine {fmt(last[f'health_cos_{m}'])}, effective rank {fmt(last[f'health_rank_{m}'], 2)}"
            + (f", spread to prototypes {'/'.join(fmt(v) for v in spread)}" if spread else "")
            + (f", agrees with the joint cluster {'/'.join(fmt(v) for v in agree)}" if agree else ""),
            highlight=False,
        )
    for name, epochs in report.collapsed.items():
        if epochs:
            console.print(f"[yellow]{name} collapsed[/] at epochs {', '.join(map(str, epochs))}", highlight=False)
    _wrote(report.path)


@app.command("prototypes")
def prototypes(
    run: Path = typer.Argument(..., help="A pre-training run folder (with prototypes/)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder to write (default RUN/plots/prototypes)."),
    top: int = typer.Option(6, "--top", help="Largest prototypes shown per granularity."),
    members: int = typer.Option(4, "--members", help="Member clips shown per prototype."),
    candidates: int = typer.Option(64, "--candidates", help="Members embedded per prototype to pick the nearest."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    overrides: Optional[list[str]] = options.Overrides,
) -> None:
    """Prototype galleries per granularity, purity / NMI against labels and their evolution, and an HTML page.

    Example: pcav visualize prototypes pcav-demo/runs/pretrain --top 6 --members 4
    """
    from pcavmae_cli.engine.viz.draw import fmt
    from pcavmae_cli.engine.viz.prototypes_report import prototypes_report
    from pcavmae_cli.engine.viz.run import open_run

    report = prototypes_report(open_run(run, need_checkpoint=False, overrides=overrides or []), out, top=top, members=members,
                               candidates=candidates, device=device)  # fmt: skip
    for s in report.levels:
        console.print(f"granularity {s.level}: {s.k} prototypes, purity {fmt(s.purity)}, NMI {fmt(s.nmi)} "
                      f"(epoch {s.epoch})", highlight=False)  # fmt: skip
    _wrote(*report.pngs, report.html)
