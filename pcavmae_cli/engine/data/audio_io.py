"""Reading WAV files without torchaudio.load.

torchaudio 2.9's ``load`` needs torchcodec, which pcav does not ship; preprocessing always
writes PCM WAV, which the standard library reads. Foreign WAVs (a CAV-MAE data file) may be
stereo or at another rate: they are downmixed and resampled here, the same way preprocessing
treats video sound.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF

from pcavmae_cli.engine.errors import UserError

_DTYPES = {1: np.uint8, 2: np.int16, 4: np.int32}


def read_wav(path: str | Path, sample_rate: int) -> torch.Tensor:
    """Mono float32 waveform in [-1, 1] at ``sample_rate``, shape ``(1, samples)``.

    Channels are averaged (a downmix, not the first channel). Raises ``UserError`` naming
    the file if it is missing or not PCM WAV.
    """
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as fh:
            rate, width, channels = fh.getframerate(), fh.getsampwidth(), fh.getnchannels()
            raw = fh.readframes(fh.getnframes())
    except FileNotFoundError:
        raise UserError(f"audio file not found: {path}") from None
    except (wave.Error, EOFError) as exc:
        raise UserError(f"{path}: not a PCM WAV file ({exc})") from None
    if width == 3:  # 24-bit: widen to int32 by hand
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        data = (b[:, 0].astype(np.int32) << 8 | b[:, 1].astype(np.int32) << 16 | b[:, 2].astype(np.int32) << 24)
        scale = float(2**31)
    elif width in _DTYPES:
        data = np.frombuffer(raw, dtype=_DTYPES[width])
        if width == 1:
            data = data.astype(np.int16) - 128
            scale = 128.0
        else:
            scale = float(2 ** (8 * width - 1))
    else:
        raise UserError(f"{path}: unsupported WAV sample width of {width} bytes")
    samples = data.astype(np.float32)
    samples /= scale  # in place: one array less per clip (the loader calls this per sample)
    if channels == 1:  # the usual case (preprocessing writes mono): the mean of one channel is itself
        mono = torch.from_numpy(samples).reshape(1, -1)
    else:
        mono = torch.from_numpy(samples).reshape(-1, channels).T.mean(dim=0, keepdim=True)
    if rate != sample_rate:
        mono = AF.resample(mono, rate, sample_rate)
    return mono
