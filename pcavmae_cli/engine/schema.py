"""The recipe schema: every key a recipe may hold, with its type.

This is the single list of settings. Fields carry no numeric defaults: the numbers live in
``recipes/*.yaml`` and nowhere else. A field typed ``X | None`` may be left out (it is then
``None``); every other field must be present, and ``config.build`` refuses unknown keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class FbankConfig:
    """Kaldi-compatible log-Mel filterbank (METHOD_NOTES, Inputs) and its normalisation."""

    num_mel_bins: int
    target_frames: int  # padded with zeros or cut to this many 10 ms frames
    frame_length_ms: float
    frame_shift_ms: float
    window_type: Literal["hanning", "hamming", "povey", "rectangular", "blackman"]
    dither: float
    use_energy: bool
    htk_compat: bool
    subtract_waveform_mean: bool  # remove the clip's mean sample value first, as CAV-MAE does
    mean: float  # corpus mean of the log-Mel values (`pcav stats` computes it)
    std: float  # corpus standard deviation of the log-Mel values
    std_scale: float  # normalised = (x - mean) / (std * std_scale); CAV-MAE and AST use 2


@dataclass
class AudioConfig:
    sample_rate: int  # preprocessing writes mono WAV at this rate; fbank reads it
    fbank: FbankConfig


@dataclass
class VideoConfig:
    fps: float  # frames sampled per second of the clip
    n_frames: int  # frames kept per clip
    short_side: int  # preprocessing resizes the shorter side to this many pixels
    crop_size: int  # the loader centre-crops a square of this side
    jpeg_quality: int  # ffmpeg -q:v, 2 (best) to 31
    mean: list[float]  # per-channel RGB mean in [0, 1] (ImageNet)
    std: list[float]


@dataclass
class PreprocessConfig:
    min_seconds: float  # clips shorter than this are failures; longer short clips are padded
    jobs: int  # parallel ffmpeg processes; 0 means one per CPU core


@dataclass
class LoaderConfig:
    batch_size: int
    num_workers: int
    train_frame: Literal["random", "middle"]  # which frame a training sample shows
    eval_frames: Literal["all", "middle"]  # evaluation: all frames (averaged) or the middle one


@dataclass
class DataConfig:
    clip_seconds: float
    label_mode: Literal["multi_hot", "single"]  # AudioSet: multi-hot + BCE; VGGSound: class index
    audio: AudioConfig
    video: VideoConfig
    preprocess: PreprocessConfig
    loader: LoaderConfig
    train_manifest: str | None = None
    eval_manifest: str | None = None
    label_csv: str | None = None  # AudioSet-style index,mid,display_name


@dataclass
class Recipe:
    """A whole recipe. ``extends: NAME`` in the YAML merges this recipe over another."""

    description: str
    seed: int
    data: DataConfig
