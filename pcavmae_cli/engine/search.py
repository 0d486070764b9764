"""``pcav search``: find clips of your own library by example -- a video, a sound, or a clip.

The library is what ``pcav embed`` writes (``FEATURE.npy`` + ``index.csv``, or a
``.safetensors`` + its ``.csv``), plus ``embed.json`` naming the checkpoint that made it, so a
query is embedded by the same model. Modes pair a query feature with a library feature:

- ``a->v``: the query's sound (``z_a``) against the clips' pictures (``z_v``): "which videos look
  like this sounds";
- ``v->a``: the query's picture (``z_v``) against the clips' sounds (``z_a``);
- ``av->av``: the whole clip (``joint``, both modalities) against whole clips.

A query by sound alone (``--audio``, any file ffmpeg reads) has only ``z_a``: mode ``a->v``.
A query by clip id takes its row of the library (no model needed) and leaves it out of the hits.
Similarity is the cosine (features L2-normalised).

**Scale.** The hits are an exact brute-force product: the library matrix (N x D float32) times
the query. ``benchmarks/search_scale.py`` measures it against faiss (docs/benchmarks.md,
"Search"): brute force stays well under a second per query up to millions of clips when the
library fits in memory, so it is the default; ``--faiss`` (the ``search`` extra, faiss-cpu) uses
an HNSW graph, approximate, for libraries where even that is too slow or for many queries.
"""

from __future__ import annotations

import csv
import html
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.files import atomic_write_text

MODES = {"a->v": ("z_a", "z_v"), "v->a": ("z_v", "z_a"), "av->av": ("joint", "joint")}
META = "embed.json"  # pcav embed's sidecar: the checkpoint and settings that made the library


@dataclass
class Library:
    """An embedded collection of clips: row i of every feature is clip i."""

    path: Path
    ids: list[str]
    labels: list[str]
    sources: list[str]
    features: dict[str, np.ndarray]  # name -> (N, width), L2-normalised rows
    checkpoint: str | None  # the model that embedded it (embed.json), if recorded

    def row(self, clip_id: str) -> int:
        try:
            return self.ids.index(clip_id)
        except ValueError:
            raise UserError(f"clip '{clip_id}' is not in the library {self.path}") from None


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def meta_path(out: Path) -> Path:
    """Where ``pcav embed`` records what made ``out`` (a folder's ``embed.json``, or ``FILE.json``)."""
    return out / META if out.suffix != ".safetensors" else out.with_suffix(".json")


def open_library(path: str | Path) -> Library:
    """A ``pcav embed`` output: a folder of ``.npy`` + ``index.csv``, or ``FILE.safetensors`` + ``FILE.csv``."""
    path = Path(path)
    if path.is_dir():
        index = path / "index.csv"
        names = {p.stem: p for p in path.glob("*.npy")}
        load = {name: (lambda p=p: np.load(p, mmap_mode="r")) for name, p in names.items()}
    elif path.suffix == ".safetensors" and path.is_file():
        from safetensors.numpy import load_file

        index = path.with_suffix(".csv")
        tensors = load_file(str(path))
        load = {name: (lambda v=v: v) for name, v in tensors.items()}
    else:
        raise UserError(f"{path}: not a pcav embed output (a folder of .npy + index.csv, or a .safetensors file)")
    if not index.is_file():
        raise UserError(f"{index}: the library's index is missing; was {path} written by pcav embed?")
    with index.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    features = {}
    for name in ("z_a", "z_v", "joint"):
        if name in load:
            features[name] = _normalised(load[name]())
            if features[name].shape[0] != len(rows):
                raise UserError(f"{path}: {name} has {features[name].shape[0]} rows but {index} lists {len(rows)} clips")
    checkpoint = None
    if meta_path(path).is_file():
        checkpoint = json.loads(meta_path(path).read_text(encoding="utf-8")).get("checkpoint")
    return Library(path, [r["id"] for r in rows], [r.get("labels", "") for r in rows], [r.get("source", "") for r in rows],
                   features, checkpoint)  # fmt: skip


