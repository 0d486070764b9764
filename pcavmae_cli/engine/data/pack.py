"""The packed layout: a preprocessed corpus as large shards that a loader reads with little CPU.

The plain layout costs a loader, per sample, one WAV read and one Kaldi fbank (about 8 ms of
the 10-13 ms a sample takes on a 2-core Xeon, docs/benchmarks.md "Data path") plus one JPEG
file. A pack keeps the fbank already computed and the JPEGs in a few large files, so a sample
is a memory-mapped read, one JPEG decode and a crop.

Layout under PACK (``pcav preprocess SRC OUT --pack`` writes ``OUT/pack``)::

    index.json              format, version, the settings the shards depend on, the shards
    manifest.jsonl          the packed clips (ClipRecord lines), paths relative to PACK, so the
                            per-clip files still resolve and every manifest reader works
    failures.jsonl          clips that could not be packed (unreadable audio or frames)
    shard-00000.fbank.npy   float16 (rows, num_mel_bins): each clip's log-Mel one after the
                            other, before padding and before normalisation
    shard-00000.frames.bin  the clips' JPEG frames, the bytes preprocessing wrote
    shard-00000.clips.npy   int64 (clips, 4): first fbank row, fbank rows, first frame, frames
    shard-00000.frames.npy  int64 (frames, 2): byte offset in frames.bin, byte length

Why these choices:

- the log-Mel is stored *un-normalised and un-padded*, so the recipe's ``mean``, ``std``,
  ``std_scale`` and ``target_frames`` still apply at load time (``pcav stats`` of a new corpus
  needs no re-pack); the settings it was computed with are in the index and a recipe that
  differs is refused, naming the key;
- float16 halves the disk and page-cache size, and the bytes a loader worker sends (it ships
  the fbank in the store's dtype, ``dataset`` docstring); the normalised fbank equals the
  plain layout's within float16 rounding of the log-Mel: ``|packed - plain| <= |log_mel| *
  2**-11 / (std * std_scale) + 1e-6`` (half a float16 ulp, relative, plus float32 rounding of the
  normalisation; at most 1.1e-3 on the demo corpus with ``std_scale: 1``, where silence is
  log(eps) = -15.9; the values have a standard deviation near ``1 / std_scale``).
  tests/test_pack.py checks the bound, and that the packed fbank is exactly the plain one with
  its log-Mel rounded to float16;
- the frames are the *same JPEG bytes* decoded and cropped by the same ``frames.decode_crop``,
  so frames are bit-identical to the plain layout's, as uint8 crops and normalised
  (re-encoding the crop would not be);
- with ``dither > 0`` (off in every shipped recipe) a pack freezes one random draw of the
  dither per clip, where the plain layout draws anew at each visit;
- a shard holds a fixed number of clips (``data.pack.clips_per_shard``), so clip ``i`` is in
  shard ``i // clips_per_shard`` without a lookup; each shard's fingerprint (its records, the
  sizes and times of their files, the settings) lets a re-run keep the shards that did not change.

Shards are written to temporary names and renamed; ``index.json`` is written last, so a pack
with an index is complete. Ctrl-C (or SIGTERM) lets the shards being written finish, writes the
fingerprints of the finished ones to ``.partial.json`` and raises ``Stopped``; a rerun keeps
those shards. One ``pack`` at a time writes into a folder (``engine/folder_lock.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import wave
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from pcavmae_cli.engine.data import fbank as fb
from pcavmae_cli.engine.data import manifest
from pcavmae_cli.engine.data.audio_io import read_wav
from pcavmae_cli.engine.data.manifest import ClipRecord, Failure
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.folder_lock import folder_lock
from pcavmae_cli.engine.interrupt import StopRequests, Stopped, run_pool
from pcavmae_cli.engine.schema import DataConfig

FORMAT = "pcav-pack"
VERSION = 1
INDEX = "index.json"
MANIFEST = "manifest.jsonl"
FAILURES = "failures.jsonl"
PARTIAL = ".partial.json"  # the finished shards of an interrupted run
FBANK_DTYPE = "float16"
# The fbank settings the stored log-Mel depends on (not target_frames nor the normalisation).
LOG_MEL_KEYS = (
    "num_mel_bins", "frame_length_ms", "frame_shift_ms", "window_type", "dither", "use_energy", "htk_compat",
    "subtract_waveform_mean",
)  # fmt: skip

Progress = Callable[..., None]


def shard_files(pack: Path, shard: str) -> dict[str, Path]:
    """The four files of shard ``shard`` (e.g. ``shard-00000``)."""
    return {part: pack / f"{shard}.{part}" for part in ("fbank.npy", "frames.bin", "clips.npy", "frames.npy")}


def log_mel_settings(data: DataConfig) -> dict:
    """What the stored log-Mel depends on: the sample rate and the ``LOG_MEL_KEYS`` of the recipe."""
    fbank = asdict(data.audio.fbank)
    return {"sample_rate": data.audio.sample_rate, "fbank": {k: fbank[k] for k in LOG_MEL_KEYS}}


def is_pack_index(path: str | Path) -> bool:
    """Whether ``path`` names a pack (its ``index.json``, or the pack folder) rather than a manifest."""
    path = Path(path)
    return path.name == INDEX or (path.is_dir() and (path / INDEX).is_file())


@dataclass
class PackIndex:
    """A pack's ``index.json``, read and checked."""

    folder: Path
    clips_per_shard: int
    n_clips: int
    shards: list[str]
    settings: dict

    @classmethod
    def read(cls, path: str | Path) -> PackIndex:
        path = Path(path)
        if path.is_dir():
            path = path / INDEX
        if not path.is_file():
            raise UserError(f"pack index not found: {path}")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise UserError(f"{path}: not a pcav pack index (no \"format\": \"{FORMAT}\")")
            if data.get("version") != VERSION:
                raise UserError(f"{path}: pack version {data.get('version')}, this pcav reads {VERSION}; re-pack it")
            return cls(path.parent, int(data["clips_per_shard"]), int(data["n_clips"]),
                       [s["name"] for s in data["shards"]], data["settings"])  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{path}: damaged pack index ({exc})") from None

    def check(self, data: DataConfig) -> None:
        """Refuse a recipe whose log-Mel settings differ from those the pack was built with."""
        want = log_mel_settings(data)
        if want["sample_rate"] != self.settings["sample_rate"]:
            raise UserError(f"pack {self.folder} was built with data.audio.sample_rate={self.settings['sample_rate']}, "
                            f"the recipe has {want['sample_rate']}; re-pack it with this recipe")  # fmt: skip
        for key, value in want["fbank"].items():
            if self.settings["fbank"].get(key) != value:
                raise UserError(f"pack {self.folder} was built with data.audio.fbank.{key}="
                                f"{self.settings['fbank'].get(key)}, the recipe has {value}; re-pack it with this recipe")  # fmt: skip


