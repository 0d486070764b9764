"""``pcav predict``: class scores for the user's own videos, of any length, resumably.

A video is cut into windows of ``data.clip_seconds`` (10 s) every ``hop`` seconds (default: the
window length, no overlap); the last window ends at the video's end, so the tail is covered by
a whole window unless under ``TAIL_SLACK`` (a video shorter than a window is one window, padded as preprocessing pads).
Each window is scored as ``pcav evaluate`` scores a clip (``inference.Model.scores``: the
frames' probabilities averaged, or the middle frame's), and the video's score is the **mean**
(default) or the **max** over its windows, per class. Max suits multi-label tasks where an
event anywhere counts ("is there a dog bark in this hour?"); mean is the single-label choice.

Work is done in chunks of videos: probe, preprocess the chunk's windows into a work folder next
to the output (``.NAME.work/``), score them, save the chunk's scores atomically, delete its
clips. A rerun (after Ctrl-C, a crash or a kill) skips the finished chunks, so a folder of
100 000 videos costs at most one chunk twice, and the disk holds one chunk's clips at a time.
Every video that yields no window is listed with its reason (``FILE.failures.jsonl``); a video
with some damaged windows is scored from the others, and its record says how many were lost.

Outputs (``--out FILE``): ``.csv`` one row per (video, rank): ``video,rank,mid,label,score,
windows,source``; ``.jsonl`` one object per video with its top classes and every window's
top classes and span; ``FILE.timelines/VIDEO.png`` for each video of several windows: its
top classes over time.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import safetensors.torch as st
import torch

from pcavmae_cli.engine.chunks import chunk_key, run_chunks
from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.data.manifest import Failure, atomic_write_text, read_manifest
from pcavmae_cli.engine.data.preprocess import ClipInput, Inputs, clip_id_of_stem, list_folder, preprocess
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.inference import FramePolicy, Model, TopClass
from pcavmae_cli.engine.interrupt import StopRequests
from pcavmae_cli.engine.media import ProbeError, probe
from pcavmae_cli.engine.progress import ProgressReporter as Reporter
from pcavmae_cli.engine.progress import default_reporter
from pcavmae_cli.engine.tensor_io import save_safetensors
from pcavmae_cli.engine.train.data import close_loader, embed_loader

Aggregate = Literal["mean", "max"]
WINDOW_MARK = ".w"  # window k of video V is the clip "V.w0003"
TAIL_SLACK = 0.5  # seconds at a video's end that may stay outside every window (no extra window for them)


def plan_windows(duration: float | None, window: float, hop: float) -> list[tuple[float, float]]:
    """``(start, end)`` spans covering ``[0, duration]``: every ``hop`` seconds, the last one
    ending at ``duration`` (when more than ``TAIL_SLACK`` would be left out); one window when the
    video is no longer than ``window`` (or has no known duration)."""
    if window <= 0 or hop <= 0:
        raise UserError(f"window and hop must be > 0 seconds, got {window} and {hop}")
    if duration is None or duration <= window:
        return [(0.0, window)]
    starts, t = [], 0.0
    while t + window < duration - 1e-6:
        starts.append(t)
        t += hop
    last = max(duration - window, 0.0)
    if not starts or last - starts[-1] > TAIL_SLACK:
        starts.append(last)
    return [(round(s, 3), round(s + window, 3)) for s in starts]


@dataclass
class VideoResult:
    """One video's outcome."""

    video: str  # its id (the file stem, made safe)
    source: str  # the file, or the manifest it came from
    spans: list[tuple[float, float]] = field(default_factory=list)  # windows scored
    window_scores: torch.Tensor | None = None  # (n_windows, C)
    lost: int = 0  # windows that could not be read
    failure: Failure | None = None  # no window at all

    def scores(self, aggregate: Aggregate) -> torch.Tensor:
        assert self.window_scores is not None
        return self.window_scores.mean(dim=0) if aggregate == "mean" else self.window_scores.max(dim=0).values


@dataclass
class PredictResult:
    out: Path
    files: list[Path]
    videos: list[VideoResult]  # in input order, failures included
    top: dict[str, list[TopClass]]  # video id -> its top classes (videos with a score)
    aggregate: Aggregate
    chunks_done: int
    chunks_skipped: int
    failures: Path | None

    @property
    def n_failed(self) -> int:
        return sum(v.failure is not None for v in self.videos)


