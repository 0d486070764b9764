"""Several processes on a CPU (gloo): the same numbers as one process.

- ``pcav pretrain --nproc 2`` (the real CLI, through torchrun) against one process with the same
  recipe: same global batches, masks, gathered negatives, E-step; the step losses agree, and so
  does the representation health of the warm-up epoch (2 + 2 of the 11 clips, ``health.max_rows``).
- A checkpoint written by 2 ranks resumes in 1 process, and one written by 1 resumes in 2; both
  end where an uninterrupted run ends.
- Spherical k-means and the whole E-step on 2 real gloo ranks (uneven shards) against one process.
- ``train.compile=true`` on 2 ranks (torch.compile under DDP) against one eager process.
- ``pcav finetune --nproc 2`` runs, and its validation metrics are one process's for the same
  weights; ``FineTuner.validate`` on 2 real gloo ranks scores each rank's shard of the eval set
  only (3 + 2 clips of 5, 1 + 0 of 1) and every rank gets the scores of one process.

The corpus has 11 clips and the global batch is 4 clips: the last batch of an epoch (3 clips)
splits 2 + 1, and the E-step's shards are 6 + 5 clips, so the uneven cases run every epoch.

Tolerances: the runs do the same arithmetic in a different order (gradients summed per rank and
then averaged, logged values reduced in float64), so fp32 rounding (~1e-7 relative) separates
them. Losses: ``LOSS_TOL`` 1e-4 absolute (measured 8e-7 over the 6 steps); a wrong gradient
scale, a missing gather or other masks move them by 1e-2 or more. Weights: AdamW's step is about
lr * sign(g) where g is near 0, so a rounding-level difference can flip such an element's step,
a difference of up to 2 lr per step: ``WEIGHT_TOL`` is 2 lr = 2e-3 absolute (measured 5.5e-4).
Validation scores: a rank's batches hold other clips than one process's, and a CPU forward pass
may round a row differently in another batch, so ``SCORE_TOL`` is 1e-6 on probabilities in [0, 1]
(measured 1.2e-7, one rounding step); the metrics from them, ``METRIC_TOL`` 1e-6 (measured:
equal). Between ranks the shared scores must be equal bit for bit (a row is summed with zeros).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket

import pytest
import safetensors.torch as st
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from pcavmae_cli.engine import config
from pcavmae_cli.engine.model import Classifier
from pcavmae_cli.engine.prototypes import Comm, TorchComm, density_peaks, estep, spherical_kmeans
from pcavmae_cli.engine.train import checkpoint as ckpt
from pcavmae_cli.engine.train.distributed import bounds, split
from pcavmae_cli.engine.train.finetune import FineTuner
from pcavmae_cli.engine.train.metrics import read_metrics
from pcavmae_cli.engine.progress import SilentReporter
from pcavmae_cli.engine.train.pretrain import StepInfo, TrainingDiverged, pretrain
from pcavmae_cli.engine.train.runtime import Runtime
from pcavmae_cli.engine.train.stop import Interrupted
from pcavmae_cli.engine.train.validation import eval_shard, shared_clip_scores
from tests.cli_helpers import pcav
from tests.test_pretrain import TINY, stop_at
from tests.tiny_corpus import TINY_FINETUNE, write_corpus

N_CLIPS = 11
# global batch 4, 2 batches per step: epochs of 3 batches (4, 4, 3 clips) = 2 optimiser steps;
# 2 + 1 epochs, k-means prototypes from epoch 1: 6 steps, E-steps in epochs 1 and 2.
RUN = [*TINY, "data.loader.batch_size=4", "optim.effective_batch=8", "prototypes.num_clusters=[2, 3]",
       "health.max_rows=4"]  # fmt: skip
LOSS_TOL = 1e-4  # absolute, on losses of order 1 (module docstring)
WEIGHT_TOL = 2e-3  # absolute: twice the demo recipe's optim.lr (module docstring)
SCORE_TOL = 1e-6  # absolute, on probabilities: a rank's batches differ from one process's (module docstring)
METRIC_TOL = 1e-6  # absolute, on validation metrics computed from those scores


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """11 clips of two classes (a 12-clip tiny corpus without its last clip)."""
    manifest = write_corpus(tmp_path_factory.mktemp("dist_corpus"), 2, 6)
    lines = manifest.read_text().splitlines()[:N_CLIPS]
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def args(corpus, run_dir, *extra):
    return [*RUN, f"data.train_manifest={corpus}", f"train.run_dir={run_dir}", *extra]


def step_losses(run_dir):
    """``{step: {part: value}}`` of the step lines of a run's metrics.jsonl."""
    parts = ("loss_total", "loss_infonce", "loss_r", "loss_pje", "loss_pcpe")
    return {r["step"]: {p: r[p] for p in parts} for r in read_metrics(run_dir / "metrics.jsonl", "step")}


