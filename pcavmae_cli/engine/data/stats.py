"""Corpus statistics of the log-Mel features, for a recipe's ``data.audio.fbank.mean/std``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


from pcavmae_cli.engine.data import fbank as fb
from pcavmae_cli.engine.data.audio_io import read_wav
from pcavmae_cli.engine.data.manifest import read_manifest
from pcavmae_cli.engine.schema import DataConfig


@dataclass
class FbankStats:
    mean: float
    std: float
    n_clips: int
    n_values: int


def fbank_stats(
    manifest: str | Path,
    cfg: DataConfig,
    max_clips: int | None = None,
    progress: Callable[..., None] | None = None,
) -> FbankStats:
    """Exact mean and standard deviation of the padded log-Mel values the model is fed.

    Computed on ``fit_length(log_mel(...))``, the tensor that ``normalise`` is applied to,
    so that normalised inputs have mean 0 and std ``1 / std_scale`` over the corpus. Sums
    run in float64. ``max_clips`` takes an evenly spaced subset of a large corpus.
    """
    records = read_manifest(manifest)
    if max_clips is not None and max_clips < len(records):
        step = len(records) / max_clips
        records = [records[int(i * step)] for i in range(max_clips)]
    root = Path(manifest).parent
    rate = cfg.audio.sample_rate
    total = total_sq = 0.0
    count = 0
    for record in records:
        values = fb.fit_length(fb.log_mel(read_wav(record.audio_path(root), rate), rate, cfg.audio.fbank),
                               cfg.audio.fbank.target_frames).double()
        total += values.sum().item()
        total_sq += values.square().sum().item()
        count += values.numel()
        if progress:
            progress(1, record.id)
    mean = total / count
    variance = max(total_sq / count - mean * mean, 0.0)
    return FbankStats(mean=mean, std=math.sqrt(variance), n_clips=len(records), n_values=count)