def _unique_inputs(paths: Sequence[str | Path]) -> list[ClipInput | Failure]:
    """Files given one by one: ids from their stems, made unique (``a``, ``a_2``, ...)."""
    items: list[ClipInput | Failure] = []
    taken: set[str] = set()
    for raw in paths:
        path = Path(raw)
        base = clip_id_of_stem(path.stem)
        clip_id, n = base, 1
        while clip_id in taken:
            n += 1
            clip_id = f"{base}_{n}"
        taken.add(clip_id)
        if not path.is_file():
            items.append(Failure(str(path), "not_found" if not path.exists() else "not_a_file", "", clip_id))
        else:
            items.append(ClipInput(clip_id, path.resolve()))
    return items


def list_videos(videos: Sequence[str | Path] = (), folder: str | Path | None = None,
                exclude: tuple[Path, ...] = ()) -> list[ClipInput | Failure]:  # fmt: skip
    """The videos to predict: files given by name, or every file directly in ``folder``."""
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"--videos {folder}: not a folder")
        return list_folder(folder, exclude)
    if not videos:
        raise UserError("no videos given: name video files, or pass --videos DIR or --data MANIFEST")
    return _unique_inputs(videos)


def _windows_of(item: ClipInput, window: float, hop: float) -> tuple[list[ClipInput], Failure | None]:
    try:
        info = probe(item.path)
    except ProbeError as exc:
        return [], Failure(str(item.path), exc.reason, exc.detail, item.id)
    spans = plan_windows(info.duration, window, hop)
    return [ClipInput(f"{item.id}{WINDOW_MARK}{k:04d}", item.path, seek=s, seek_end=e) for k, (s, e) in enumerate(spans)], None


@torch.no_grad()
def _score_manifest(model: Model, manifest: Path, frames: FramePolicy, check: Callable[[], None]) -> tuple[list[str], torch.Tensor]:
    """Every clip of ``manifest``: its id and class probabilities ``(N, C)``."""
    dataset = AudioVisualDataset(manifest, model.cfg.data, frames=frames, compact=True)
    n = len(dataset)
    ids = [r.id for r in dataset.records]
    scores = torch.zeros(n, len(model.label_set.mids))
    if n == 0:
        return ids, scores
    loader = embed_loader(dataset, model.cfg.data.loader, model.rt)
    try:
        for batch in loader:
            check()
            scores[batch["index"]] = model.scores(batch["fbank"], batch["frames"])
    finally:
        close_loader(loader)
    return ids, scores


@dataclass
class ChunkScores:
    """What one chunk of videos gave: a row per window read, and the windows or videos lost."""

    ids: list[str]  # window ids, "VIDEO.wKKKK"
    spans: list[tuple[float, float]]  # (start, end) seconds of each row's window
    scores: torch.Tensor  # (rows, C)
    failures: list[Failure]  # windows (or whole videos) that could not be read


def _run_chunk(model: Model, group: list[ClipInput | Failure], clips: Path, window: float, hop: float,
               frames: FramePolicy, jobs: int | None, check: Callable[[], None]) -> ChunkScores:  # fmt: skip
    """Probe, cut and preprocess a chunk's videos into ``clips``, then score every window."""
    failures = [x for x in group if isinstance(x, Failure)]
    windows: list[ClipInput] = []
    for item in group:
        if isinstance(item, ClipInput):
            check()
            found, failure = _windows_of(item, window, hop)
            windows += found
            failures += [failure] if failure is not None else []
    if not windows:
        return ChunkScores([], [], torch.zeros(0, len(model.label_set.mids)), failures)
    span_of = {w.id: (w.seek or 0.0, w.seek_end or window) for w in windows}
    src = windows[0].path.parent
    report = preprocess(Inputs(src, "folder", items=windows), clips, model.cfg.data, jobs=jobs)
    failures += [Failure(**json.loads(line)) for line in report.failures_path.read_text().splitlines() if line]
    ids, scores = _score_manifest(model, report.manifest, frames, check)
    return ChunkScores(ids, [span_of[i] for i in ids], scores, failures)


