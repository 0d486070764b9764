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

**Scale** (``benchmarks/search_scale.py``, docs/benchmarks.md "Search"). The hits are an exact
brute-force product, the library matrix (N x D float32) times the query: about 56 ms per query
at a million clips of width 256 on 2 cores, after reading the library (4-5 s at that size).
``--faiss`` (the ``search`` extra, faiss-cpu) searches an IVF-Flat index instead, built on first
use (2-3 minutes per million clips), kept next to the library and read by mmap: a few
milliseconds per query at a million clips, recall@10 1.00 on clustered embeddings. Below a few
hundred thousand clips brute force is as fast and exact, so it is the default.
"""

from __future__ import annotations

import csv
import html
import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.files import atomic_write_text

MODES = {"a->v": ("z_a", "z_v"), "v->a": ("z_v", "z_a"), "av->av": ("joint", "joint")}
META = "embed.json"  # pcav embed's sidecar: the checkpoint and settings that made the library


@dataclass
class Library:
    """An embedded collection of clips: row i of every feature is clip i. Features are read
    (and L2-normalised) when first asked for: a query reads one of them, not all five."""

    path: Path
    ids: list[str]
    labels: list[str]
    sources: list[str]
    loaders: dict[str, Callable[[], np.ndarray]]  # name -> reads its (N, width) array
    checkpoint: str | None  # the model that embedded it (embed.json), if recorded
    _cache: dict[str, np.ndarray] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        return name in self.loaders

    def feature(self, name: str) -> np.ndarray:
        """``(N, width)`` float32, rows L2-normalised."""
        if name not in self.loaders:
            raise UserError(f"{self.path} has no '{name}' feature; re-embed it with pcav embed")
        if name not in self._cache:
            x = _normalised(self.loaders[name]())
            if x.shape[0] != len(self.ids):
                raise UserError(f"{self.path}: {name} has {x.shape[0]} rows but its index lists {len(self.ids)} clips")
            self._cache[name] = x
        return self._cache[name]

    def row(self, clip_id: str) -> int:
        try:
            return self.ids.index(clip_id)
        except ValueError:
            raise UserError(f"clip '{clip_id}' is not in the library {self.path}") from None

    def index_path(self, name: str) -> Path:
        """Where ``--faiss`` keeps the IVF index of feature ``name`` (built once, reused)."""
        if self.path.is_dir():
            return self.path / f"faiss-{name}.index"
        return self.path.with_name(f"{self.path.stem}.faiss-{name}.index")


def _normalised(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, in one float32 copy (in place after it: a million rows of
    width 256 are 1 GB, and temporaries would double it)."""
    x = np.array(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    x /= np.maximum(norms, 1e-12)
    return x


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
    checkpoint = None
    if meta_path(path).is_file():
        checkpoint = json.loads(meta_path(path).read_text(encoding="utf-8")).get("checkpoint")
    return Library(path, [r["id"] for r in rows], [r.get("labels", "") for r in rows], [r.get("source", "") for r in rows],
                   {name: load[name] for name in ("z_a", "z_v", "joint") if name in load}, checkpoint)  # fmt: skip


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
    """The ``top`` clips of ``library`` whose ``feature`` is most similar to ``query`` (cosine):
    exact (brute force), or with ``use_faiss`` from the library's IVF index (approximate)."""
    if top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    q = _normalised(query).reshape(-1)
    want = min(top + (exclude is not None), len(library.ids))
    if use_faiss:
        order, scores = _ivf_search(library, feature, q, want)
    else:
        matrix = library.feature(feature)
        if q.shape[0] != matrix.shape[1]:
            raise UserError(f"the query's {feature} has width {q.shape[0]} but the library's has {matrix.shape[1]}: "
                            "query with the checkpoint that embedded the library")  # fmt: skip
        sims = matrix @ q
        part = np.argpartition(-sims, want - 1)[:want] if want < sims.shape[0] else np.arange(sims.shape[0])
        order = part[np.argsort(-sims[part], kind="stable")]
        scores = sims[order]
    hits = [(int(r), float(s)) for r, s in zip(order, scores) if r != exclude][:top]
    return [Hit(k + 1, r, library.ids[r], s, library.labels[r], library.sources[r]) for k, (r, s) in enumerate(hits)]


def ivf_lists(n: int) -> int:
    """Inverted lists of an IVF index over ``n`` rows: about 4 sqrt(n), at least 39 rows each
    to train on (faiss's minimum per centroid)."""
    return max(1, min(int(round(4 * n**0.5)), n // 39))


def _ivf_search(library: Library, feature: str, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss IVF search (inner product on normalised rows), the index built on first use and
    kept next to the library; it is rebuilt when the library's row count or width changed."""
    try:
        import faiss
    except ImportError:
        raise UserError("--faiss needs faiss-cpu: pip install 'pcavmae-cli[search]'") from None
    path = library.index_path(feature)
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP) if path.is_file() else None
    if index is None or index.ntotal != len(library.ids) or index.d != q.shape[0]:
        index = build_ivf(library.feature(feature))
        tmp = path.with_name(f".{path.name}.tmp")
        faiss.write_index(index, str(tmp))
        tmp.replace(path)
    index.nprobe = min(index.nlist, NPROBE)
    scores, order = index.search(q[None].astype(np.float32), k)
    keep = order[0] >= 0
    return order[0][keep], scores[0][keep]


NPROBE = 32  # inverted lists searched per query


def build_ivf(matrix: np.ndarray):
    """An IVF-Flat inner-product index of ``matrix`` (rows normalised), trained on up to 256
    rows per list."""
    import faiss

    n, d = matrix.shape
    nlist = ivf_lists(n)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = matrix[np.random.default_rng(0).permutation(n)[: 256 * nlist]] if n > 256 * nlist else matrix
    index.train(np.ascontiguousarray(sample))
    index.add(np.ascontiguousarray(matrix))
    return index


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
