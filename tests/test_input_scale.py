"""The audio input scale of the CAV-MAE / PCAV-MAE recipes is CAV-MAE's: ``(fbank - mean) / std``.

CAV-MAE's dataloader (YuanGongND/cav-mae, ``src/dataloader.py``) normalises with no factor 2
(the factor 2 is AST's). The reference below is written out here, independently of pcav's
code: the WAV read with the ``wave`` module, CAV-MAE's ``kaldi.fbank`` call with its settings,
zero padding to 1024 rows, and CAV-MAE's statistics for AudioSet and VGGSound.
"""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest
import torch
from torchaudio.compliance import kaldi
from torchvision.io import write_jpeg

from pcavmae_cli.engine import config, recipes
from pcavmae_cli.engine.data.dataset import AudioVisualDataset

RATE = 16000
CAVMAE_MEAN, CAVMAE_STD = -5.081, 4.4849  # egs/audioset and egs/vggsound run_*.sh


def plucked_recording(seconds: float = 3.0) -> np.ndarray:
    """int16 samples of a recording-like signal: three plucked strings (Karplus-Strong) that ring
    into each other, a gliding whistle, and bursts of breathy noise, at uneven loudness."""
    rng = np.random.default_rng(13)
    n = int(seconds * RATE)
    out = np.zeros(n)
    for start, f0, gain in ((0.05, 196.0, 0.6), (0.9, 261.6, 0.35), (1.7, 329.6, 0.5)):
        period, k = int(RATE / f0), int(start * RATE)
        y = np.zeros(n - k)
        y[:period] = rng.uniform(-1, 1, period)
        for i in range(period + 1, n - k):
            y[i] = 0.996 * 0.5 * (y[i - period] + y[i - period - 1])
        out[k:] += gain * y
    t = np.arange(n) / RATE
    out += 0.08 * np.sin(2 * np.pi * (900 * t + 300 * t**2)) * (t > 1.2)
    envelope = np.repeat(rng.uniform(0, 1, n // 1600 + 1) > 0.7, 1600)[:n]
    out += 0.05 * envelope * np.convolve(rng.normal(size=n), np.ones(8) / 8, mode="same")
    return np.round(0.7 * 32767 * out / np.abs(out).max()).astype(np.int16)


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """A one-clip manifest whose WAV holds ``plucked_recording``."""
    root = tmp_path_factory.mktemp("scale")
    clip = root / "clips" / "take1"
    clip.mkdir(parents=True)
    with wave.open(str(clip / "audio.wav"), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(RATE)
        fh.writeframes(plucked_recording().tobytes())
    write_jpeg(torch.full((3, 240, 320), 90, dtype=torch.uint8), str(clip / "frame_0.jpg"))
    record = {"id": "take1", "video": "clips/take1", "audio": "clips/take1/audio.wav", "labels": [],
              "duration": 3.0, "n_frames": 1}  # fmt: skip
    (root / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    return root / "manifest.jsonl", clip / "audio.wav"


def cavmae_input(wav_path) -> torch.Tensor:
    """CAV-MAE's ``_wav2fbank`` + normalisation of one clip, written out."""
    with wave.open(str(wav_path), "rb") as fh:
        samples = np.frombuffer(fh.readframes(fh.getnframes()), dtype="<i2").astype(np.float32) / 32768
    waveform = torch.from_numpy(samples)[None]
    waveform = waveform - waveform.mean()
    fbank = kaldi.fbank(waveform, htk_compat=True, sample_frequency=RATE, use_energy=False, window_type="hanning",
                        num_mel_bins=128, dither=0.0, frame_shift=10)  # fmt: skip
    fbank = torch.nn.ZeroPad2d((0, 0, 0, 1024 - fbank.shape[0]))(fbank)
    return (fbank - CAVMAE_MEAN) / CAVMAE_STD


@pytest.mark.parametrize("recipe", ["cavmae_base", "pretrain_cavmae", "pretrain_audioset", "finetune_cavmae"])
def test_the_dataset_feeds_cavmae_normalised_fbank(recording, recipe):
    manifest, wav_path = recording
    data = config.load_recipe(recipe).data
    fbank = AudioVisualDataset(manifest, data, frames="middle")[0]["fbank"]
    expected = cavmae_input(wav_path)
    assert fbank.shape == expected.shape == (1024, 128)
    assert expected.std() > 1.0  # a loud recording, not silence: a half-scale input would differ by ~1
    assert torch.equal(fbank, expected)  # the same float32 operations: bit for bit


def test_every_shipped_recipe_uses_cavmae_scale():
    for name in recipes.names():
        fbank = config.load_recipe(name).data.audio.fbank
        assert fbank.std_scale == 1.0, name
