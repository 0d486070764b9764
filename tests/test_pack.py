"""The packed layout: same samples as the per-clip files, written by the CLI, read by training."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pcavmae_cli.engine import config
from pcavmae_cli.engine.data import fbank as fb
from pcavmae_cli.engine.data.audio_io import read_wav
from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.data.manifest import read_label_csv, read_manifest
from pcavmae_cli.engine.data.pack import pack_manifest
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.train.pretrain import pretrain
from tests.cli_helpers import pcav
from tests.conftest import make_mp4
from tests.test_pretrain import TINY
from tests.tiny_corpus import TINY_MODEL, write_corpus

PER_SHARD = 3  # 8 clips: shards of 3, 3 and 2


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A tiny labelled corpus (2 classes x 4 clips of 1 s, 20 px frames) and its pack."""
    root = tmp_path_factory.mktemp("pack")
    manifest = write_corpus(root, classes=2, per_class=4)
    data = config.load_recipe("demo", [*TINY_MODEL, f"data.pack.clips_per_shard={PER_SHARD}"]).data
    report = pack_manifest(manifest, root / "train" / "pack", data, jobs=2)
    return root, manifest, report, data


def test_packed_and_plain_samples_are_the_same(packed):
    root, manifest, report, data = packed
    assert (report.n_clips, report.n_shards, report.n_written) == (8, 3, 3)
    labels = read_label_csv(root / "labels.csv")
    cfg = data.audio.fbank
    for frames in ("all", 3, "random"):
        plain = AudioVisualDataset(manifest, data, frames, labels)
        pack = AudioVisualDataset(report.index, data, frames, labels)
        assert (plain.layout, pack.layout) == ("plain", "packed")
        assert [r.id for r in pack.records] == [r.id for r in plain.records]
        for i in range(len(plain)):
            key = (i, 1000 + i) if frames == "random" else i  # a seeded random frame: the same draw
            a, b = plain[key], pack[key]
            assert a.keys() == b.keys() == {"fbank", "frames", "label", "index"}
            assert torch.equal(a["frames"], b["frames"])  # the same JPEG bytes, decoded alike
            assert torch.equal(a["label"], b["label"]) and a["index"] == b["index"] == i
            # The fbank differs by float16 rounding of the log-Mel only: exactly that, and within
            # the bound the pack module documents.
            record = plain.records[i]
            log_mel = fb.log_mel(read_wav(record.audio_path(plain.root), 16000), 16000, cfg)
            rounded = fb.normalise(fb.fit_length(log_mel.half().float(), cfg.target_frames), cfg)
            assert torch.equal(b["fbank"], rounded)
            bound = fb.fit_length(log_mel, cfg.target_frames).abs() * 2**-11 / (cfg.std * cfg.std_scale) + 1e-6
            assert ((a["fbank"] - b["fbank"]).abs() <= bound).all()
            assert not torch.equal(a["fbank"], b["fbank"])  # it is float16: the test would see a mix-up


def test_a_recipe_with_other_fbank_settings_is_refused(packed):
    _, _, report, data = packed
    other = config.load_recipe("demo", [*TINY_MODEL, "data.audio.fbank.num_mel_bins=16"]).data
    with pytest.raises(UserError, match="num_mel_bins=8, the recipe has 16"):
        AudioVisualDataset(report.index, other, "middle")
    # target_frames and the normalisation apply at load time: no re-pack needed for them
    longer = config.load_recipe("demo", [*TINY_MODEL, "data.audio.fbank.target_frames=128"]).data
    assert AudioVisualDataset(report.index, longer, "middle")[0]["fbank"].shape == (128, 8)


def test_pretraining_reads_the_pack_without_the_clip_files(packed, tmp_path):
    root, manifest, report, _ = packed
    copy = tmp_path / "train"
    shutil.copytree(manifest.parent, copy)
    index = copy / "pack" / "index.json"
    shutil.rmtree(copy / "clips")  # only the pack is left: the plain layout could not load
    overrides = [*TINY, f"data.train_manifest={index}", f"train.run_dir={tmp_path / 'run'}",
                 f"data.pack.clips_per_shard={PER_SHARD}", "train.max_steps_per_epoch=1"]  # fmt: skip
    result = pretrain(config.load_recipe("demo", overrides))
    assert result.steps == 3  # 3 epochs of 1 step; the E-step before epoch 2 embeds every packed clip
    assert all(torch.isfinite(torch.tensor(e["loss_total"])) for e in result.epochs)
    assignments = sorted((tmp_path / "run" / "prototypes").rglob("*"))
    assert assignments, "the E-step wrote no prototypes"


