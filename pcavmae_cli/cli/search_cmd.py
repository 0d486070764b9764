"""``pcav search LIBRARY (--video F | --audio F | --clip ID)``: clips of a library by example."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from pcavmae_cli.cli.console import console


def search(
    library: Path = typer.Argument(..., help="What pcav embed wrote: a folder (.npy + index.csv) or a .safetensors.",
                                   metavar="LIBRARY"),  # fmt: skip
    video: Optional[Path] = typer.Option(None, "--video", help="Query with this video (or any media file).",
                                         metavar="FILE", show_default=False),  # fmt: skip
    audio: Optional[Path] = typer.Option(None, "--audio", help="Query with this sound (any audio file): "
                                         "the videos that look like it sounds.", metavar="FILE", show_default=False),  # fmt: skip
    clip: Optional[str] = typer.Option(None, "--clip", help="Query with a clip of the library (left out of the hits).",
                                       metavar="ID", show_default=False),  # fmt: skip
    mode: Optional[str] = typer.Option(None, "--mode", "-m", help="a->v (sound to pictures), v->a, av->av (whole "
                                       "clips). Default: a->v for --audio, av->av otherwise.", metavar="MODE",
                                       show_default=False),  # fmt: skip
    top: int = typer.Option(10, "--top", "-k", help="Hits shown."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="The model that embeds the query "
                                              "(default: the one that embedded the library, from its embed.json).",
                                              metavar="PATH", show_default=False),  # fmt: skip
    html_out: Optional[Path] = typer.Option(None, "--html", help="Also write a page with a frame of each hit and its "
                                            "video to play.", metavar="FILE.html", show_default=False),  # fmt: skip
    use_faiss: bool = typer.Option(False, "--faiss", help="Search the library's faiss IVF index (approximate; built "
                                   "on first use and kept next to it; faiss-cpu, the 'search' extra): for libraries of "
                                   "millions of clips."),  # fmt: skip
    device: str = typer.Option("auto", "--device", help="auto (the GPU if there is one), cpu or cuda."),
) -> None:
    """Find the clips of your library most like a video, a sound, or one of its clips (cosine similarity).

    Build the library once with pcav embed (from a folder of videos or a manifest); the query is
    embedded by the same model. A sound finds videos through the contrastive space both
    modalities share (a->v): a bark finds clips that look like dogs.

    Example: pcav search library/ --audio bark.wav --top 5 --html hits.html
    (the library made first with: pcav embed -c runs/pretrain --videos my_videos/ --out library/)
    """
    from pcavmae_cli.engine.errors import UserError
    from pcavmae_cli.engine.search import MODES, nearest, open_library, write_html

    if sum(x is not None for x in (video, audio, clip)) != 1:
        raise UserError("give exactly one query: --video FILE, --audio FILE or --clip ID")
    mode = mode or ("a->v" if audio is not None else "av->av")
    if mode not in MODES:
        raise UserError(f"--mode: expected one of {', '.join(MODES)}, got '{mode}'")
    if audio is not None and mode != "a->v":
        raise UserError(f"--audio gives only the sound's embedding: use --mode a->v, not {mode}")
    query_feature, library_feature = MODES[mode]
    lib = open_library(library)
    exclude = None
    if clip is not None:
        exclude = lib.row(clip)
        query = lib.feature(query_feature)[exclude]
        label = f"clip {clip}"
    else:
        from pcavmae_cli.engine.inference import load

        source = checkpoint or lib.checkpoint
        if source is None:
            raise UserError(f"{library} does not record the model that embedded it (no embed.json); pass --checkpoint")
        model = load(source, device=device)
        if audio is not None:
            query = model.audio_features(model.read_audio(audio))["z_a"][0].numpy()
            label = f"sound {audio}"
        else:
            query = model.embed(video)[query_feature]
            label = f"video {video}"
    hits = nearest(lib, query, library_feature, top, exclude=exclude, use_faiss=use_faiss)
    table = Table(title=f"{escape(label)}: {mode}, {len(lib.ids)} clips", header_style="bold", title_justify="left")
    for name in ("rank", "cosine", "clip", "labels", "source"):
        table.add_column(name, justify="right" if name in ("rank", "cosine") else "left")
    for h in hits:
        table.add_row(str(h.rank), f"{h.score:.3f}", escape(h.id), escape(h.labels), escape(h.source))
    console.print(table)
    if html_out is not None:
        console.print(f"wrote {write_html(html_out, label, mode, hits)}", highlight=False)
