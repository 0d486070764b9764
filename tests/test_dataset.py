"""The dataset: shapes, frame policies, labels, and errors that name the clip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchvision.io import write_jpeg

from pcavmae_cli.engine import config
from pcavmae_cli.engine.data import fbank as fb
from pcavmae_cli.engine.data.audio_io import read_wav
from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.data.manifest import LabelSet, write_label_csv
from pcavmae_cli.engine.data.stats import fbank_stats
from pcavmae_cli.engine.errors import UserError
from tests.test_fbank import write_wav

N_FRAMES = 10


def make_clip(root, clip_id, seconds, freq, width=298, height=224):
    """A clip whose frame k is a flat grey of level 20*k, so a loaded frame tells its index."""
    folder = root / "clips" / clip_id
    folder.mkdir(parents=True)
    for k in range(N_FRAMES):
        write_jpeg(torch.full((3, height, width), 20 * k, dtype=torch.uint8), str(folder / f"frame_{k}.jpg"), quality=100)
    t = np.arange(int(seconds * 16000)) / 16000
    write_wav(folder / "audio.wav", (np.sin(2 * np.pi * freq * t) * 8000).astype(np.int16))
    return {"id": clip_id, "video": f"clips/{clip_id}", "audio": f"clips/{clip_id}/audio.wav", "duration": seconds, "n_frames": N_FRAMES}


@pytest.fixture()
def corpus(tmp_path):
    rows = [
        make_clip(tmp_path, "a", 10.0, 300.0) | {"labels": ["/m/dog"]},
        make_clip(tmp_path, "b", 10.0, 900.0) | {"labels": ["/m/cat", "/m/dog"]},
    ]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_label_csv(tmp_path / "labels.csv", LabelSet(["/m/cat", "/m/dog"], ["cat", "dog"]))
    return tmp_path


@pytest.fixture()
def cfg():
    return config.load_recipe("base").data


def frame_level(frames: torch.Tensor, cfg) -> float:
    """Undo normalisation of channel 0 and return the grey level (0-255) of a frame."""
    return float((frames[0] * cfg.video.std[0] + cfg.video.mean[0]).mean() * 255)


def test_sample_shapes_and_values(corpus, cfg):
    labels = LabelSet(["/m/cat", "/m/dog"], ["cat", "dog"])
    ds = AudioVisualDataset(corpus / "manifest.jsonl", cfg, "middle", labels)
    sample = ds[1]
    assert sample["fbank"].shape == (1024, 128)
    assert sample["frames"].shape == (3, 224, 224)
    assert sample["label"].tolist() == [1.0, 1.0]
    assert ds[0]["label"].tolist() == [0.0, 1.0]
    assert sample["index"].item() == 1
    assert frame_level(sample["frames"], cfg) == pytest.approx(20 * 5, abs=1.0)
    wav = read_wav(corpus / "clips/b/audio.wav", 16000)
    assert torch.equal(sample["fbank"], fb.model_input(wav, 16000, cfg.audio.fbank))


def test_all_frames_for_evaluation_in_order(corpus, cfg):
    ds = AudioVisualDataset(corpus / "manifest.jsonl", cfg, "all")
    frames = ds[0]["frames"]
    assert frames.shape == (N_FRAMES, 3, 224, 224)
    assert [round(frame_level(f, cfg)) for f in frames] == [20 * k for k in range(N_FRAMES)]
    assert "label" not in ds[0]


def test_an_embedding_batch_holds_the_micro_batchs_frames_not_clips(corpus, cfg):
    """``embed_loader``: with every frame of a clip, a batch takes batch_size // frames clips
    (at least one), so evaluation feeds the model as many frames at once as a training step."""
    import dataclasses

    from torch.utils.data import Subset

    from pcavmae_cli.engine.train.data import clips_per_batch, embed_loader
    from pcavmae_cli.engine.train.runtime import Runtime

    every, middle = (AudioVisualDataset(corpus / "manifest.jsonl", cfg, f) for f in ("all", "middle"))
    assert every.frames_per_clip == N_FRAMES and middle.frames_per_clip == 1
    assert clips_per_batch(every, 4 * N_FRAMES + 1) == 4 and clips_per_batch(Subset(every, [0]), 4 * N_FRAMES) == 4
    assert clips_per_batch(every, 1) == 1 and clips_per_batch(middle, 7) == 7 and clips_per_batch([1, 2, 3], 7) == 7
    loader_cfg = dataclasses.replace(cfg.loader, batch_size=2 * N_FRAMES, num_workers=0)
    assert embed_loader(every, loader_cfg, Runtime(torch.device("cpu"), None)).batch_size == 2


def test_random_frame_varies_and_chosen_index_is_exact(corpus, cfg):
    torch.manual_seed(0)
    ds = AudioVisualDataset(corpus / "manifest.jsonl", cfg, "random")
    seen = {round(frame_level(ds[0]["frames"], cfg) / 20) for _ in range(40)}
    assert len(seen) >= 5 and seen <= set(range(N_FRAMES))
    assert round(frame_level(AudioVisualDataset(corpus / "manifest.jsonl", cfg, 3)[0]["frames"], cfg)) == 60


def test_single_label_mode_gives_a_class_index(corpus, cfg):
    cfg.label_mode = "single"
    labels = LabelSet(["/m/cat", "/m/dog"], ["cat", "dog"])
    with pytest.raises(UserError, match="clip b: label_mode 'single' needs exactly one label, found 2"):
        AudioVisualDataset(corpus / "manifest.jsonl", cfg, "middle", labels)
    lines = (corpus / "manifest.jsonl").read_text().splitlines()
    (corpus / "one.jsonl").write_text(lines[0] + "\n")
    sample = AudioVisualDataset(corpus / "one.jsonl", cfg, "middle", labels)[0]
    assert sample["label"].dtype == torch.long and sample["label"].item() == 1


def test_for_split_reads_recipe_paths(corpus):
    cfg = config.load_recipe(
        "base",
        [f"data.train_manifest={corpus / 'manifest.jsonl'}", f"data.label_csv={corpus / 'labels.csv'}"],
    ).data
    ds = AudioVisualDataset.for_split(cfg, "train")
    assert len(ds) == 2 and ds.frames == "random" and ds[0]["label"].shape == (2,)
    with pytest.raises(UserError, match=r"key 'data\.eval_manifest' is not set"):
        AudioVisualDataset.for_split(cfg, "eval")


def test_unknown_label_names_the_clip(corpus, cfg):
    with pytest.raises(UserError, match=r"clip b: label '/m/cat' is not in the label CSV"):
        AudioVisualDataset(corpus / "manifest.jsonl", cfg, "middle", LabelSet(["/m/dog"], ["dog"]))


def test_missing_frame_names_the_file(corpus, cfg):
    (corpus / "clips/a/frame_5.jpg").unlink()
    ds = AudioVisualDataset(corpus / "manifest.jsonl", cfg, "middle")
    with pytest.raises(UserError, match=r"frame not found: .*clips/a/frame_5\.jpg"):
        ds[0]


def test_bad_manifest_line_is_named(tmp_path, cfg):
    (tmp_path / "m.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(UserError, match=r"m\.jsonl:1: missing key 'video'"):
        AudioVisualDataset(tmp_path / "m.jsonl", cfg, "middle")
    (tmp_path / "m.jsonl").write_text("not json\n")
    with pytest.raises(UserError, match=r"m\.jsonl:1: not valid JSON"):
        AudioVisualDataset(tmp_path / "m.jsonl", cfg, "middle")


def test_fbank_stats_match_a_direct_computation(corpus, cfg):
    stats = fbank_stats(corpus / "manifest.jsonl", cfg)
    values = torch.cat(
        [
            fb.fit_length(fb.log_mel(read_wav(corpus / f"clips/{c}/audio.wav", 16000), 16000, cfg.audio.fbank), 1024)
            for c in "ab"
        ]
    ).double()
    assert stats.n_clips == 2 and stats.n_values == values.numel()
    assert stats.mean == pytest.approx(values.mean().item(), rel=1e-9)
    assert stats.std == pytest.approx(values.std(unbiased=False).item(), rel=1e-6)