# --- writing ------------------------------------------------------------------------------


@dataclass
class PackReport:
    index: Path
    n_clips: int
    n_shards: int
    n_written: int  # shards written now
    n_kept: int  # shards unchanged since the last run
    failures: list[Failure]


def _relocate(record: ClipRecord, src_root: Path, pack: Path) -> ClipRecord:
    """``record`` with its paths relative to ``pack`` instead of ``src_root`` (absolute ones kept)."""

    def move(p: str) -> str:
        return p if os.path.isabs(p) else os.path.relpath(src_root / p, pack)

    return replace(record, video=move(record.video), audio=move(record.audio))


def _readable(record: ClipRecord, root: Path) -> Failure | None:
    """A cheap check that a clip's WAV opens and its JPEGs exist, before shards are laid out."""
    audio = record.audio_path(root)
    try:
        with wave.open(str(audio), "rb"):
            pass
    except (OSError, wave.Error, EOFError) as exc:
        return Failure(str(audio), "unreadable_audio", str(exc), record.id)
    if record.n_frames < 1:
        return Failure(str(record.frame_path(root, 0).parent), "no_frames", "the manifest lists no frames", record.id)
    for k in range(record.n_frames):
        path = record.frame_path(root, k)
        try:
            with path.open("rb") as fh:
                if fh.read(2) != b"\xff\xd8":
                    return Failure(str(path), "not_a_jpeg", "the file does not start with a JPEG marker", record.id)
        except OSError as exc:
            return Failure(str(path), "unreadable_frame", exc.strerror or str(exc), record.id)
    return None


def _fingerprint(records: list[ClipRecord], root: Path, settings: dict) -> str:
    """What a shard's content depends on: settings, records, and the size and time of their files."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for r in records:
        h.update(r.to_json().encode())
        for path in [r.audio_path(root)] + [r.frame_path(root, k) for k in range(r.n_frames)]:
            st = path.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _write_shard(pack: Path, name: str, records: list[ClipRecord], root: Path, data: DataConfig) -> None:
    """Compute and write one shard's four files (temporary names, then renamed)."""
    rate, cfg = data.audio.sample_rate, data.audio.fbank
    mels, blobs, clips, frames = [], [], [], []
    row = byte = 0
    for r in records:
        log_mel = fb.log_mel(read_wav(r.audio_path(root), rate), rate, cfg)
        mels.append(log_mel.numpy().astype(np.float16))
        clips.append((row, log_mel.shape[0], len(frames), r.n_frames))
        row += log_mel.shape[0]
        for k in range(r.n_frames):
            blob = r.frame_path(root, k).read_bytes()
            frames.append((byte, len(blob)))
            blobs.append(blob)
            byte += len(blob)
    files = shard_files(pack, name)
    tmp = {part: path.with_name(f".{path.name}.tmp") for part, path in files.items()}
    with tmp["fbank.npy"].open("wb") as fh:
        np.save(fh, np.concatenate(mels))
    with tmp["frames.bin"].open("wb") as fh:
        fh.writelines(blobs)
    with tmp["clips.npy"].open("wb") as fh:
        np.save(fh, np.asarray(clips, dtype=np.int64).reshape(-1, 4))
    with tmp["frames.npy"].open("wb") as fh:
        np.save(fh, np.asarray(frames, dtype=np.int64).reshape(-1, 2))
    for part, path in files.items():
        os.replace(tmp[part], path)


