"""Audio features: Kaldi-compatible log-Mel filterbanks, sized and normalised for the model.

The settings (METHOD_NOTES, Inputs) are CAV-MAE's and AudioMAE's: 128 Mel bins, 25 ms
Hanning window, 10 ms shift, waveform mean removed first, no dither, no energy term,
htk_compat. They all come from ``FbankConfig`` so a recipe can change any of them.
"""

from __future__ import annotations

import functools

import torch
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
    """``(target_frames, num_mel_bins)``: zero-padded at the end or cut (CAV-MAE pads the log-Mel
    with 0), in ``fbank``'s dtype (float16 from a pack: a loader ships half the bytes).

    Always one new tensor of exactly that size: a cut is not a view that would keep (and, from a
    loader worker, ship) the whole log-Mel.
    """
    out = fbank.new_zeros(target_frames, fbank.shape[1])
    n = min(target_frames, fbank.shape[0])
    out[:n] = fbank[:n]
    return out


def normalise(fbank: torch.Tensor, cfg: FbankConfig) -> torch.Tensor:
    """``(x - mean) / (std * std_scale)`` with the corpus statistics of the recipe: a new float32
    tensor on ``fbank``'s device (the input is left as it is).

    The one place of this arithmetic: a normalised sample and a compact batch normalised on the
    device (``model_inputs``) go through the same float operations, so they are bit-identical.
    Padding comes first (``fit_length``): the padded rows are normalised too, as in CAV-MAE.
    """
    return fbank.to(torch.float32, copy=True).sub_(cfg.mean).div_(_divisor(cfg.std * cfg.std_scale, fbank.device))


@functools.cache
def _divisor(value: float, device: torch.device) -> torch.Tensor:
    """``value`` as a 0-dim float32 tensor on ``device``, made once per process and device.

    A tensor, not a Python number: CUDA multiplies by the reciprocal of a Python-number divisor,
    which may differ from a division in the last bit; with a tensor every device divides.
    """
    return torch.tensor(value, dtype=torch.float32, device=device)


def model_input(waveform: torch.Tensor, sample_rate: int, cfg: FbankConfig) -> torch.Tensor:
    """What the audio encoder sees: ``(target_frames, num_mel_bins)``, normalised."""
    return normalise(fit_length(log_mel(waveform, sample_rate, cfg), cfg.target_frames), cfg)
