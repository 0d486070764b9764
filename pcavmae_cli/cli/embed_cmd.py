"""``pcav embed --checkpoint C (--data M | --videos DIR) --out F``: clip embeddings to files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pcavmae_cli.cli import options
from pcavmae_cli.cli.console import RichReporter, console, exit_130_when_stopped


def embed(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Run folder or checkpoint folder "
                                    "(pre-training, fine-tuning, or one pcav convert wrote).", metavar="PATH"),  # fmt: skip
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Manifest of preprocessed clips.", metavar="MANIFEST",
                                        show_default=False),  # fmt: skip
    videos: Optional[Path] = typer.Option(None, "--videos", help="Folder of video files, preprocessed on the fly "
                                          "with the checkpoint's data settings.", metavar="DIR", show_default=False),  # fmt: skip
    out: Path = typer.Option(..., "--out", "-o", help="A folder (FEATURE.npy + index.csv) or a FILE.safetensors "
                             "(+ FILE.csv).", metavar="PATH"),  # fmt: skip
    fmt: Optional[str] = typer.Option(None, "--format", help="npy or safetensors (default: from --out's suffix).",
                                      metavar="npy|safetensors", show_default=False),  # fmt: skip
    frames: Optional[str] = typer.Option(None, "--frames", help="all: average over the clip's frames; middle: the "
                                         "middle frame (default: the recipe's evaluate.frames).",
                                         metavar="all|middle", show_default=False),  # fmt: skip
    chunk: int = typer.Option(256, "--chunk", help="Clips per resumable chunk: a rerun skips finished chunks."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="ffmpeg processes for --videos "
                                       "(default: data.preprocess.jobs; 0 = one per core).", show_default=False),  # fmt: skip
    overrides: Optional[list[str]] = options.Overrides,
) -> None:
    """Write audio, video and joint clip embeddings (and z_a, z_v) of a manifest or a video folder.

    Features: audio / video, each modality's mean-pooled joint-layer output; joint, the
    audio+video stream; z_a / z_v, the contrastive space. Row i of every array is row i of the
    index CSV (id, labels, source). Raw videos are preprocessed exactly as pcav preprocess does,
    so a clip gets the same embedding either way. Interrupted runs (Ctrl-C: exit status 130)
    resume where they stopped.

    Example: pcav embed --checkpoint pcav-demo/runs/pretrain --videos my_videos/ --out embeddings/
    """
    from pcavmae_cli.engine.embed import embed as run  # imports torch: not for --help
    from pcavmae_cli.engine.errors import UserError

    if frames not in (None, "all", "middle"):
        raise UserError(f"--frames: expected 'all' or 'middle', got '{frames}'")
    with exit_130_when_stopped():
        result = run(
            checkpoint, out, data=data, videos=videos, fmt=fmt, frames=frames, chunk=chunk, jobs=jobs,
            overrides=overrides or [], reporter=RichReporter(),
        )  # fmt: skip
    widths = ", ".join(f"{k} {v}" for k, v in result.widths.items())
    resumed = f"; {result.chunks_skipped} chunk(s) reused from an interrupted run" if result.chunks_skipped else ""
    console.print(f"{result.n_clips} clips embedded ({widths}){resumed}", highlight=False)
    if result.n_failed:
        console.print(f"{result.n_failed} video(s) could not be preprocessed: see {result.failures}", highlight=False)
    console.print(f"wrote {', '.join(str(f) for f in result.files)}", highlight=False, soft_wrap=True)
