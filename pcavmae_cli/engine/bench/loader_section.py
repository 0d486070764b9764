"""The loader part of ``pcav bench``: samples/s per worker of the plain and the packed layout.

Either the user's manifest (``--data``), packed into a temporary folder, or a tiny demo corpus
written, preprocessed and packed in a temporary folder. The timing itself is
``engine/bench/loader.py`` (the loader pre-training really uses).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pcavmae_cli.engine.schema import DataConfig


def loader_available() -> bool:
    """Whether the data path's ``bench_loader`` is installed (it lands with the packed layout)."""
    import importlib.util

    return importlib.util.find_spec("pcavmae_cli.engine.bench.loader") is not None


def bench_layouts(
    data: DataConfig, manifest: str | Path | None, *, workers: int, passes: int, demo_clips_per_class: int = 3
) -> list[dict]:
    """``bench_loader`` results for the plain manifest and its packed copy (see module docstring)."""
    from pcavmae_cli.engine.bench.loader import bench_loader
    from pcavmae_cli.engine.data.pack import pack_manifest

    with tempfile.TemporaryDirectory(prefix="pcav-bench-") as tmp:
        root = Path(tmp)
        if manifest is None:
            manifest = demo_manifest(root, data, demo_clips_per_class)
        packed = pack_manifest(manifest, root / "pack", data)
        return [
            bench_loader(m, data, workers=workers, passes=passes) for m in (Path(manifest), packed.index)
        ]


def demo_manifest(root: Path, data: DataConfig, clips_per_class: int) -> Path:
    """Write, and preprocess, a tiny demo corpus under ``root``; returns its train manifest."""
    from pcavmae_cli.engine.data.demo_corpus import make_demo_corpus
    from pcavmae_cli.engine.data.preprocess import preprocess

    corpus = make_demo_corpus(root / "corpus", clips_per_class=clips_per_class, eval_per_class=1)
    report = preprocess(corpus.segment_csvs["train"], root / "train", data, videos=corpus.videos)
    return Path(report.manifest)
