"""Audio features: parity with Kaldi's fbank under METHOD_NOTES settings, length, normalisation."""

from __future__ import annotations

import math
import wave

import numpy as np
import pytest
import torch
from torchaudio.compliance import kaldi

from pcavmae_cli.engine import config
from pcavmae_cli.engine.data import fbank as fb
from pcavmae_cli.engine.data.audio_io import read_wav
from pcavmae_cli.engine.errors import UserError

RATE = 16000


def tone(seconds: float, freq: float = 440.0) -> torch.Tensor:
    t = torch.arange(int(seconds * RATE)) / RATE
    gen = torch.Generator().manual_seed(0)
    return (0.3 * torch.sin(2 * math.pi * freq * t) + 0.05 * torch.randn(t.shape, generator=gen) + 0.1).unsqueeze(0)


def write_wav(path, samples: np.ndarray, rate: int = RATE):
    """``samples``: int16 array of shape (n,) or (n, channels)."""
    samples = samples.reshape(samples.shape[0], -1)
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(samples.shape[1])
        fh.setsampwidth(2)
        fh.setframerate(rate)
        fh.writeframes(samples.astype("<i2").tobytes())


@pytest.fixture(scope="module")
def cfg():
    return config.load_recipe("base").data.audio.fbank


def test_log_mel_equals_kaldi_fbank_with_method_notes_settings(cfg):
    wav = tone(10.0)
    expected = kaldi.fbank(
        wav - wav.mean(),  # "waveform mean removed first"
        htk_compat=True,
        sample_frequency=16000,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
        frame_length=25,
    )
    ours = fb.log_mel(wav, RATE, cfg)
    assert ours.shape == (998, 128)
    assert torch.equal(ours, expected)


def test_short_clip_is_zero_padded_to_1024(cfg):
    raw = fb.log_mel(tone(4.0), RATE, cfg)
    fitted = fb.fit_length(raw, cfg.target_frames)
    assert fitted.shape == (1024, 128)
    assert torch.equal(fitted[: raw.shape[0]], raw)
    assert torch.count_nonzero(fitted[raw.shape[0] :]) == 0


def test_long_clip_is_cut_to_1024(cfg):
    raw = fb.log_mel(tone(12.0), RATE, cfg)
    assert raw.shape[0] > 1024
    assert torch.equal(fb.fit_length(raw, 1024), raw[:1024])


def test_normalisation_uses_the_recipe_numbers():
    # std_scale 2 is AST's input scale (the shipped recipes use CAV-MAE's 1, tests/test_input_scale.py)
    cfg = config.load_recipe(
        "base", ["data.audio.fbank.mean=1.5", "data.audio.fbank.std=2.0", "data.audio.fbank.std_scale=2.0"]
    ).data.audio.fbank
    x = torch.tensor([[1.5, 5.5, -2.5]])
    assert torch.allclose(fb.normalise(x, cfg), torch.tensor([[0.0, 1.0, -1.0]]))
    full = fb.model_input(tone(3.0), RATE, cfg)
    expected = (fb.fit_length(fb.log_mel(tone(3.0), RATE, cfg), 1024) - 1.5) / 4.0
    assert torch.allclose(full, expected)


def test_read_wav_scales_int16_and_downmixes(tmp_path):
    left = np.array([16384, -16384, 32767, 0], dtype=np.int16)
    right = np.zeros(4, dtype=np.int16)
    write_wav(tmp_path / "stereo.wav", np.stack([left, right], axis=1))
    mono = read_wav(tmp_path / "stereo.wav", RATE)
    assert mono.shape == (1, 4)
    assert torch.allclose(mono[0], torch.tensor([0.25, -0.25, 32767 / 65536, 0.0]))


def test_read_wav_resamples_to_the_recipe_rate(tmp_path):
    samples = (np.sin(np.arange(8000) / 8000 * 2 * np.pi * 100) * 10000).astype(np.int16)
    write_wav(tmp_path / "8k.wav", samples, rate=8000)
    assert read_wav(tmp_path / "8k.wav", RATE).shape == (1, 16000)


def test_read_wav_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="audio file not found: .*missing.wav"):
        read_wav(tmp_path / "missing.wav", RATE)
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(UserError, match=r"text\.wav: not a PCM WAV"):
        read_wav(tmp_path / "text.wav", RATE)
