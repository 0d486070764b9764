"""``pcav embed``: clip embeddings of a manifest or of a folder of the user's own videos.

The features are ``predict.backbone_features`` (what ``pcav evaluate`` probes and retrieves
with): ``audio``, ``video`` (each modality's mean-pooled joint-layer output), ``joint`` (the
audio+video stream), ``z_a``, ``z_v`` (the contrastive space; for a fine-tuning checkpoint,
which has no projections, the normalised ``audio`` / ``video``). Raw videos go through
``engine/data/preprocess.py`` with the checkpoint's own data settings -- the same code and
settings as ``pcav preprocess`` and ``pcav explain`` -- so a clip gives the same numbers
whether it comes from a manifest or from its video file.

Large folders are resumable: clips are embedded in chunks, each chunk is written atomically
to a work folder next to the output (``.NAME.work/``) and skipped on a rerun, as are the clips
already preprocessed; the work folder is removed once the output is complete.

Output: ``--out DIR`` gets ``FEATURE.npy`` (``(N, width)`` float32, row i = clip i) and
``index.csv`` (``row,id,labels,source``); ``--out FILE.safetensors`` gets one tensor per
feature, the clip ids in its metadata, and ``FILE.csv`` as the index.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import safetensors.torch as st
import torch
from torch.utils.data import Subset

from pcavmae_cli.engine.chunks import chunk_key, run_chunks
from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.data.manifest import atomic_write_text
from pcavmae_cli.engine.data.preprocess import preprocess
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.files import atomic_write
from pcavmae_cli.engine.evaluate.predict import FEATURES, clip_features
from pcavmae_cli.engine.evaluate.runner import Checkpoint, checkpoint_recipe, open_checkpoint
from pcavmae_cli.engine.model import PCAVMAE, Backbone
from pcavmae_cli.engine.progress import ProgressReporter as Reporter
from pcavmae_cli.engine.progress import default_reporter
from pcavmae_cli.engine.schema import Recipe
from pcavmae_cli.engine.tensor_io import read_safetensors, save_safetensors
from pcavmae_cli.engine.train import checkpoint as ckpt
from pcavmae_cli.engine.train.data import close_loader, embed_loader
from pcavmae_cli.engine.train.runtime import resolve_runtime

Format = Literal["npy", "safetensors"]


@dataclass
class EmbedResult:
    out: Path
    files: list[Path]
    n_clips: int
    widths: dict[str, int]  # feature -> width
    chunks_done: int  # embedded in this run
    chunks_skipped: int  # found finished from an interrupted run
    failures: Path | None  # raw videos: failures.jsonl of the clips that could not be preprocessed
    n_failed: int


def feature_backbone(cp: Checkpoint, cfg: Recipe) -> Backbone:
    """The backbone of a checkpoint, strictly loaded on the CPU.

    A fine-tuning checkpoint has the encoders and the joint layer but no projections: its
    backbone is built without projection heads and loaded from every key except the head's.
    """
    path = cp.folder / "model.safetensors"
    if cp.kind == "pretrain":
        model = PCAVMAE(cfg.model)
        ckpt.load_module(path, model, torch.device("cpu"))
        return model.backbone
    mcfg = dataclasses.replace(cfg.model, projection_heads=False, proj_dim=cfg.model.embed_dim)
    backbone = Backbone(mcfg)
    state = {k: v for k, v in read_safetensors(path).items() if not k.startswith("head.")}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{path} does not fit the recipe's model ({str(exc).splitlines()[0]})") from None
    return backbone


def work_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.work"


def _save_chunk(path: Path, feats: dict[str, torch.Tensor], ids: list[str], key: str) -> None:
    save_safetensors({k: v.contiguous() for k, v in feats.items()}, path, metadata={"ids": json.dumps(ids), "key": key})


def _load_chunk(path: Path, ids: list[str], key: str) -> dict[str, torch.Tensor] | None:
    """A finished chunk, or ``None`` when absent or written for other clips or settings."""
    if not path.is_file():
        return None
    try:
        with st.safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("key") != key or json.loads(meta.get("ids", "[]")) != ids:
                return None
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception:  # a torn file from a crash: redo it
        return None


def _write_npy(array: np.ndarray, path: Path) -> None:
    with open(path, "wb") as fh:  # a file object: np.save would add ".npy" to a temporary's name
        np.save(fh, array)


def write_output(out: Path, fmt: Format, feats: dict[str, torch.Tensor], records, source: str) -> list[Path]:
    """The embeddings and their index CSV (module docstring)."""
    index = out / "index.csv" if fmt == "npy" else out.with_suffix(".csv")
    files = []
    if fmt == "npy":
        out.mkdir(parents=True, exist_ok=True)
        for name, value in feats.items():
            path = out / f"{name}.npy"
            atomic_write(path, functools.partial(_write_npy, value.numpy().astype(np.float32)))
            files.append(path)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: v.contiguous() for k, v in feats.items()}, out,
                         metadata={"ids": json.dumps([r.id for r in records]), "source": source})  # fmt: skip
        files.append(out)
    rows = [["row", "id", "labels", "source"]]
    rows += [[str(i), r.id, ";".join(r.labels), r.source or ""] for i, r in enumerate(records)]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    atomic_write_text(index, buf.getvalue())
    return [*files, index]


def embed(
    checkpoint: str | Path,
    out: str | Path,
    *,
    data: str | Path | None = None,
    videos: str | Path | None = None,
    fmt: Format | None = None,
    frames: Literal["all", "middle"] | None = None,
    chunk: int = 256,
    jobs: int | None = None,
    overrides: Sequence[str] = (),
    reporter: Reporter | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> EmbedResult:
    """Embed the clips of manifest ``data`` or of the video folder ``videos`` with ``checkpoint``.

    Args:
        fmt: ``"npy"`` (``out`` a folder) or ``"safetensors"`` (``out`` a file); default from
            ``out``'s suffix.
        frames: ``"all"`` (features averaged over the clip's frames) or ``"middle"``; default
            the checkpoint recipe's ``evaluate.frames``.
        chunk: clips per resumable chunk.
        jobs: ffmpeg processes for raw videos (default ``data.preprocess.jobs``).
        on_chunk: called with each chunk's number once it is saved (tests interrupt through it).
    """
    if (data is None) == (videos is None):
        raise UserError("give exactly one of --data MANIFEST and --videos DIR")
    if chunk < 1:
        raise UserError(f"--chunk must be >= 1, got {chunk}")
    out = Path(out)
    fmt = fmt or ("safetensors" if out.suffix == ".safetensors" else "npy")
    if fmt not in ("npy", "safetensors"):
        raise UserError(f"--format: expected npy or safetensors, got '{fmt}'")
    if fmt == "safetensors" and out.suffix != ".safetensors":
        raise UserError(f"--out {out}: a safetensors output is a file ending in .safetensors")
    reporter = default_reporter(reporter)
    cp = open_checkpoint(checkpoint)
    cfg = checkpoint_recipe(cp.folder, overrides)
    policy = frames or cfg.evaluate.frames
    work = work_folder(out)
    failures, n_failed = None, 0
    if videos is not None:
        videos = Path(videos)
        if not videos.is_dir():
            raise UserError(f"--videos {videos}: not a folder")
        from pcavmae_cli.engine.data.preprocess import list_inputs

        inputs = list_inputs(videos, exclude=(work, out))
        with reporter.progress(f"preprocess {videos.name}", len(inputs)) as advance:
            report = preprocess(inputs, work / "clips", cfg.data, jobs=jobs, progress=advance)
        manifest, failures, n_failed = report.manifest, report.failures_path, sum(report.failures.values())
        if report.n_done + report.n_skipped == 0:
            raise UserError(f"--videos {videos}: no clip could be preprocessed; see {failures}")
    else:
        manifest = Path(data)
    dataset = AudioVisualDataset(manifest, cfg.data, frames=policy, compact=True)
    n = len(dataset)
    if n == 0:
        raise UserError(f"{manifest}: no clips to embed")
    rt = resolve_runtime(cfg.train, cfg.model)
    backbone = feature_backbone(cp, cfg).to(rt.device).eval()
    key = chunk_key(cp.folder / "model.safetensors", policy, str(manifest.resolve()), n, rt.precision)
    (work / "chunks").mkdir(parents=True, exist_ok=True)
    starts = list(range(0, n, chunk))

    def chunk_ids(number: int) -> list[str]:
        return [r.id for r in dataset.records[starts[number] : starts[number] + chunk]]

    def chunk_path(number: int) -> Path:
        return work / "chunks" / f"chunk-{number:06d}.safetensors"

    def compute(number: int, check: Callable[[], None]) -> dict[str, torch.Tensor]:
        start, stop = starts[number], min(starts[number] + chunk, n)
        loader = embed_loader(Subset(dataset, range(start, stop)), cfg.data.loader, rt)
        try:
            feats = clip_features(backbone, loader, rt, data=cfg.data, rows=stop - start, first_row=start, check=check)
        finally:
            close_loader(loader)
        _save_chunk(chunk_path(number), feats, chunk_ids(number), key)
        return feats

    # Ctrl-C / SIGTERM: the chunk being embedded is dropped, the finished ones stay for a rerun.
    with reporter.progress(f"embed {n} clips", n) as advance:
        run = run_chunks([min(chunk, n - s) for s in starts], lambda i: _load_chunk(chunk_path(i), chunk_ids(i), key),
                         compute, advance, unit="clips", on_chunk=on_chunk)  # fmt: skip
    parts, done, skipped = run.parts, run.done, run.skipped
    feats = {name: torch.cat([p[name] for p in parts]) for name in FEATURES}
    source = str(videos if videos is not None else manifest)
    files = write_output(out, fmt, feats, dataset.records, source)
    from pcavmae_cli.engine.search import meta_path  # the sidecar pcav search reads: which model made this

    meta = {"checkpoint": str(cp.folder.resolve()), "kind": cp.kind, "frames": policy, "source": source,
            "precision": rt.precision,  # precision auto follows the machine (runtime.py)
            "widths": {name: int(v.shape[1]) for name, v in feats.items()}}  # fmt: skip
    files.append(atomic_write_text(meta_path(out), json.dumps(meta, indent=2) + "\n"))
    if failures is not None and n_failed:
        kept = (out if fmt == "npy" else out.parent) / ("failures.jsonl" if fmt == "npy" else f"{out.stem}.failures.jsonl")
        shutil.copyfile(failures, kept)
        failures = kept
        files.append(kept)
    else:
        failures = None
    shutil.rmtree(work, ignore_errors=True)
    widths = {name: int(v.shape[1]) for name, v in feats.items()}
    return EmbedResult(out, files, n, widths, done, skipped, failures, n_failed)
