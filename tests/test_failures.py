"""What a hostile machine or user does to pcav, and the one line each gets back.

- leftovers: temporaries of killed writers are removed, live writers' are kept;
- a full disk (ENOSPC) while writing a checkpoint or preprocessing: one line naming the file,
  exit status 1, earlier outputs untouched;
- a truncated ``model.safetensors`` for evaluate, embed, explain and resume: a ``UserError``
  naming it;
- recipes: non-UTF-8 files, NaN and infinity refused naming the key; ``recipes show`` runs the
  start-up checks and ``recipes check`` validates without training.

Full disks are simulated: in-process by making the write fail as safetensors, torch and the
file system do when a disk fills (the messages were taken from a real full tmpfs), and for the
CLI by a ``sitecustomize`` on ``PYTHONPATH`` that makes ``open`` refuse one file name with ENOSPC.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap

import ffmpeg
import pytest
import safetensors
import torch

from pcavmae_cli.engine import config, files, tensor_io
from pcavmae_cli.engine.data import preprocess as pre
from pcavmae_cli.engine.embed import embed
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.evaluate.runner import evaluate
from pcavmae_cli.engine.train import checkpoint as ckpt
from pcavmae_cli.engine.train.pretrain import pretrain
from pcavmae_cli.engine.viz.explain import Explainer
from tests.cli_helpers import PCAV, pcav
from tests.test_pretrain import corpus, recipe  # noqa: F401  (the tiny corpus fixture)

FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors on a full tmpfs


def dead_pid() -> int:
    """The PID of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---------------------------------------------------------------- leftovers


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    root = ckpt.checkpoints_root(tmp_path)
    root.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = dead_pid()
        stale = [root / f".last.tmp-{dead}", root / f".best.tmp-{dead}.3@{files.HOST}"]
        kept = [root / f".last.tmp-{live.pid}.0@{files.HOST}", root / f".last.tmp-{os.getpid()}",
                root / f".last.tmp-{dead}.0@another-node"]  # fmt: skip
        for folder in (*stale, *kept):
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"a whole model copy")
        model = torch.nn.Linear(2, 2)
        ckpt.save_checkpoint(tmp_path, "last", model=model, momentum=model, state={"step": 1}, config_text="seed: 0\n")
        assert not any(p.exists() for p in stale)
        assert all(p.is_dir() for p in kept)
        # On start-up (resume or not) too, and for atomically written files.
        (root / f".best.tmp-{dead}").mkdir()
        ckpt.resume_point(tmp_path, resume=True)
        assert not (root / f".best.tmp-{dead}").exists()
        leftover = tmp_path / f".index.csv.tmp-{dead}.0@{files.HOST}"
        leftover.write_text("half")
        files.atomic_write_text(tmp_path / "index.csv", "row,id\n")
        assert not leftover.exists() and (tmp_path / "index.csv").read_text() == "row,id\n"
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------- full disks


def save_two(tmp_path):
    model = torch.nn.Linear(3, 2)
    save = lambda step: ckpt.save_checkpoint(  # noqa: E731
        tmp_path, "last", model=model, momentum=model, state={"step": step}, config_text="seed: 0\n")
    save(1)
    return save


def assert_only_the_first_checkpoint(tmp_path):
    root = ckpt.checkpoints_root(tmp_path)
    assert [p.name for p in root.iterdir()] == ["last"]
    assert ckpt.load_state(root / "last") == {"step": 1}


def test_a_full_disk_in_a_weights_file_is_the_os_error_naming_it(tmp_path, monkeypatch):
    save = save_two(tmp_path)

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\x08\x00\x00")  # the part that fitted
        raise safetensors.SafetensorError(FULL)

    monkeypatch.setattr(tensor_io.st, "save_file", full)
    with pytest.raises(OSError) as caught:
        save(2)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename.endswith("model.safetensors")
    assert files.storage_error_line(caught.value).startswith(f"{caught.value.filename}: No space left on device")
    assert_only_the_first_checkpoint(tmp_path)


def test_a_full_disk_in_the_training_state_is_the_os_error_naming_it(tmp_path, monkeypatch):
    save = save_two(tmp_path)

    class FullDisk:
        """A file that takes 100 bytes, then fails as a full disk does."""

        def __init__(self, path, mode):
            self.fh, self.room = open(path, mode), 100

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(data)
            return self.fh.write(data)

        def flush(self):
            self.fh.flush()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(tensor_io, "open", FullDisk, raising=False)
    with pytest.raises(OSError) as caught:
        save(2)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename.endswith("state.pt")
    assert_only_the_first_checkpoint(tmp_path)


def test_a_full_disk_stops_preprocess_and_keeps_the_earlier_manifest(tmp_path, mp4_factory, monkeypatch):
    src, out = tmp_path / "videos", tmp_path / "out"
    mp4_factory(src / "a.mp4", 1.5, size="64x48")
    cfg = config.load_recipe("base")
    first = pre.preprocess(src, out, cfg.data, jobs=1)
    before = first.manifest.read_bytes()
    mp4_factory(src / "b.mp4", 1.5, size="64x48")

    def full(*args, **kwargs):
        raise ffmpeg.Error("ffmpeg", b"", b"[image2 @ 0x1] Could not write frame_3.jpg: No space left on device\n")

    monkeypatch.setattr(pre, "_run_ffmpeg", full)
    with pytest.raises(OSError) as caught:
        pre.preprocess(src, out, cfg.data, jobs=1)
    assert caught.value.errno == errno.ENOSPC and ".tmp-b-" in caught.value.filename
    assert first.manifest.read_bytes() == before  # not a failure of clip b: the run stopped
    assert sorted(p.name for p in (out / "clips").iterdir()) == ["a"]