@dataclass
class Hit:
    rank: int
    row: int
    id: str
    score: float  # cosine similarity
    labels: str
    source: str


def nearest(library: Library, query: np.ndarray, feature: str, top: int, *, exclude: int | None = None,
            use_faiss: bool = False) -> list[Hit]:  # fmt: skip
    """The ``top`` rows of ``library.features[feature]`` most similar to ``query`` (cosine)."""
    if feature not in library.features:
        raise UserError(f"{library.path} has no '{feature}' feature; re-embed it with pcav embed")
    if top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    matrix = library.features[feature]
    q = _normalised(query).reshape(-1)
    if q.shape[0] != matrix.shape[1]:
        raise UserError(f"the query's {feature} has width {q.shape[0]} but the library's has {matrix.shape[1]}: "
                        "query with the checkpoint that embedded the library")  # fmt: skip
    want = min(top + (exclude is not None), matrix.shape[0])
    if use_faiss:
        order, scores = _faiss_search(matrix, q, want)
    else:
        sims = matrix @ q
        part = np.argpartition(-sims, want - 1)[:want] if want < sims.shape[0] else np.arange(sims.shape[0])
        order = part[np.argsort(-sims[part], kind="stable")]
        scores = sims[order]
    hits = [(int(r), float(s)) for r, s in zip(order, scores) if r != exclude][:top]
    return [Hit(k + 1, r, library.ids[r], s, library.labels[r], library.sources[r]) for k, (r, s) in enumerate(hits)]


def _faiss_search(matrix: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """HNSW inner-product search (approximate; cosine on normalised rows), built per call."""
    try:
        import faiss
    except ImportError:
        raise UserError("--faiss needs faiss-cpu: pip install 'pcavmae-cli[search]'") from None
    index = faiss.IndexHNSWFlat(matrix.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = max(64, 2 * k)
    index.add(np.ascontiguousarray(matrix, dtype=np.float32))
    scores, order = index.search(q[None].astype(np.float32), k)
    keep = order[0] >= 0
    return order[0][keep], scores[0][keep]


def _thumbnail(source: str, out: Path) -> str | None:
    """A small JPEG of the source video's first second (relative name), or ``None``."""
    from pcavmae_cli.engine.media import ffmpeg_exe

    if not source or not Path(source).is_file():
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-ss", "1", "-i", source, "-frames:v", "1",
           "-vf", "scale=160:-2", str(out)]  # fmt: skip
    if subprocess.run(cmd, capture_output=True).returncode != 0 or not out.is_file():
        return None
    return out.name


def write_html(path: Path, query: str, mode: str, hits: list[Hit]) -> Path:
    """A page of the hits: thumbnail, score, id, labels, and the source video to play."""
    media = path.with_name(path.stem + "_files")
    cells = []
    for h in hits:
        thumb = _thumbnail(h.source, media / f"{h.rank:03d}.jpg")
        rel = os.path.relpath(h.source, path.parent) if h.source else ""
        img = f'<img src="{html.escape(media.name)}/{html.escape(thumb)}">' if thumb else ""
        play = (f'<video controls preload="none" width="240" src="{html.escape(rel)}"></video>' if h.source and
                Path(h.source).is_file() else "")  # fmt: skip
        cells.append(f"<tr><td>{h.rank}</td><td>{h.score:.3f}</td><td>{img}</td><td>{html.escape(h.id)}</td>"
                     f"<td>{html.escape(h.labels)}</td><td>{play}</td></tr>")  # fmt: skip
    page = (f"<!doctype html><meta charset='utf-8'><title>pcav search</title><h1>pcav search: {html.escape(mode)}</h1>"
            f"<p>query: {html.escape(query)}</p><table border=1 cellpadding=4><tr><th>rank</th><th>cosine</th>"
            f"<th>frame</th><th>clip</th><th>labels</th><th>play</th></tr>{''.join(cells)}</table>")  # fmt: skip
    return atomic_write_text(path, page)