def test_preprocess_pack_cli_writes_shards_reruns_idempotently_and_lists_bad_clips(tmp_path):
    src = tmp_path / "videos"
    for name in ("a", "b", "c"):
        make_mp4(src / f"{name}.mp4", 2, size="64x48")
    (src / "bad.mp4").write_bytes(b"")
    out = tmp_path / "out"
    args = ["preprocess", str(src), str(out), "--pack", "--recipe", "demo", "--jobs", "2", "data.clip_seconds=2",
            "data.video.n_frames=2", "data.video.short_side=32", "data.pack.clips_per_shard=2"]  # fmt: skip
    first = pcav(*args)
    assert first.returncode == 0, first.stderr
    index = json.loads((out / "pack" / "index.json").read_text())
    assert index["n_clips"] == 3 and [s["clips"] for s in index["shards"]] == [2, 1]
    shards = sorted((out / "pack").glob("shard-*"))
    assert [p.name for p in shards] == sorted(f"shard-0000{i}.{part}" for i in (0, 1)
                                              for part in ("clips.npy", "fbank.npy", "frames.bin", "frames.npy"))  # fmt: skip
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["id"], f["reason"]) for f in failures] == [("bad", "empty_file")]
    assert [r.id for r in read_manifest(out / "pack" / "index.json")] == ["a", "b", "c"]

    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    again = pcav(*args)
    assert again.returncode == 0, again.stderr
    assert "0 written, 2 unchanged" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in sorted((out / "pack").glob("shard-*"))} == stamps
    assert json.loads((out / "pack" / "index.json").read_text()) == index


def test_bench_loader_times_both_layouts_through_the_training_loader(packed):
    _, manifest, report, data = packed
    from pcavmae_cli.engine.bench.loader import bench_loader

    plain = bench_loader(manifest, data, workers=0, batch_size=3, passes=2)
    pack = bench_loader(report.index, data, workers=1, batch_size=3, passes=1)  # a worker maps the shards itself
    assert (plain["layout"], plain["workers"], plain["samples"]) == ("plain", 0, 16)
    assert (pack["layout"], pack["workers"], pack["samples"]) == ("packed", 1, 8)
    for r in (plain, pack):
        assert r["samples_per_s"] == pytest.approx(r["samples"] / r["seconds"])
        assert r["ms_per_sample"] == pytest.approx(1000 / r["samples_per_s_per_worker"])
    assert 0 < plain["cpu_ms_per_sample"] and pack["cpu_ms_per_sample"] is None


def test_repacking_rewrites_only_changed_shards_and_lists_unreadable_clips(packed, tmp_path):
    _, manifest, _, data = packed
    copy = tmp_path / "train"
    shutil.copytree(manifest.parent, copy, ignore=shutil.ignore_patterns("pack"))
    first = pack_manifest(copy / "manifest.jsonl", copy / "pack", data, jobs=1)
    assert (first.n_written, first.n_kept) == (3, 0)
    stamps = {p.name: p.stat().st_mtime_ns for p in (copy / "pack").glob("shard-*")}

    (copy / "clips" / "train4" / "frame_2.jpg").write_bytes(b"not a jpeg")  # clip 4: shard 1 (3 per shard)
    (copy / "clips" / "train7" / "audio.wav").unlink()  # clip 7: the last shard
    second = pack_manifest(copy / "manifest.jsonl", copy / "pack", data, jobs=1)
    reasons = sorted((f.id, f.reason) for f in second.failures)
    assert reasons == [("train4", "not_a_jpeg"), ("train7", "unreadable_audio")]
    failures = [json.loads(line)["id"] for line in (copy / "pack" / "failures.jsonl").read_text().splitlines()]
    assert sorted(failures) == ["train4", "train7"]
    ids = [r.id for r in read_manifest(second.index)]
    assert ids == ["train0", "train1", "train2", "train3", "train5", "train6"]
    assert (second.n_shards, second.n_written, second.n_kept) == (2, 1, 1)  # shard 0 is unchanged
    now = {p.name: p.stat().st_mtime_ns for p in (copy / "pack").glob("shard-*")}
    assert {n for n in now if n.startswith("shard-00000")} == {n for n in stamps if n.startswith("shard-00000")}
    assert all(now[n] == stamps[n] for n in now if n.startswith("shard-00000"))
    assert not any(n.startswith("shard-00002") for n in now)  # the third shard of the larger corpus is gone
    ds = AudioVisualDataset(second.index, data, "all")
    assert [ds[i]["index"].item() for i in range(len(ds))] == list(range(6))