def _save_chunk(path: Path, key: str, chunk: ChunkScores) -> None:
    meta = {"key": key, "ids": json.dumps(chunk.ids), "spans": json.dumps(chunk.spans),
            "failures": json.dumps([json.loads(f.to_json()) for f in chunk.failures])}  # fmt: skip
    save_safetensors({"scores": chunk.scores.contiguous()}, path, metadata=meta)


def _load_chunk(path: Path, key: str) -> ChunkScores | None:
    """A finished chunk, or ``None`` when absent, torn, or saved for other videos or settings."""
    if not path.is_file():
        return None
    try:
        with st.safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("key") != key:
                return None
            spans = [tuple(s) for s in json.loads(meta["spans"])]
            failures = [Failure(**f) for f in json.loads(meta["failures"])]
            return ChunkScores(json.loads(meta["ids"]), spans, fh.get_tensor("scores"), failures)
    except Exception:  # a torn file from a crash: redo the chunk
        return None


def _collect(items: list[ClipInput | Failure], chunk: ChunkScores) -> list[VideoResult]:
    """Window rows -> one ``VideoResult`` per input video, in input order."""
    ids, scores, failures = chunk.ids, chunk.scores, chunk.failures
    rows: dict[str, list[int]] = {}
    for row, clip_id in enumerate(ids):
        rows.setdefault(clip_id.rsplit(WINDOW_MARK, 1)[0], []).append(row)
    lost: dict[str, list[Failure]] = {}
    for f in failures:
        lost.setdefault((f.id or "").rsplit(WINDOW_MARK, 1)[0], []).append(f)
    out = []
    for item in items:
        if isinstance(item, Failure):
            out.append(VideoResult(item.id or item.input, item.input, failure=item))
            continue
        mine = rows.get(item.id, [])
        result = VideoResult(item.id, str(item.path), lost=len(lost.get(item.id, [])))
        if mine:
            result.spans = [chunk.spans[r] for r in mine]
            result.window_scores = scores[mine]
        else:
            first = (lost.get(item.id) or [Failure(str(item.path), "no_window", "no window could be read", item.id)])[0]
            result.failure = Failure(str(item.path), first.reason, first.detail, item.id)
        out.append(result)
    return out


