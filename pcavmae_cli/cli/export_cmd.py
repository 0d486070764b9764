"""``pcav export RUN OUT [--format onnx|torch]``: the model as one file for deployment."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pcavmae_cli.cli.console import console


def export(
    run: Path = typer.Argument(..., help="A fine-tuned or pre-training run folder (or checkpoint folder).", metavar="RUN"),
    out: Path = typer.Argument(..., help="Output folder: model.onnx or model.pt2, export.json, labels.csv.", metavar="OUT"),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx (onnxruntime, any language) or torch "
                            "(torch.export, model.pt2).", metavar="onnx|torch"),  # fmt: skip
    labels: Optional[Path] = typer.Option(None, "--labels", help="Label CSV (default: the run's).", metavar="CSV",
                                          show_default=False),  # fmt: skip
) -> None:
    """Export the encoders (+ the classification head) as one ONNX graph or torch.export program.

    Inputs are the un-normalised log-Mel fbank (B, T, F) and uint8 frames (B, K, 3, S, S), B and
    K free; a fine-tuned run outputs frame-averaged scores (B, C) and logits, a pre-training run
    the clip features. The file is checked against pcav's own forward before it is kept
    (max_abs_diff in export.json); export.json also lists the fbank and frame settings.

    Example: pcav export pcav-demo/runs/finetune exported/ --format onnx
    """
    from pcavmae_cli.engine.export import export as run_export  # imports torch: not for --help

    result = run_export(run, out, fmt=fmt, labels=labels)  # type: ignore[arg-type]
    console.print(f"exported {', '.join(result.outputs)}; largest difference from pcav's forward "
                  f"{result.max_abs_diff:.1e}", highlight=False)  # fmt: skip
    console.print(f"wrote {', '.join(str(f) for f in result.files)}", highlight=False, soft_wrap=True)
