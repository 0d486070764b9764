"""A tiny labelled corpus written straight to disk (WAV + JPEG frames), and a tiny model.

Class c sounds at its own pitch and shows frames of its own brightness, with noise, so a tiny
model (16-d, patch 4, 32 x 8 fbank, 16 px frames) learns it in a few CPU seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torchvision.io import write_jpeg

from pcavmae_cli.engine.data.manifest import LabelSet, write_label_csv
from tests.test_fbank import write_wav

# The model and input sizes of tests/test_pretrain.py's TINY, without its pre-training keys (and no
# eval manifest: a test that validates names its own).
TINY_MODEL = [
    "data.audio.fbank.num_mel_bins=8", "data.audio.fbank.target_frames=32", "data.video.crop_size=16",
    "data.loader.batch_size=2", "data.loader.num_workers=0", "data.eval_manifest=null",
    "model.embed_dim=16", "model.depth_modality=1", "model.depth_joint=1", "model.num_heads=2",
    "model.mlp_ratio=2.0", "model.decoder_dim=8", "model.decoder_depth=1", "model.decoder_heads=2",
    "model.decoder_mlp_dim=16", "model.patch_size=4", "model.audio_frames=32", "model.mel_bins=8",
    "model.image_size=16", "model.proj_dim=8", "model.momentum=0.9", "train.device=cpu",
]  # fmt: skip

# Fine-tuning on top: small batches, masks that fit 32 x 8 fbanks, a step per 4 clips.
TINY_FINETUNE = [
    *TINY_MODEL, "optim.effective_batch=4", "optim.warmup_epochs=0.5", "finetune.freq_mask=3",
    "finetune.time_mask=8", "train.log_every=1",
]  # fmt: skip


def write_corpus(root: Path, classes: int, per_class: int, *, seed: int = 0, name: str = "train") -> Path:
    """``classes x per_class`` clips of 1 s with 10 frames under ``root/name``; returns the manifest.

    Labels are ``/t/c{k}``; the label CSV is ``root/labels.csv`` (written once).
    """
    rng = np.random.default_rng(seed)
    folder = root / name
    lines = []
    for i in range(classes * per_class):
        cls = i % classes
        clip = folder / "clips" / f"{name}{i}"
        clip.mkdir(parents=True)
        for k in range(10):
            level = 40 + 180 * cls / max(1, classes - 1) + 3 * k
            pixels = np.clip(level + rng.normal(0, 15, (3, 20, 20)), 0, 255).astype(np.uint8)
            write_jpeg(torch.from_numpy(pixels), str(clip / f"frame_{k}.jpg"), quality=95)
        t = np.arange(16000) / 16000
        tone = np.sin(2 * np.pi * (300 + 700 * cls + 15 * i) * t) + 0.1 * rng.normal(size=t.size)
        write_wav(clip / "audio.wav", (0.3 * 32767 * tone / np.abs(tone).max()).astype(np.int16))
        lines.append(json.dumps({"id": f"{name}{i}", "video": f"clips/{name}{i}", "audio": f"clips/{name}{i}/audio.wav",
                                 "labels": [f"/t/c{cls}"], "duration": 1.0, "n_frames": 10}))  # fmt: skip
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    labels = root / "labels.csv"
    if not labels.exists():
        write_label_csv(labels, LabelSet([f"/t/c{k}" for k in range(classes)], [f"class {k}" for k in range(classes)]))
    return manifest