def _write_csv(path: Path, videos: list[VideoResult], top: dict[str, list[TopClass]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["video", "rank", "mid", "label", "score", "windows", "source"])
    for v in videos:
        for rank, t in enumerate(top.get(v.video, []), 1):
            writer.writerow([v.video, rank, t.mid, t.name, f"{t.score:.6f}", len(v.spans), v.source])
    atomic_write_text(path, buf.getvalue())


def _write_jsonl(path: Path, videos: list[VideoResult], top: dict[str, list[TopClass]], model: Model,
                 aggregate: Aggregate, top_k: int) -> None:  # fmt: skip
    lines = []
    for v in videos:
        if v.failure is not None:
            continue
        windows = [{"start": s, "end": e, "top": [vars(t) for t in model.prediction(row, top_k).top]}
                   for (s, e), row in zip(v.spans, v.window_scores)]  # fmt: skip
        lines.append(json.dumps({"video": v.video, "source": v.source, "aggregate": aggregate,
                                 "top": [vars(t) for t in top[v.video]], "windows_lost": v.lost,
                                 "windows": windows}, ensure_ascii=False))  # fmt: skip
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def work_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.work"


def predict(
    model: Model,
    out: str | Path,
    *,
    videos: Sequence[str | Path] = (),
    folder: str | Path | None = None,
    data: str | Path | None = None,
    top_k: int = 5,
    frames: FramePolicy = "all",
    hop: float | None = None,
    aggregate: Aggregate = "mean",
    chunk: int = 64,
    jobs: int | None = None,
    timelines: bool = True,
    reporter: Reporter | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> PredictResult:
    """Predict the classes of ``videos`` (files), of every file in ``folder``, or of every clip of
    the manifest ``data`` (module docstring); write ``out`` (``.csv`` or ``.jsonl``).

    Args:
        hop: seconds between window starts (default: the window length, ``data.clip_seconds``).
        chunk: videos per resumable chunk.
        jobs: ffmpeg processes (default ``data.preprocess.jobs``).
        on_chunk: called with each chunk's number once it is saved (tests interrupt through it).
    """
    out = Path(out)
    if out.suffix.lower() not in (".csv", ".jsonl"):
        raise UserError(f"--out {out}: expected a .csv or .jsonl file")
    if aggregate not in ("mean", "max"):
        raise UserError(f"--aggregate: expected mean or max, got '{aggregate}'")
    if frames not in ("all", "middle"):
        raise UserError(f"--frames: expected all or middle, got '{frames}'")
    if chunk < 1 or top_k < 1:
        raise UserError(f"--chunk and --top must be >= 1, got {chunk} and {top_k}")
    given = sum(x is not None for x in (videos or None, folder, data))
    if given != 1:
        what = "no videos given" if given == 0 else "more than one source given"
        raise UserError(f"{what}: name video files, or pass --videos DIR, or --data MANIFEST (one of them)")
    _ = model.classifier  # a pre-training run, or a run without labels, fails here, before any work
    reporter = default_reporter(reporter)
    window = model.cfg.data.clip_seconds
    hop = window if hop is None else hop
    work = work_folder(out)
    done = skipped = 0

    if data is not None:  # preprocessed clips: each is one window
        manifest = Path(data)
        records = read_manifest(manifest)
        items: list[ClipInput | Failure] = [ClipInput(r.id, manifest) for r in records]
        with StopRequests() as asked, reporter.progress(f"predict {len(records)} clips", 1) as advance:
            ids, scores = _score_manifest(model, manifest, frames, asked.check)
            advance(1)
        rows = ChunkScores([f"{i}{WINDOW_MARK}0000" for i in ids], [(0.0, window)] * len(ids), scores, [])
        videos_out = _collect(items, rows)
        for v in videos_out:
            v.source = str(manifest)
    else:
        items = list_videos(videos, folder, exclude=(out, work))
        groups = [items[i : i + chunk] for i in range(0, len(items), chunk)]
        (work / "chunks").mkdir(parents=True, exist_ok=True)
        weights = model.checkpoint.folder / "model.safetensors"
        keys = [chunk_key(weights, frames, window, hop, [x.id or "" for x in g], model.rt.precision) for g in groups]

        def chunk_path(number: int) -> Path:
            return work / "chunks" / f"chunk-{number:06d}.safetensors"

        def compute(number: int, check: Callable[[], None]) -> ChunkScores:
            found = _run_chunk(model, groups[number], work / "clips", window, hop, frames, jobs, check)
            _save_chunk(chunk_path(number), keys[number], found)
            shutil.rmtree(work / "clips", ignore_errors=True)  # one chunk's clips on disk at a time
            return found

        # Ctrl-C / SIGTERM: the chunk in progress is dropped, the finished ones stay for a rerun.
        with reporter.progress(f"predict {len(items)} videos", len(items)) as advance:
            run = run_chunks([len(g) for g in groups], lambda i: _load_chunk(chunk_path(i), keys[i]), compute, advance,
                             unit="videos", on_chunk=on_chunk)  # fmt: skip
        parts, done, skipped = run.parts, run.done, run.skipped
        n_classes = len(model.label_set.mids)
        merged = ChunkScores([i for p in parts for i in p.ids], [s for p in parts for s in p.spans],
                             torch.cat([p.scores for p in parts]) if parts else torch.zeros(0, n_classes),
                             [f for p in parts for f in p.failures])  # fmt: skip
        videos_out = _collect(items, merged)

    top = {v.video: model.prediction(v.scores(aggregate), top_k).top for v in videos_out if v.failure is None}
    files = [out]
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        _write_csv(out, videos_out, top)
    else:
        _write_jsonl(out, videos_out, top, model, aggregate, top_k)
    failures_path = None
    failed = [v.failure for v in videos_out if v.failure is not None]
    if failed:
        failures_path = out.with_name(out.stem + ".failures.jsonl")
        atomic_write_text(failures_path, "".join(f.to_json() + "\n" for f in failed))
        files.append(failures_path)
    if timelines:
        from pcavmae_cli.engine.viz.timeline import write_timelines

        files += write_timelines(out.with_name(out.stem + ".timelines"), videos_out, model, aggregate)
    shutil.rmtree(work, ignore_errors=True)
    return PredictResult(out, files, videos_out, top, aggregate, done, skipped, failures_path)