def weights(run_dir):
    folder = run_dir / "checkpoints" / "last"
    out = {f"model.{k}": v for k, v in st.load_file(str(folder / "model.safetensors")).items()}
    return out | {f"momentum.{k}": v for k, v in st.load_file(str(folder / "momentum.safetensors")).items()}


def assert_same_losses(got, want):
    assert sorted(got) == sorted(want)
    for step in want:
        for part, value in want[step].items():
            if value is None:
                assert got[step][part] is None, (step, part)
            else:
                assert got[step][part] == pytest.approx(value, abs=LOSS_TOL), (step, part)


def assert_same_weights(got, want):
    assert got.keys() == want.keys()
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst < WEIGHT_TOL, worst


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One process, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    result = pretrain(config.load_recipe("demo", args(corpus, run_dir)))
    assert result.steps == 6
    return run_dir


@pytest.fixture(scope="module")
def two_process_run(corpus, reference, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    done = pcav("pretrain", "--recipe", "demo", "--nproc", "2", *args(corpus, run_dir), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return run_dir, done


def test_two_processes_give_the_losses_of_one(reference, two_process_run):
    run_dir, done = two_process_run
    want, got = step_losses(reference), step_losses(run_dir)
    assert_same_losses(got, want)
    assert None not in got[4].values() and got[6]["loss_pje"] is not None  # every part was compared
    assert_same_weights(weights(run_dir), weights(reference))
    # one summary, from rank 0; every rank logged nothing else to the run folder
    assert done.stdout.count("run folder:") == 1
    assert sorted(p.name for p in (run_dir / "prototypes").iterdir()) == sorted(
        p.name for p in (reference / "prototypes").iterdir()
    )


def test_two_processes_measure_the_health_of_one_on_the_same_clips(reference, two_process_run):
    """Epoch 0 (warm-up: no E-step) embeds health.max_rows = 4 of the 11 clips for its health, 2 per
    rank; both ranks' figures are one process's on the same 4 clips (same initial weights)."""
    run_dir, _ = two_process_run
    want, got = (read_metrics(run / "metrics.jsonl", "epoch")[0] for run in (reference, run_dir))
    assert not want["prototypes"]
    for key in [f"health_{f}_{m}" for f in ("cos", "rank") for m in ("a", "v", "joint")]:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_the_prototype_files_hold_every_clip(reference, two_process_run):
    """Rank 0 writes the assignment of all 11 clips, gathered from uneven shards (6 + 5)."""
    from pcavmae_cli.engine.prototypes import load_prototypes

    run_dir, _ = two_process_run
    for epoch in (1, 2):
        for mine, theirs in zip(load_prototypes(run_dir / "prototypes", epoch), load_prototypes(reference / "prototypes", epoch)):
            assert mine.assignments.shape == (N_CLIPS,)
            assert torch.equal(mine.assignments, theirs.assignments)
            assert torch.equal(mine.counts, theirs.counts)
            torch.testing.assert_close(mine.gamma, theirs.gamma, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- resume at another world size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pretrain_rank(rank: int, world: int, port: int, overrides: list[str], out_dir: str, mode: str) -> None:
    """One rank of a torchrun-like run (the env:// variables torchrun sets); writes how it ended.

    ``mode`` "term": rank 0 alone gets SIGTERM after ``STOP_STEP``, as when one machine's process
    is told to stop (the handler only sets a flag; the loop goes on to its next batch).
    ``mode`` "nan": rank 1 alone computes a NaN L_r from its 4th batch (epoch 2's first) on.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    from pcavmae_cli.engine.train import objective

    calls = []
    real = objective.reconstruction_loss

    def poisoned(pred, target, mask):  # audio then video of each batch
        calls.append(1)
        return real(pred, target, mask) * (float("nan") if len(calls) > 6 else 1.0)

    if mode == "nan" and rank == 1:
        objective.reconstruction_loss = poisoned

    def term(info: StepInfo) -> None:
        if mode == "term" and rank == 0 and info.step == STOP_STEP:
            os.kill(os.getpid(), signal.SIGTERM)

    outcome = "finished"
    try:
        pretrain(config.load_recipe("demo", overrides), on_step=term)
    except Interrupted as stop:
        outcome = f"stopped at step {stop.step}"
    except TrainingDiverged as exc:
        outcome = f"diverged: {exc}"
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)


def _compiled_rank(rank: int, world: int, port: int, overrides: list[str], out_dir: str) -> None:
    """One rank of a ``train.compile=true`` run, inductor drawing eager's random masks; writes the
    compile warnings it saw (none: no fallback to eager)."""
    import warnings

    import torch._inductor.config as inductor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    with inductor.patch(fallback_random=True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pretrain(config.load_recipe("demo", overrides))
        finally:
            dist.destroy_process_group()
    compile_warnings = [str(w.message) for w in caught if "train.compile" in str(w.message)]
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(compile_warnings))


def test_compile_under_ddp_gives_the_losses_of_one_eager_process(tmp_path):
    """``train.compile=true`` on 2 gloo ranks (DDP's graph splitting, the gathers, unused
    parameters in warm-up) against one eager process: the same step losses. 12 clips, so every
    batch splits 2 + 2 and each rank compiles one graph per stage and prototype state."""
    manifest = write_corpus(tmp_path / "corpus", 2, 6)
    eager_dir, compiled_dir = tmp_path / "eager", tmp_path / "compiled"
    pretrain(config.load_recipe("demo", args(manifest, eager_dir)))
    mp.spawn(_compiled_rank, args=(2, free_port(), args(manifest, compiled_dir, "train.compile=true"), str(tmp_path)),
             nprocs=2)  # fmt: skip
    assert outcomes(tmp_path) == ["", ""]  # no rank fell back to eager
    got = step_losses(compiled_dir)
    assert_same_losses(got, step_losses(eager_dir))
    assert None not in got[4].values() and got[6]["loss_pje"] is not None  # every part was compared


def outcomes(folder) -> list[str]:
    return [(folder / f"rank{r}.txt").read_text() for r in range(2)]


STOP_STEP = 3  # epoch 1 (prototypes on), after its first step: a mid-epoch resume


def test_a_two_rank_checkpoint_resumes_in_one_process(corpus, reference, tmp_path):
    """Also: a stop seen by one rank stops both at the same step, with one checkpoint."""
    run_dir = tmp_path / "run"
    mp.spawn(_pretrain_rank, args=(2, free_port(), args(corpus, run_dir), str(tmp_path), "term"), nprocs=2)
    assert outcomes(tmp_path) == [f"stopped at step {STOP_STEP}"] * 2
    state = torch.load(run_dir / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert state["train"]["step"] == STOP_STEP and state["train"]["position"] == 2
    assert not any(k.startswith("module.") for k in st.load_file(str(run_dir / "checkpoints/last/model.safetensors")))
    pretrain(config.load_recipe("demo", args(corpus, run_dir, "train.resume=true")))
    assert_same_losses(step_losses(run_dir), step_losses(reference))
    assert_same_weights(weights(run_dir), weights(reference))


def test_a_one_process_checkpoint_resumes_in_two(corpus, reference, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupted):
        pretrain(config.load_recipe("demo", args(corpus, run_dir)), on_step=stop_at(STOP_STEP))
    done = pcav("pretrain", "--recipe", "demo", "--nproc", "2", *args(corpus, run_dir, "train.resume=true"), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_losses(step_losses(run_dir), step_losses(reference))
    assert_same_weights(weights(run_dir), weights(reference))


def test_a_nan_on_one_rank_stops_both_with_the_same_message(corpus, tmp_path):
    mp.spawn(_pretrain_rank, args=(2, free_port(), args(corpus, tmp_path / "run"), str(tmp_path), "nan"), nprocs=2)
    first, second = outcomes(tmp_path)
    assert first == second
    assert first.startswith("diverged: loss part 'r' is nan at step 3 (epoch 2")  # batch 4 = epoch 2's first


# ---------------------------------------------------------------- the distributed E-step


# density peaks on an over-clustering: the path several ranks take (max_points_exact 0 makes one
# process take it too, so the two can be compared)
PEAKS = dict(max_points_exact=0, overcluster_k=20, iters=10, seed=5)


def _estep_rank(rank: int, world: int, store_path: str, out_dir: str, x, z_a, z_v, cfg) -> None:
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        start, stop = bounds(x.shape[0], world, rank)
        centroids, assignment = spherical_kmeans(x[start:stop], 5, iters=10, seed=3, comm=TorchComm())
        protos = estep(z_a[start:stop], z_v[start:stop], cfg, epoch=2, comm=TorchComm())
        peaks, clouds = density_peaks(x[start:stop], 2.0, comm=TorchComm(), **PEAKS)
        torch.save({"centroids": centroids, "assignment": assignment, "protos": [vars(p) for p in protos],
                    "peaks": peaks, "clouds": clouds}, os.path.join(out_dir, f"rank{rank}.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_kmeans_estep_and_density_peaks_on_two_ranks_match_one_process(tmp_path):
    gen = torch.Generator().manual_seed(0)
    n, d = 101, 8  # 51 + 50 rows
    centres = torch.randn(5, d, generator=gen) * 3
    x = centres[torch.arange(n) % 5] + torch.randn(n, d, generator=gen)
    z_a, z_v = x + 0.3 * torch.randn(n, d, generator=gen), x + 0.3 * torch.randn(n, d, generator=gen)
    cfg = config.load_recipe("demo", ["prototypes.num_clusters=[3, 6]"]).prototypes
    mp.spawn(_estep_rank, args=(2, str(tmp_path / "store"), str(tmp_path), x, z_a, z_v, cfg), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    want_c, want_a = spherical_kmeans(x, 5, iters=10, seed=3, comm=Comm())
    want = estep(z_a, z_v, cfg, epoch=2, comm=Comm())
    sizes = split(n, 2)
    assert [r["assignment"].shape[0] for r in ranks] == sizes
    for r in ranks:  # every rank holds the same centroids, those of one process
        torch.testing.assert_close(r["centroids"], want_c, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.cat([r["assignment"] for r in ranks]), want_a)
    want_peaks, want_clouds = density_peaks(x, 2.0, comm=Comm(), **PEAKS)
    assert want_peaks.shape[0] > 1
    for r in ranks:
        torch.testing.assert_close(r["peaks"], want_peaks, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.cat([r["clouds"] for r in ranks]), want_clouds)
    for level, p in enumerate(want):
        for r in ranks:
            got = r["protos"][level]
            for name in ("centroids", "p_a", "p_v", "gamma"):
                torch.testing.assert_close(got[name], getattr(p, name), atol=1e-5, rtol=1e-5)
            assert torch.equal(got["counts"], p.counts)
        assert torch.equal(torch.cat([r["protos"][level]["assignments"] for r in ranks]), p.assignments)


# ---------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def ft_corpus(tmp_path_factory):
    """10 training clips of two classes, eval sets of 5 clips (shards 3 + 2) and of 1 clip (1 + 0)."""
    root = tmp_path_factory.mktemp("ft_corpus")
    out = {"train": write_corpus(root, 2, 5), "labels": root / "labels.csv"}
    for name, n in (("val", 5), ("one", 1)):
        manifest = write_corpus(root, 2, 3, seed=1, name=name)
        manifest.write_text("\n".join(manifest.read_text().splitlines()[:n]) + "\n")
        out[name] = manifest
    return out


def ft_args(ft_corpus, run_dir, eval_set="val", *extra):
    return [*TINY_FINETUNE, f"data.train_manifest={ft_corpus['train']}", f"data.eval_manifest={ft_corpus[eval_set]}",
            f"data.label_csv={ft_corpus['labels']}", f"train.run_dir={run_dir}", *extra]  # fmt: skip


def assert_same_metrics(got, want, tol):
    """Validation summaries (``val_`` keys of metrics lines or ``validate``'s dict) within ``tol``;
    a NaN (a class without positives) must be NaN in both."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        if value is None or math.isnan(value):
            assert got[key] is None or math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, abs=tol, rel=0), key


def test_finetune_runs_on_two_processes(tmp_path, reference, ft_corpus):
    """Its validations (each rank scoring a shard of the 5 eval clips) log the metrics one process
    computes for the same weights: those of ``checkpoints/last``, saved right after the last
    epoch's validation, and of ``checkpoints/averaged``."""
    run_dir = tmp_path / "ft_run"
    done = pcav(
        "finetune", "--recipe", "finetune_demo", "--nproc", "2", "--init-from", str(reference),
        *ft_args(ft_corpus, run_dir), "finetune.epochs=2", "finetune.average_from_epoch=1", timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    epochs = read_metrics(run_dir / "metrics.jsonl", "epoch")
    assert [e["epoch"] for e in epochs] == [1, 2]  # written once, by rank 0
    assert all(json.dumps(e["loss"]) != "null" for e in epochs)
    assert (run_dir / "checkpoints" / "last" / "model.safetensors").is_file()

    cfg = config.load_recipe("finetune_demo", ft_args(ft_corpus, tmp_path / "one", "val",
                                                      f"finetune.init_from={reference}"))  # fmt: skip
    one = FineTuner(cfg, SilentReporter(), None)
    (averaged,) = read_metrics(run_dir / "metrics.jsonl", "averaged")
    for line, name in ((epochs[-1], "last"), (averaged, "averaged")):
        ckpt.load_module(run_dir / "checkpoints" / name / "model.safetensors", one.model, one.rt.device)
        want = one.validate(one.model, "validate")
        assert want[one.metric] is not None
        logged = {k[len("val_"):]: v for k, v in line.items() if k.startswith("val_")}
        assert_same_metrics(logged, want, METRIC_TOL)


class Recorder:
    """Patched into ``FineTuner``: how many clips its validation ran through the model, and the
    (scores, targets) it computed the metrics from."""

    def __init__(self):
        from pcavmae_cli.engine.train import finetune

        self.clips, self.scored = 0, None
        frame_logits, metrics = Classifier.frame_logits, finetune.classification_metrics

        def counting(model, fbank, frames):
            self.clips += fbank.shape[0]
            return frame_logits(model, fbank, frames)

        def recording(scores, targets, *args):
            self.scored = scores.clone(), targets.clone()
            return metrics(scores, targets, *args)

        self.patches = [(Classifier, "frame_logits", counting), (finetune, "classification_metrics", recording)]

    def validate(self, cfg) -> dict:
        """A ``FineTuner`` for ``cfg`` (no training), validated once: clips, metrics, scores, targets."""
        self.clips, tuner = 0, FineTuner(cfg, SilentReporter(), None)
        metrics = tuner.validate(tuner.model, "validate")
        return {"clips": self.clips, "metrics": metrics, "scores": self.scored[0], "targets": self.scored[1]}


def _validate_rank(rank: int, world: int, port: int, cases: dict[str, list[str]], out_dir: str) -> None:
    """One rank of a torchrun-like fine-tuning start: ``Recorder.validate`` of each case."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    recorder = Recorder()
    for owner, name, value in recorder.patches:
        setattr(owner, name, value)
    try:
        results = {name: recorder.validate(config.load_recipe("finetune_demo", o)) for name, o in cases.items()}
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_each_rank_validates_its_shard_and_all_get_the_scores_of_one_process(ft_corpus, tmp_path, monkeypatch):
    """5 eval clips on 2 ranks score 3 + 2 clips; 1 clip scores 1 + 0 (an empty shard works, its
    rank contributes zeros). Every rank computes its metrics from the same (N, C) scores -- bit for
    bit, so the same metrics and ``best`` -- and they are one process's to ``SCORE_TOL``."""
    cases = {"five": ("val", "multi_hot"), "five_single": ("val", "single"), "one": ("one", "multi_hot")}

    def overrides(name, where):
        eval_set, mode = cases[name]
        return ft_args(ft_corpus, tmp_path / where / name, eval_set, "finetune.init_from=null",
                       f"data.label_mode={mode}")  # fmt: skip

    per_rank = {name: overrides(name, "ranks") for name in cases}
    mp.spawn(_validate_rank, args=(2, free_port(), per_rank, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    recorder = Recorder()
    for owner, name, value in recorder.patches:
        monkeypatch.setattr(owner, name, value)
    for name in cases:
        want = recorder.validate(config.load_recipe("finetune_demo", overrides(name, "one")))  # same seeded weights
        n = want["scores"].shape[0]
        assert want["clips"] == n and want["scores"].shape == (n, 2)
        assert [r[name]["clips"] for r in ranks] == split(n, 2), name  # each rank ran its shard only
        first, second = (r[name] for r in ranks)
        assert torch.equal(first["scores"], second["scores"]) and torch.equal(first["targets"], second["targets"])
        assert_same_metrics(first["metrics"], second["metrics"], 0.0)
        torch.testing.assert_close(first["scores"], want["scores"], atol=SCORE_TOL, rtol=0)
        assert torch.equal(first["targets"], want["targets"]), name
        assert_same_metrics(first["metrics"], want["metrics"], METRIC_TOL)


def test_a_loader_that_is_not_the_ranks_shard_is_refused():
    """Scoring the whole eval set on a rank (the old way) would fill rows twice: refused."""
    loader = DataLoader(range(5), batch_size=2)
    rt = Runtime(torch.device("cpu"), None, rank=1, world_size=2)
    with pytest.raises(ValueError, match="not rank 1's shard of 2"):
        shared_clip_scores(torch.nn.Identity(), loader, "multi_hot", 2, rt, rows=5, data=None)


def test_in_one_process_the_shard_is_the_whole_eval_set():
    rt = Runtime(torch.device("cpu"), None)
    data = range(5)
    assert eval_shard(data, rt) is data
    assert list(eval_shard(data, Runtime(torch.device("cpu"), None, rank=1, world_size=2))) == [3, 4]
    assert list(eval_shard(range(1), Runtime(torch.device("cpu"), None, rank=1, world_size=2))) == []


# ---------------------------------------------------------------- the --nproc launcher


def test_nproc_starts_torchrun_with_the_same_command_and_refuses_to_nest(monkeypatch):
    from pcavmae_cli.cli.launch import run_under_torchrun, torchrun_command
    from pcavmae_cli.engine.errors import UserError

    cmd = torchrun_command(4, ["pretrain", "--recipe", "demo", "train.run_dir=x"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                       "-m", "pcavmae_cli", "pretrain", "--recipe", "demo", "train.run_dir=x"]  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="already runs under"):
        run_under_torchrun(2, ["pretrain"])


def test_a_short_shard_checks_for_a_stop_as_often_as_the_longest():
    """Under DDP the E-step's stop check is a collective: a shard with fewer batches must call it
    as many times as the longest shard (``rounds``), or the ranks' collectives would pair wrongly."""
    from types import SimpleNamespace

    from pcavmae_cli.engine import config
    from pcavmae_cli.engine.data.fbank import normalise
    from pcavmae_cli.engine.train.estep import embed_training_set
    from pcavmae_cli.engine.train.runtime import Runtime

    class Embedder:
        def embed(self, fbank, frames):
            return SimpleNamespace(z_a=fbank[:, :2], z_v=fbank[:, 2:4])

    data = config.load_recipe("demo").data
    rows = torch.arange(20.0).reshape(5, 4)  # a compact batch: fbank not normalised, uint8 frames
    batch = {"fbank": rows, "frames": torch.zeros(5, 3, 2, 2, dtype=torch.uint8), "index": torch.arange(10, 15)}
    checks = []
    z_a, z_v = embed_training_set(
        Embedder(), _OneBatch(batch, 5), Runtime(torch.device("cpu"), None), check_stop=lambda: checks.append(1),
        first_row=10, rounds=3, data=data,
    )  # fmt: skip
    assert len(checks) == 3
    seen = normalise(rows, data.audio.fbank)
    assert torch.equal(z_a, seen[:, :2]) and torch.equal(z_v, seen[:, 2:4])  # row = manifest index - first_row


class _OneBatch:
    """A loader of one batch over a dataset of ``n`` clips."""

    def __init__(self, batch, n):
        self.batch, self.dataset = batch, range(n)

    def __iter__(self):
        yield self.batch


@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_slices_put_together_are_the_single_process_batches(world):
    from pcavmae_cli.engine.train.data import EpochBatchSampler

    whole = EpochBatchSampler(11, 4, seed=7)
    ranks = [EpochBatchSampler(11, 4, seed=7, rank=r, world_size=world) for r in range(world)]
    for sampler in (whole, *ranks):
        sampler.set_epoch(3, start=1)  # a resumed epoch: the same global batch positions
    for b, batch in enumerate(whole):
        slices = [list(s)[b] for s in ranks]
        assert sum(slices, []) == batch  # clip and sample seed, in order
        assert [len(s) for s in slices] == split(len(batch), world)