def _previous_fingerprints(pack: Path) -> dict[str, str]:
    """The shards a complete earlier run (its index) or an interrupted one (``PARTIAL``) wrote."""
    try:
        data = json.loads((pack / INDEX).read_text())
        return {s["name"]: s["fingerprint"] for s in data["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        shards = json.loads((pack / PARTIAL).read_text())["shards"]
        return {str(name): str(fingerprint) for name, fingerprint in shards.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def pack_manifest(
    manifest_path: str | Path,
    out: str | Path,
    data: DataConfig,
    *,
    jobs: int | None = None,
    progress: Progress | None = None,
) -> PackReport:
    """Pack the clips of a plain manifest into ``out`` (a folder; ``out/index.json`` is the index).

    Args:
        data: the recipe's ``data`` section: fbank settings, ``pack.clips_per_shard``.
        jobs: shards written at once (threads; torch's fbank releases the GIL); 0 means one per
            CPU core; default ``data.preprocess.jobs``.
        progress: called as ``progress(n, note)`` with the clips of each finished shard.
    """
    manifest_path, pack = Path(manifest_path), Path(out)
    per_shard = data.pack.clips_per_shard
    if per_shard < 1:
        raise UserError(f"key 'data.pack.clips_per_shard' must be >= 1, got {per_shard}")
    jobs = data.preprocess.jobs if jobs is None else jobs
    if jobs < 0:
        raise UserError(f"--jobs must be >= 0, got {jobs}")
    records = manifest.read_manifest(manifest_path)
    with folder_lock(pack):
        return _pack(records, manifest_path, pack, data, jobs, progress)


def _pack(
    records: list[ClipRecord], manifest_path: Path, pack: Path, data: DataConfig, jobs: int, progress: Progress | None
) -> PackReport:
    """``pack_manifest`` once the pack folder is locked."""
    src_root, per_shard = manifest_path.parent, data.pack.clips_per_shard
    settings = log_mel_settings(data)

    good, failures = [], []
    for r in records:
        failure = _readable(r, src_root)
        failures.append(failure) if failure else good.append(r)
    if not good:
        manifest.write_lines(pack / FAILURES, failures)
        raise UserError(f"no clip of {manifest_path} could be packed; the reasons are in {pack / FAILURES}")
    groups = [good[i : i + per_shard] for i in range(0, len(good), per_shard)]
    names = [f"shard-{i:05d}" for i in range(len(groups))]
    prints = [_fingerprint(g, src_root, settings) for g in groups]
    before = _previous_fingerprints(pack)
    todo = [i for i, name in enumerate(names)
            if before.get(name) != prints[i] or not all(p.is_file() for p in shard_files(pack, name).values())]  # fmt: skip
    (pack / INDEX).unlink(missing_ok=True)  # from here the pack is incomplete until the new index
    if progress and len(todo) < len(groups):
        progress(sum(len(groups[i]) for i in range(len(groups)) if i not in todo), "unchanged shards")

    finished = {names[i]: prints[i] for i in range(len(groups)) if i not in todo}

    def settle(i: int, _: None) -> None:
        finished[names[i]] = prints[i]
        if progress:
            progress(len(groups[i]), names[i])

    def write(i: int) -> None:
        _write_shard(pack, names[i], groups[i], src_root, data)

    with StopRequests() as stop:
        late = run_pool(write, todo, jobs or os.cpu_count() or 1, settle, stop)
    if stop.reason is not None:
        finished.update((names[i], prints[i]) for i, _ in late)  # shard writes are not cut short
        manifest.atomic_write_text(pack / PARTIAL, json.dumps({"shards": finished}, indent=1) + "\n")
        n_done = sum(len(g) for name, g in zip(names, groups) if name in finished)
        raise Stopped(n_done, len(good), "clips", stop.reason)
    for stale in pack.glob("shard-*"):  # shards of an earlier, larger corpus
        if stale.name.split(".")[0] not in names:
            stale.unlink()
    for tmp in pack.glob(".shard-*.tmp"):  # left by an interrupted run
        tmp.unlink()

    manifest.write_lines(pack / MANIFEST, [_relocate(r, src_root, pack) for r in good])
    manifest.write_lines(pack / FAILURES, failures)
    index = {
        "format": FORMAT, "version": VERSION, "fbank_dtype": FBANK_DTYPE, "clips_per_shard": per_shard,
        "n_clips": len(good), "settings": settings, "source": str(manifest_path),
        "shards": [{"name": n, "clips": len(g), "fingerprint": f} for n, g, f in zip(names, groups, prints)],
    }  # fmt: skip
    manifest.atomic_write_text(pack / INDEX, json.dumps(index, indent=1) + "\n")
    (pack / PARTIAL).unlink(missing_ok=True)
    return PackReport(pack / INDEX, len(good), len(groups), len(todo), len(groups) - len(todo), failures)
