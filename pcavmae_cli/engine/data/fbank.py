"""Audio features: Kaldi-compatible log-Mel filterbanks, sized and normalised for the model.

The settings (METHOD_NOTES, Inputs) are CAV-MAE's and AudioMAE's: 128 Mel bins, 25 ms
Hanning window, 10 ms shift, waveform mean removed first, no dither, no energy term,
htk_compat. They all come from ``FbankConfig`` so a recipe can change any of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchaudio.compliance import kaldi

from pcavmae_cli.engine.schema import FbankConfig


def log_mel(waveform: torch.Tensor, sample_rate: int, cfg: FbankConfig) -> torch.Tensor:
    """Log-Mel filterbank of a mono waveform, before padding and normalisation.

    Args:
        waveform: ``(1, samples)`` float waveform.
    Returns:
        ``(frames, num_mel_bins)``, one frame per ``frame_shift_ms``.
    """
    if cfg.subtract_waveform_mean:
        waveform = waveform - waveform.mean()
    return kaldi.fbank(
        waveform,
        sample_frequency=sample_rate,
        num_mel_bins=cfg.num_mel_bins,
        frame_length=cfg.frame_length_ms,
        frame_shift=cfg.frame_shift_ms,
        window_type=cfg.window_type,
        dither=cfg.dither,
        use_energy=cfg.use_energy,
        htk_compat=cfg.htk_compat,
    )


def fit_length(fbank: torch.Tensor, target_frames: int) -> torch.Tensor:
    """Zero-pad at the end or cut to ``target_frames`` rows (CAV-MAE pads the log-Mel with 0)."""
    missing = target_frames - fbank.shape[0]
    if missing > 0:
        return F.pad(fbank, (0, 0, 0, missing))
    return fbank[:target_frames]


def normalise(fbank: torch.Tensor, cfg: FbankConfig) -> torch.Tensor:
    """``(x - mean) / (std * std_scale)`` with the corpus statistics of the recipe."""
    return (fbank - cfg.mean) / (cfg.std * cfg.std_scale)


def model_input(waveform: torch.Tensor, sample_rate: int, cfg: FbankConfig) -> torch.Tensor:
    """What the audio encoder sees: ``(target_frames, num_mel_bins)``, normalised."""
    return normalise(fit_length(log_mel(waveform, sample_rate, cfg), cfg.target_frames), cfg)


def padded_normalised(log_mel: torch.Tensor, cfg: FbankConfig) -> torch.Tensor:
    """``normalise(fit_length(log_mel))`` with one new tensor instead of two (the loader's path).

    The same float operations on every element (zero rows, then ``- mean``, then ``/ (std *
    std_scale)``), so the result is bit-identical; in place, it saves a copy per sample.
    """
    out = torch.zeros(cfg.target_frames, log_mel.shape[1], dtype=torch.float32)
    n = min(cfg.target_frames, log_mel.shape[0])
    out[:n] = log_mel[:n]
    return out.sub_(cfg.mean).div_(cfg.std * cfg.std_scale)
