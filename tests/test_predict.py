"""A trained model on the user's own files: ``pcav predict``, the Python API, moved run folders.

One tiny project is trained as a user would (relative paths, from its own folder), then the
whole project is moved and one run is copied alone; every command is run from a third folder.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pcavmae_cli
from pcavmae_cli.engine import config
from pcavmae_cli.engine.data.preprocess import preprocess
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.inference import load
from pcavmae_cli.engine.predict_videos import TAIL_SLACK, plan_windows
from pcavmae_cli.engine.predict_videos import predict as predict_videos
from pcavmae_cli.engine.train.finetune import finetune
from pcavmae_cli.engine.train.pretrain import pretrain
from tests.cli_helpers import pcav
from tests.conftest import make_mp4
from tests.test_fbank import write_wav
from tests.tiny_corpus import TINY_FINETUNE, TINY_MODEL, write_corpus

# ---------------------------------------------------------------- windows


def test_windows_cover_the_video_and_end_at_its_end():
    assert plan_windows(3.0, 10.0, 10.0) == [(0.0, 10.0)]  # shorter than a window: one, padded
    assert plan_windows(None, 10.0, 10.0) == [(0.0, 10.0)]
    assert plan_windows(10.0, 10.0, 10.0) == [(0.0, 10.0)]
    assert plan_windows(25.0, 10.0, 10.0) == [(0.0, 10.0), (10.0, 20.0), (15.0, 25.0)]
    assert plan_windows(30.0, 10.0, 5.0) == [(0.0, 10.0), (5.0, 15.0), (10.0, 20.0), (15.0, 25.0), (20.0, 30.0)]
    # a tail shorter than TAIL_SLACK gets no window of its own
    assert plan_windows(30.0 + TAIL_SLACK / 2, 10.0, 5.0)[-1] == (20.0, 30.0)
    assert plan_windows(30.0 + 2 * TAIL_SLACK, 10.0, 10.0)[-1] == (21.0, 31.0)
    with pytest.raises(UserError, match="hop"):
        plan_windows(30.0, 10.0, 0.0)


# ---------------------------------------------------------------- a project, trained and moved


def _train_project(root: Path) -> None:
    """Pre-train and fine-tune with paths relative to ``root``, as a user in that folder would."""
    write_corpus(root / "data", 3, 4, name="train")
    write_corpus(root / "data", 3, 2, seed=1, name="eval")
    here = os.getcwd()
    os.chdir(root)
    try:
        pretrain(config.load_recipe("demo", [
            *TINY_MODEL, "data.train_manifest=data/train/manifest.jsonl", "train.run_dir=runs/pre",
            "data.label_csv=null", "prototypes.num_clusters=[2, 3]", "prototypes.warmup_epochs=1",
            "optim.effective_batch=4", "stages.0.epochs=2", "stages.1.epochs=1",
        ]))  # fmt: skip
        finetune(config.load_recipe("finetune_demo", [
            *TINY_FINETUNE, "data.train_manifest=data/train/manifest.jsonl",
            "data.eval_manifest=data/eval/manifest.jsonl", "data.label_csv=data/labels.csv",
            "finetune.init_from=runs/pre", "train.run_dir=runs/ft", "finetune.epochs=2", "finetune.eval_every_epochs=1",
        ]))  # fmt: skip
    finally:
        os.chdir(here)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    base = tmp_path_factory.mktemp("predict")
    _train_project(base / "proj")
    shutil.move(base / "proj", base / "moved")  # the whole project, elsewhere
    shutil.copytree(base / "moved" / "runs" / "ft", base / "lone" / "ft")  # one run, alone
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    videos = elsewhere / "videos"
    make_mp4(videos / "short clip.mp4", 3.0, size="64x48")
    make_mp4(videos / "long.mp4", 25.0, size="64x48", tone="0.5*sin(2*PI*(300+200*floor(t/8))*t)")
    (videos / "broken.mp4").write_bytes(b"not a video at all")
    return SimpleNamespace(moved=base / "moved", lone=base / "lone" / "ft", elsewhere=elsewhere, videos=videos)


def test_the_run_records_absolute_paths_and_keeps_its_labels(project):
    raw = (project.moved / "runs" / "ft" / "config.yaml").read_text()
    assert "/proj/data/labels.csv" in raw and "/proj/runs/pre" in raw  # where they were, absolute
    assert (project.lone / "labels.csv").read_text() == (project.moved / "data" / "labels.csv").read_text()


def test_predict_videos_from_a_run_copied_alone(project):
    out = project.elsewhere / "out" / "labels.csv"
    result = pcav("predict", "-c", str(project.lone), str(project.videos / "short clip.mp4"),
                  str(project.videos / "long.mp4"), str(project.videos / "broken.mp4"), "nowhere.mp4",
                  "--out", str(out), "--hop", "10", "--top", "2", "--device", "cpu", cwd=project.elsewhere)  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    assert "2 of 4 videos labelled" in result.stdout
    rows = list(csv.DictReader(out.open()))
    assert [(r["video"], r["rank"]) for r in rows] == [("short_clip", "1"), ("short_clip", "2"), ("long", "1"), ("long", "2")]
    assert {r["label"] for r in rows} <= {"class 0", "class 1", "class 2"}
    assert [r["windows"] for r in rows] == ["1", "1", "3", "3"]  # 25 s: windows from 0, 10 and 15 s
    assert float(rows[0]["score"]) >= float(rows[1]["score"])
    failures = [json.loads(line) for line in out.with_name("labels.failures.jsonl").read_text().splitlines()]
    assert {(f["id"], f["reason"]) for f in failures} == {("broken", "undecodable"), ("nowhere", "not_found")}
    assert (out.parent / "labels.timelines" / "long.png").is_file()
    assert not (out.parent / "labels.timelines" / "short_clip.png").exists()  # one window: no timeline
    assert not (out.parent / ".labels.csv.work").exists()


def test_a_video_predicts_what_the_api_and_evaluate_give(project):
    """Window scores are the API's scores of the same span, and the API's scores of a file are
    those of its preprocessed clip in a manifest (what pcav evaluate reads)."""
    model = pcavmae_cli.load(project.lone, device="cpu")
    out = project.elsewhere / "parity.jsonl"
    result = predict_videos(model, out, videos=[project.videos / "long.mp4"], hop=7.5, timelines=False)
    line = json.loads(out.read_text())
    assert [(w["start"], w["end"]) for w in line["windows"]] == [(0.0, 10.0), (7.5, 17.5), (15.0, 25.0)]
    window_scores = result.videos[0].window_scores
    for k, start in enumerate((0.0, 7.5, 15.0)):
        clip = model.read_video(project.videos / "long.mp4", start=start)
        torch.testing.assert_close(model.scores(clip.fbank[None], clip.frames[None])[0], window_scores[k])
    torch.testing.assert_close(torch.from_numpy(model.predict(project.videos / "short clip.mp4").scores),
                               _manifest_scores(model, project.videos / "short clip.mp4", project.elsewhere / "pp"))  # fmt: skip
    assert result.videos[0].scores("mean").sum().item() == pytest.approx(1.0, abs=1e-5)  # softmax, averaged


def _manifest_scores(model, video: Path, where: Path) -> torch.Tensor:
    from pcavmae_cli.engine.data.dataset import AudioVisualDataset
    from pcavmae_cli.engine.data.preprocess import ClipInput, Inputs

    report = preprocess(Inputs(video.parent, "folder", items=[ClipInput("x", video)]), where, model.cfg.data, jobs=1)
    sample = AudioVisualDataset(report.manifest, model.cfg.data, frames="all", compact=True)[0]
    return model.scores(sample["fbank"][None], sample["frames"][None])[0]


def test_python_api_embeds_files_and_arrays(project):
    model = pcavmae_cli.load(project.moved / "runs" / "pre", device="cpu")
    assert model.kind == "pretrain"
    feats = model.embed(project.videos / "short clip.mp4")
    assert set(feats) == {"audio", "video", "joint", "z_a", "z_v"}
    assert feats["joint"].shape == (16,) and feats["z_a"].shape == (8,)
    assert np.linalg.norm(feats["z_a"]) == pytest.approx(1.0, abs=1e-5)
    t = np.arange(16000 * 2) / 16000
    arrays = model.from_arrays(0.3 * np.sin(2 * np.pi * 440 * t), 16000, np.full((10, 48, 64, 3), 128, np.uint8))
    assert arrays.fbank.shape == (32, 8) and arrays.frames.shape == (10, 3, 16, 16)
    assert np.isfinite(model.embed(arrays)["joint"]).all()
    with pytest.raises(UserError, match="pre-training checkpoint"):
        model.predict(project.videos / "short clip.mp4")
    with pytest.raises(UserError, match="not found"):
        model.embed(project.elsewhere / "nothing.mp4")


def test_python_api_predicts_with_names(project):
    model = load(project.moved / "runs" / "ft", device="cpu", overrides=["data.loader.batch_size=1"])
    assert model.labels == ["class 0", "class 1", "class 2"]
    pred = model.predict(project.videos / "short clip.mp4", top_k=2, frames="middle")
    assert len(pred.top) == 2 and pred.top[0].score >= pred.top[1].score
    name, score = pred.top[0]
    assert name in model.labels and pred.scores.shape == (3,) and score == pytest.approx(float(pred.scores.max()))


def test_commands_read_a_moved_run_from_anywhere(project):
    moved = project.moved
    ev = project.elsewhere / "ev"
    result = pcav("evaluate", "-c", str(moved / "runs" / "ft"), "--data", str(moved / "data" / "eval" / "manifest.jsonl"),
                  "--out", str(ev), cwd=project.elsewhere)  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    assert json.loads((ev / "metrics.json").read_text())["metrics"]["top1"] is not None
    emb = project.elsewhere / "emb"
    result = pcav("embed", "-c", str(moved / "runs" / "pre"), "--data", str(moved / "data" / "eval" / "manifest.jsonl"),
                  "--out", str(emb), cwd=project.elsewhere)  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    assert np.load(emb / "joint.npy").shape == (6, 16)
    # explain: the fine-tuned run finds its pre-training run and its training clips at the new place
    result = pcav("explain", "train0", "-c", str(moved / "runs" / "ft"), "--out", str(project.elsewhere / "ex"),
                  "--device", "cpu", cwd=project.elsewhere)  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    assert "prediction:" in result.stdout


def test_a_lone_run_says_what_is_missing(project):
    result = pcav("explain", "train0", "-c", str(project.lone), "--device", "cpu", cwd=project.elsewhere)
    assert result.returncode == 1
    assert "--prototypes" in result.stderr and result.stderr.count("\n") == 1


def test_predict_resumes_after_an_interrupt(project):
    model = load(project.lone, device="cpu")
    videos = [project.videos / "short clip.mp4", project.videos / "long.mp4", project.videos / "broken.mp4"]
    whole = predict_videos(model, project.elsewhere / "whole.jsonl", videos=videos, chunk=1, timelines=False)

    def stop_after_first(number):
        if number == 0:
            raise KeyboardInterrupt

    out = project.elsewhere / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        predict_videos(model, out, videos=videos, chunk=1, timelines=False, on_chunk=stop_after_first)
    assert not out.exists() and (project.elsewhere / ".resumed.jsonl.work" / "chunks").is_dir()
    again = predict_videos(model, out, videos=videos, chunk=1, timelines=False)
    assert (again.chunks_skipped, again.chunks_done) == (1, 2)
    assert out.read_text() == (project.elsewhere / "whole.jsonl").read_text()
    assert whole.n_failed == again.n_failed == 1


def test_bad_requests_are_one_line_errors(project):
    cases = [
        (["-c", str(project.lone), "--out", "x.csv"], "no videos given"),
        (["-c", str(project.lone), str(project.videos / "long.mp4"), "--out", "x.txt"], ".csv or .jsonl"),
        (["-c", str(project.moved / "runs" / "pre"), str(project.videos / "long.mp4"), "--out", "x.csv"], "pre-training"),
        (["-c", str(project.lone), str(project.videos / "long.mp4"), "--out", "x.csv", "--aggregate", "median"], "mean or max"),
    ]  # fmt: skip
    for args, message in cases:
        result = pcav("predict", *args, cwd=project.elsewhere)
        assert result.returncode == 1, args
        assert message in result.stderr and result.stderr.count("\n") == 1, (args, result.stderr)


def test_every_run_has_a_model_card(project):
    ft = (project.moved / "runs" / "ft" / "README.md").read_text()
    assert ft.startswith("# ft: PCAV-MAE fine-tuned classifier")
    assert "classes (3, in `labels.csv`): class 0, class 1, class 2" in ft
    assert "training `" in ft and "(12 clips)" in ft  # the manifest, found at the moved place
    assert "best validation top1" in ft and "2 epochs logged" in ft
    assert 'pcavmae_cli.load("ft")' in ft and "pcav predict -c ft" in ft
    pre = (project.moved / "runs" / "pre" / "README.md").read_text()
    assert "pre-trained audio-visual encoder" in pre and "prototypes: [2, 3]" in pre and "3 epochs logged" in pre
    # an evaluation inside the run folder is added to its card
    run = project.elsewhere / "carded"
    shutil.copytree(project.moved / "runs" / "ft", run)
    result = pcav("evaluate", "-c", str(run), "--data", str(project.moved / "data" / "eval" / "manifest.jsonl"),
                  cwd=project.elsewhere)  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    card = (run / "README.md").read_text()
    assert "## Evaluations" in card and "`eval/classification-eval` (classification on" in card and "top1" in card
    (run / "README.md").unlink()
    assert pcav("card", str(run), cwd=project.elsewhere).returncode == 0
    assert (run / "README.md").read_text() == card
    bad = pcav("card", str(project.elsewhere), cwd=project.elsewhere)
    assert bad.returncode == 1 and "not a run folder" in bad.stderr


# ---------------------------------------------------------------- search


@pytest.fixture(scope="module")
def library(project):
    """Four short videos (two tones x two picture sizes) embedded by the pre-training run."""
    folder = project.elsewhere / "library_videos"
    for k, (tone, size) in enumerate([(300, "64x48"), (300, "96x64"), (2000, "64x48"), (2000, "96x64")]):
        make_mp4(folder / f"v{k}.mp4", 3.0, size=size, tone=f"0.5*sin(2*PI*{tone}*t)")
    out = project.elsewhere / "library"
    result = pcav("embed", "-c", str(project.moved / "runs" / "pre"), "--videos", str(folder), "--out", str(out),
                  cwd=project.elsewhere)  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    return SimpleNamespace(path=out, videos=folder)


def test_search_by_clip_is_the_brute_force_ranking(project, library):
    from pcavmae_cli.engine.search import nearest, open_library

    lib = open_library(library.path)
    assert lib.ids == ["v0", "v1", "v2", "v3"] and lib.checkpoint.endswith("runs/pre/checkpoints/last")
    joint = np.load(library.path / "joint.npy")
    joint = joint / np.linalg.norm(joint, axis=1, keepdims=True)
    hits = nearest(lib, joint[0], "joint", 3, exclude=0)
    expected = np.argsort(-(joint @ joint[0]))[1:]
    assert [h.row for h in hits] == expected.tolist() and [h.rank for h in hits] == [1, 2, 3]
    assert [h.score for h in hits] == pytest.approx((joint @ joint[0])[expected].tolist(), abs=1e-6)
    ranked = nearest(lib, joint[0], "joint", 3, exclude=0, use_faiss=True)  # IVF with one list: exact here
    assert [h.row for h in ranked] == [h.row for h in hits] and lib.index_path("joint").is_file()
    assert [h.score for h in ranked] == pytest.approx([h.score for h in hits], abs=1e-5)
    again = nearest(open_library(library.path), joint[0], "joint", 3, exclude=0, use_faiss=True)  # the kept index
    assert [h.row for h in again] == [h.row for h in hits]
    result = pcav("search", str(library.path), "--clip", "v0", "--top", "2", cwd=project.elsewhere)
    assert result.returncode == 0, result.stderr
    assert "v0" not in result.stdout.split("clips")[1] and f"{hits[0].score:.3f}" in result.stdout


def test_search_by_video_and_by_sound(project, library):
    page = project.elsewhere / "hits" / "page.html"
    result = pcav("search", str(library.path), "--video", str(library.videos / "v2.mp4"), "--top", "4", "--html",
                  str(page), "--device", "cpu", cwd=project.elsewhere)  # fmt: skip
    assert result.returncode == 0, result.stderr
    first = result.stdout.split("┃ source")[1].splitlines()[2]
    assert "v2" in first and "1.000" in first  # the video itself, cosine 1
    text = page.read_text()
    assert text.count("<tr><td>") == 4 and len(list((page.parent / "page_files").glob("*.jpg"))) == 4
    assert '<video controls preload="none" width="240" src="../library_videos/v' in text
    # a sound alone: z_a from the audio path only, the same as the full forward's
    model = load(project.moved / "runs" / "pre", device="cpu")
    clip = model.read_video(library.videos / "v2.mp4")
    torch.testing.assert_close(model.audio_features(clip.fbank)["z_a"], model.features(clip.fbank[None], clip.frames[None])["z_a"])
    # read_audio decodes a file's sound as preprocessing does (the clip store keeps the fbank in fp16)
    torch.testing.assert_close(model.read_audio(library.videos / "v2.mp4"), clip.fbank.float(), atol=5e-3, rtol=0)
    wav = project.elsewhere / "tone.wav"
    t = np.arange(16000 * 2) / 16000
    write_wav(wav, (0.3 * 32767 * np.sin(2 * np.pi * 2000 * t)).astype(np.int16))
    result = pcav("search", str(library.path), "--audio", str(wav), "--top", "2", "--device", "cpu", cwd=project.elsewhere)
    assert result.returncode == 0, result.stderr
    assert "a->v, 4 clips" in result.stdout and result.stdout.count(" v") >= 2


def test_search_errors_are_one_line(project, library):
    cases = [
        ([str(library.path)], "exactly one query"),
        ([str(library.path), "--audio", str(library.videos / "v0.mp4"), "--mode", "av->av"], "--mode a->v"),
        ([str(library.path), "--clip", "nope"], "not in the library"),
        ([str(project.elsewhere / "nothing"), "--clip", "v0"], "not a pcav embed output"),
        ([str(library.path), "--clip", "v0", "--mode", "x"], "--mode: expected"),
    ]
    for args, message in cases:
        result = pcav("search", *args, cwd=project.elsewhere)
        assert result.returncode == 1 and message in result.stderr and result.stderr.count("\n") == 1, (args, result.stderr)


# ---------------------------------------------------------------- export


def test_onnx_export_gives_pcavs_scores_on_a_real_video(project):
    import onnxruntime as ort

    out = project.elsewhere / "exported"
    result = pcav("export", str(project.lone), str(out), cwd=project.elsewhere)
    assert result.returncode == 0, result.stderr + result.stdout
    meta = json.loads((out / "export.json").read_text())
    assert meta["outputs"] == ["scores", "logits"] and meta["labels"] == ["class 0", "class 1", "class 2"]
    assert meta["max_abs_diff"] <= meta["tolerance"] == 1e-4
    model = load(project.lone, device="cpu")
    clips = [model.read_video(project.videos / name) for name in ("long.mp4", "short clip.mp4")]
    fbank = torch.stack([c.fbank.float() for c in clips])
    frames = torch.stack([c.frames for c in clips])  # (2, 10, 3, S, S): another B and K than traced
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    scores, logits = session.run(None, {"fbank": fbank.numpy(), "frames": frames.numpy()})
    torch.testing.assert_close(torch.from_numpy(scores), model.scores(fbank, frames), atol=1e-4, rtol=0)
    assert logits.shape == (2, 10, 3)


def test_torch_export_of_a_pretraining_run_gives_its_features(project):
    from pcavmae_cli.engine.export import ENCODER_OUTPUTS, export

    result = export(project.moved / "runs" / "pre", project.elsewhere / "exported_pre", fmt="torch")
    assert result.files[0].name == "model.pt2" and result.outputs == ENCODER_OUTPUTS
    model = load(project.moved / "runs" / "pre", device="cpu")
    clip = model.read_video(project.videos / "long.mp4")
    got = torch.export.load(str(result.files[0])).module()(clip.fbank.float()[None], clip.frames[None])
    want = model.features(clip.fbank[None], clip.frames[None])
    for name, value in zip(ENCODER_OUTPUTS, got):
        torch.testing.assert_close(value, want[name], atol=1e-4, rtol=0)
    bad = pcav("export", str(project.lone), str(project.elsewhere / "x"), "--format", "tflite", cwd=project.elsewhere)
    assert bad.returncode == 1 and "onnx or torch" in bad.stderr


def test_predict_a_manifest_of_preprocessed_clips(project):
    from pcavmae_cli.engine.data.dataset import AudioVisualDataset

    model = load(project.lone, device="cpu")
    manifest = project.moved / "data" / "eval" / "manifest.jsonl"
    result = predict_videos(model, project.elsewhere / "manifest.csv", data=manifest, top_k=1)
    assert [v.video for v in result.videos] == [f"eval{i}" for i in range(6)] and result.n_failed == 0
    ds = AudioVisualDataset(manifest, model.cfg.data, frames="all", compact=True)
    for k, v in enumerate(result.videos):
        sample = ds[k]
        torch.testing.assert_close(v.window_scores[0], model.scores(sample["fbank"][None], sample["frames"][None])[0])
        assert result.top[v.video][0].name == model.labels[int(v.window_scores[0].argmax())]


def test_the_ivf_index_finds_the_exact_neighbours_of_clustered_clips(tmp_path):
    """Embeddings of real clips cluster (by class, by source); on such data the approximate
    index must return what brute force returns, be kept, and be rebuilt when the library grows."""
    from pcavmae_cli.engine.search import Library, ivf_lists, nearest

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 32)).astype(np.float32)
    x = centres[rng.integers(0, 50, 5000)] + 0.3 * rng.standard_normal((5000, 32)).astype(np.float32)

    def library(rows):
        return Library(tmp_path, [str(i) for i in range(len(rows))], [""] * len(rows), [""] * len(rows),
                       {"joint": lambda: rows}, None)  # fmt: skip

    lib = library(x)
    assert ivf_lists(5000) == 128 and ivf_lists(10) == 1
    recalls = []
    for q in x[rng.integers(0, 5000, 20)] + 0.1 * rng.standard_normal((20, 32)).astype(np.float32):
        exact = {h.row for h in nearest(lib, q, "joint", 10)}
        recalls.append(len(exact & {h.row for h in nearest(lib, q, "joint", 10, use_faiss=True)}) / 10)
    assert np.mean(recalls) >= 0.95, recalls
    stamp = lib.index_path("joint").stat().st_mtime_ns
    nearest(library(x), x[0], "joint", 5, use_faiss=True)
    assert lib.index_path("joint").stat().st_mtime_ns == stamp  # kept, not rebuilt
    grown = library(np.concatenate([x, x[:100]]))
    assert len(nearest(grown, x[0], "joint", 5, use_faiss=True)) == 5
    assert lib.index_path("joint").stat().st_mtime_ns != stamp  # another row count: rebuilt


def test_a_lone_pretraining_run_is_pointed_at_its_data_by_an_override(project):
    lone = project.elsewhere / "pre_alone"
    shutil.copytree(project.moved / "runs" / "pre", lone)
    out = project.elsewhere / "galleries"
    result = pcav("visualize", "prototypes", str(lone), "--out", str(out), "--device", "cpu", cwd=project.elsewhere)
    assert result.returncode == 1 and "data.train_manifest=PATH" in result.stderr and result.stderr.count("\n") == 1
    manifest = project.moved / "data" / "train" / "manifest.jsonl"
    result = pcav("visualize", "prototypes", str(lone), "--out", str(out), "--device", "cpu",
                  f"data.train_manifest={manifest}", cwd=project.elsewhere)  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    assert (out / "index.html").is_file() or list(out.glob("*.html"))
