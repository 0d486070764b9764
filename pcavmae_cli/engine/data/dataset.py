"""The dataset every training and evaluation command reads: manifest in, tensors out.

A sample is a dict:
    ``fbank``:  ``(target_frames, num_mel_bins)`` normalised float32 log-Mel (``fbank.model_input``)
    ``frames``: ``(3, S, S)`` one normalised float32 frame, or ``(n_frames, 3, S, S)`` when all
                frames are asked for
    ``label``:  multi-hot float ``(num_classes,)`` or a class index (long), when labels are known
    ``index``:  position in the manifest (for prototype assignments and embeddings)

With ``compact=True`` (every DataLoader: training, the E-step, evaluation, embeddings) the same
sample before normalisation: ``frames`` the uint8 centre crop, ``fbank`` the padded or cut
log-Mel in the store's dtype (float16 from a pack, float32 from plain clips). That is a quarter
of the frame's bytes and half the fbank's (from a pack) through the worker->main queue, the
pinned copy and the copy to the device, which bound a worker on a small machine
(docs/benchmarks.md "Data path"); ``model_inputs.model_inputs`` normalises the batch on the
device. A normalised sample *is* a compact one normalised by the same functions
(``frames.normalise``, ``fbank.normalise``), so both paths give bit-identical inputs on the CPU.

A sample is asked for by its manifest position, or by a pair ``(index, seed)``: the random
training frame is then drawn from a generator seeded with ``seed`` instead of the global RNG,
so the trainer's sampler (``engine/train/data.py``) makes it a function of (recipe seed, epoch,
clip), whatever process or worker loads the clip, and a resumed run sees the same frames.

``manifest`` may be a plain ``manifest.jsonl`` or a pack's ``index.json`` (``pcav preprocess
--pack``, ``engine/data/pack.py``): the store (``clip_store``) differs, the sample does not.
Frames are bit-identical across layouts; the normalised fbank equals the plain one within
float16 rounding of the log-Mel (the bound is in ``pack``'s docstring).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset

from pcavmae_cli.engine.data import fbank as fb
from pcavmae_cli.engine.data import frames as fr
from pcavmae_cli.engine.data.clip_store import open_store
from pcavmae_cli.engine.data.manifest import ClipRecord, LabelSet, read_label_csv, read_manifest
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.schema import DataConfig

FrameChoice = Literal["random", "middle", "all"] | int


class AudioVisualDataset(Dataset):
    """Clips of one manifest, with the frame policy of training or of evaluation.

    Args:
        manifest: path of a ``manifest.jsonl``, or of a pack's ``index.json`` (the layout
            is recognised from the path; ``layout`` says which).
        cfg: the recipe's ``data`` section.
        frames: ``"random"`` (training: one random frame per visit), ``"middle"``, ``"all"``
            (evaluation: every frame, for averaging predictions) or a frame index.
        labels: the corpus's label set; ``None`` yields no ``label`` (pre-training).
        compact: samples before normalisation (uint8 frames, the store's fbank dtype), for a
            DataLoader whose batches go through ``model_inputs.model_inputs``; ``False``:
            normalised samples, for code that feeds one sample to a model or a figure.
    """

    def __init__(
        self, manifest: str | Path, cfg: DataConfig, frames: FrameChoice, labels: LabelSet | None = None,
        compact: bool = False,
    ):  # fmt: skip
        self.store, clips = open_store(Path(manifest), cfg)
        self.layout: str = self.store.layout
        self.root = clips.parent
        self.records: list[ClipRecord] = read_manifest(clips)
        self.cfg = cfg
        self.frames = frames
        self.labels = labels
        self.compact = compact
        self._label_index = labels.index() if labels else {}
        if labels is not None:
            for record in self.records:  # fail at start-up, not in the middle of an epoch
                self._label_target(record)

    @classmethod
    def for_split(cls, cfg: DataConfig, split: Literal["train", "eval"], compact: bool = False) -> "AudioVisualDataset":
        """The recipe's train or eval manifest with that split's frame policy."""
        manifest = cfg.train_manifest if split == "train" else cfg.eval_manifest
        if manifest is None:
            raise UserError(f"key 'data.{split}_manifest' is not set in the recipe")
        policy: FrameChoice = cfg.loader.train_frame if split == "train" else cfg.loader.eval_frames
        labels = read_label_csv(cfg.label_csv) if cfg.label_csv else None
        return cls(manifest, cfg, policy, labels, compact)

    def __len__(self) -> int:
        return len(self.records)

    def compact_view(self) -> "AudioVisualDataset":
        """The same clips, frame policy and store, yielding compact samples: for a DataLoader over a
        dataset that otherwise serves single normalised samples (the figures of ``engine/viz``)."""
        view = copy.copy(self)
        view.compact = True
        return view

    @property
    def frames_per_clip(self) -> int:
        """Frames each sample feeds the model: ``data.video.n_frames`` for ``"all"``, else one."""
        return self.cfg.video.n_frames if self.frames == "all" else 1

    def _frame_indices(self, record: ClipRecord, generator: torch.Generator | None = None) -> list[int]:
        n = record.n_frames
        if n < 1:
            raise UserError(f"clip {record.id}: manifest lists no frames")
        if self.frames == "all":
            # Clips with fewer frames than the recipe asks for repeat their last frame.
            return [min(k, n - 1) for k in range(self.cfg.video.n_frames)]
        if self.frames == "random":
            return [int(torch.randint(n, (), generator=generator).item())]
        if self.frames == "middle":
            return [n // 2]
        return [min(int(self.frames), n - 1)]

    def _label_target(self, record: ClipRecord) -> torch.Tensor:
        unknown = [m for m in record.labels if m not in self._label_index]
        if unknown:
            raise UserError(f"clip {record.id}: label {unknown[0]!r} is not in the label CSV")
        if self.cfg.label_mode == "single":
            if len(record.labels) != 1:
                raise UserError(
                    f"clip {record.id}: label_mode 'single' needs exactly one label, found {len(record.labels)}"
                )
            return torch.tensor(self._label_index[record.labels[0]], dtype=torch.long)
        target = torch.zeros(len(self._label_index), dtype=torch.float32)
        for mid in record.labels:
            target[self._label_index[mid]] = 1.0
        return target

    def targets(self) -> torch.Tensor:
        """Every clip's label target, stacked: ``(N, num_classes)`` multi-hot or ``(N,)`` indices.

        From the manifest alone (no media is read): balanced sampling and the probes use it.
        """
        if self.labels is None:
            raise UserError("this dataset was opened without a label set (data.label_csv)")
        return torch.stack([self._label_target(r) for r in self.records])

    def audio(self, index: int) -> torch.Tensor:
        """Log-Mel of clip ``index`` padded or cut to ``(target_frames, num_mel_bins)``, not
        normalised, in the store's dtype (``fbank.fit_length``)."""
        return fb.fit_length(self.store.log_mel(index, self.records[index]), self.cfg.audio.fbank.target_frames)

    def frame(self, index: int, k: int) -> torch.Tensor:
        """Frame ``k`` of clip ``index``: ``(3, crop_size, crop_size)`` uint8 (``frames.decode_crop``)."""
        data, name = self.store.frame_bytes(index, self.records[index], k)
        return fr.decode_crop(data, self.cfg.video, name)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """Sample ``key``: a manifest position, or ``(position, seed)`` for a seeded random frame."""
        index, seed = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), None)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        record = self.records[index]
        indices = self._frame_indices(record, generator)
        pictures = [self.frame(index, k) for k in indices]
        sample = {
            "fbank": self.audio(index),
            "frames": torch.stack(pictures) if self.frames == "all" else pictures[0],
            "index": torch.tensor(index, dtype=torch.long),
        }
        if not self.compact:
            sample["fbank"] = fb.normalise(sample["fbank"], self.cfg.audio.fbank)
            sample["frames"] = fr.normalise(sample["frames"], self.cfg.video)
        if self.labels is not None:
            sample["label"] = self._label_target(record)
        return sample
