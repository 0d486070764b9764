"""Where a dataset gets a clip's raw media: per-clip files (plain) or shards (packed).

Both stores hand the dataset the same two things, which it then turns into a sample with the
same code (``dataset.AudioVisualDataset``):

- ``log_mel(i, record)``: ``(frames, num_mel_bins)`` log-Mel, before padding and
  normalisation (``fbank.log_mel``), in the store's dtype: float32 (plain) or float16 (packed),
  widened only where it is normalised, so that a loader ships half the bytes from a pack;
- ``frame_bytes(i, record, k)``: ``(bytes,)`` uint8, the JPEG of frame ``k``, and a name for errors.

A store opens its files lazily, in the process that reads them: a DataLoader worker gets a copy
of the dataset without open memory maps, and maps the shards it needs itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.io import read_file

from pcavmae_cli.engine.data import fbank as fb
from pcavmae_cli.engine.data import pack
from pcavmae_cli.engine.data.audio_io import read_wav
from pcavmae_cli.engine.data.manifest import ClipRecord
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.schema import DataConfig


class PlainStore:
    """The per-clip layout of ``pcav preprocess``: a WAV and JPEG files per clip."""

    layout = "plain"

    def __init__(self, root: Path, data: DataConfig):
        self.root, self.data = root, data

    def log_mel(self, i: int, record: ClipRecord) -> torch.Tensor:
        rate = self.data.audio.sample_rate
        return fb.log_mel(read_wav(record.audio_path(self.root), rate), rate, self.data.audio.fbank)

    def frame_bytes(self, i: int, record: ClipRecord, k: int) -> tuple[torch.Tensor, str]:
        path = record.frame_path(self.root, k)
        try:
            return read_file(str(path)), str(path)
        except RuntimeError:
            raise UserError(f"frame not found: {path}") from None


class _Shard:
    """One shard's memory maps (``pack`` module docstring)."""

    def __init__(self, files: dict[str, Path]):
        try:
            self.fbank = np.load(files["fbank.npy"], mmap_mode="r")
            self.clips = np.load(files["clips.npy"], mmap_mode="r")
            self.frames = np.load(files["frames.npy"], mmap_mode="r")
            self.blob = np.memmap(files["frames.bin"], dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise UserError(f"damaged pack shard {files['fbank.npy'].parent}: {exc}") from None


class PackStore:
    """The packed layout of ``pcav preprocess --pack`` / ``pcav pack``."""

    layout = "packed"

    def __init__(self, index: pack.PackIndex, data: DataConfig):
        index.check(data)
        self.index = index
        self._shards: dict[int, _Shard] = {}

    def __getstate__(self) -> dict:  # workers map the shards themselves
        return {**self.__dict__, "_shards": {}}

    def _locate(self, i: int) -> tuple[_Shard, int]:
        s, row = divmod(i, self.index.clips_per_shard)
        if s not in self._shards:
            self._shards[s] = _Shard(pack.shard_files(self.index.folder, self.index.shards[s]))
        return self._shards[s], row

    def log_mel(self, i: int, record: ClipRecord) -> torch.Tensor:
        shard, row = self._locate(i)
        first, rows = int(shard.clips[row, 0]), int(shard.clips[row, 1])
        # A copy of the float16 rows: torch would otherwise alias the read-only map (and warn).
        return torch.from_numpy(np.array(shard.fbank[first : first + rows]))

    def frame_bytes(self, i: int, record: ClipRecord, k: int) -> tuple[torch.Tensor, str]:
        shard, row = self._locate(i)
        offset, size = (int(v) for v in shard.frames[int(shard.clips[row, 2]) + k])
        data = torch.frombuffer(bytearray(shard.blob[offset : offset + size]), dtype=torch.uint8)
        return data, f"pack {self.index.folder}, clip {record.id}, frame {k}"


def open_store(manifest: Path, data: DataConfig) -> tuple[PlainStore | PackStore, Path]:
    """The store of ``manifest`` (a plain manifest or a pack index) and the manifest of its clips."""
    if pack.is_pack_index(manifest):
        index = pack.PackIndex.read(manifest)
        return PackStore(index, data), index.folder / pack.MANIFEST
    return PlainStore(manifest.parent, data), manifest