SITECUSTOMIZE = '''
"""Test fault injection: opening a file named $PCAV_TEST_FULL_DISK for writing fails with ENOSPC."""
import builtins, errno, io, os

_open, _name = io.open, os.environ["PCAV_TEST_FULL_DISK"]


def _full_open(file, mode="r", *args, **kwargs):
    if any(m in mode for m in "wax+") and _name in os.path.basename(str(file)):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
    return _open(file, mode, *args, **kwargs)


builtins.open = io.open = _full_open
'''


def test_the_cli_prints_a_full_disk_as_one_line_and_keeps_the_outputs(tmp_path, mp4_factory):
    src, out = tmp_path / "videos", tmp_path / "out"
    mp4_factory(src / "a.mp4", 1.5, size="64x48")
    assert pcav("preprocess", str(src), str(out)).returncode == 0
    before = (out / "manifest.jsonl").read_bytes()
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "inject"), "PCAV_TEST_FULL_DISK": "manifest.jsonl",
           "COLUMNS": "200", "NO_COLOR": "1"}  # fmt: skip
    run = subprocess.run([str(PCAV), "preprocess", str(src), str(out)], capture_output=True, text=True, env=env)
    assert run.returncode == 1, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith(f"error: {out}/.manifest.jsonl.tmp-") and "No space left on device" in lines[0]
    assert (out / "manifest.jsonl").read_bytes() == before
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_programming_errors_are_not_storage_errors():
    assert files.storage_error_line(OSError(errno.EBADF, "Bad file descriptor")) is None
    assert files.storage_error_line(ValueError("x")) is None
    read_only = OSError(errno.EROFS, "Read-only file system", "/ro/x")
    assert files.storage_error_line(read_only) == "/ro/x: Read-only file system"


# ---------------------------------------------------------------- truncated weights


@pytest.fixture(scope="module")
def tiny_run(corpus, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("failures") / "run"
    pretrain(recipe(corpus, run_dir))
    return run_dir


def test_a_truncated_model_file_is_one_line_naming_it(corpus, tiny_run, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    weights = run / "checkpoints" / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copyfile(weights, run / "checkpoints" / "best" / "model.safetensors")
    named = f"{weights.parent.parent}/.*/model.safetensors: not a complete safetensors file"
    with pytest.raises(UserError, match=named):
        evaluate("retrieval", run, corpus, out=tmp_path / "eval")
    with pytest.raises(UserError, match=named):
        embed(run, tmp_path / "emb", data=corpus)
    with pytest.raises(UserError, match=named):
        Explainer(run, device="cpu")
    with pytest.raises(UserError, match=named):
        pretrain(recipe(corpus, run, "train.resume=true"))
    cli = pcav("evaluate", "--task", "retrieval", "--checkpoint", str(run), "--data", str(corpus))
    assert cli.returncode == 1 and len(cli.stderr.strip().splitlines()) == 1, cli.stderr
    assert "model.safetensors: not a complete safetensors file" in cli.stderr
    assert not (tmp_path / "emb").exists() and not (tmp_path / "eval").exists()


def test_a_truncated_prototype_file_is_one_line_naming_it(tiny_run, tmp_path):
    from pcavmae_cli.engine.prototypes import load_prototypes

    folder = tmp_path / "prototypes"
    shutil.copytree(tiny_run / "prototypes", folder)
    path = sorted(folder.glob("*.safetensors"))[-1]
    path.write_bytes(path.read_bytes()[:40])
    number = int(path.stem.rsplit("epoch", 1)[1])  # files are named by the epoch's number, from 1
    with pytest.raises(UserError, match=f"{path}: not a complete safetensors file"):
        load_prototypes(folder, number - 1)


# ---------------------------------------------------------------- recipes


def test_a_recipe_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("extends: demo\ndescription: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match=rf"{path}:2: not UTF-8 text \(byte 0xe9\)"):
        config.load_recipe(str(path))
    shown = pcav("recipes", "show", "--raw", str(path))
    assert shown.returncode == 1 and shown.stderr.count("\n") == 1 and "not UTF-8" in shown.stderr


@pytest.mark.parametrize("override", ["optim.lr=nan", "optim.lr=.inf", "optim.min_lr=-.inf", "optim.betas=[0.9, .nan]",
                                      "data.audio.fbank.std=1e400", "optim.grad_clip=inf"])  # fmt: skip
def test_non_finite_numbers_are_refused_naming_the_key(override):
    key = override.split("=")[0].replace("betas", r"betas\.1") if "betas" in override else override.split("=")[0]
    with pytest.raises(UserError, match=rf"key '{key}' expects a finite number"):
        config.load_recipe("demo", [override])


def test_recipes_show_runs_the_start_up_checks_and_check_validates(corpus):  # noqa: F811
    bad = ["optim.effective_batch=3"]  # not a multiple of the batch size: pretrain refuses it
    for command in ("show", "check"):
        run = pcav("recipes", command, "demo", *bad)
        assert run.returncode == 1 and run.stdout == "", run.stdout
        assert run.stderr.strip().splitlines() == [
            "error: key 'optim.effective_batch' (3) must be a multiple of 'data.loader.batch_size' (8)"]
    ok = pcav("recipes", "check", "demo", f"data.train_manifest={corpus}", "data.eval_manifest=null",
              "prototypes.num_clusters=[2, 3]")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "ok: demo is a valid recipe (pre-training)" and ok.stderr == ""
