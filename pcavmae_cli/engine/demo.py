"""``pcav demo``: the main job on the built-in demo corpus, stage after stage.

Stages: demo data -> preprocess (train and eval splits) -> fbank statistics -> pre-training
(``engine.train.pretrain``, run folder ``OUT/runs/pretrain``). The resolved recipe, with the
corpus's own paths and statistics as overrides, is written to ``OUT/recipe.yaml`` so that later
commands can reuse it. Stages that this version does not have yet are listed in the result,
never faked.

Running the demo again reuses what is there: the corpus, the preprocessed clips, and the
pre-training run, which is resumed from ``checkpoints/last`` (so a demo stopped with Ctrl-C
goes on where it stopped, and a finished one is not trained again).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ContextManager, Protocol

from pcavmae_cli.engine import config
from pcavmae_cli.engine.data.demo_corpus import make_demo_corpus
from pcavmae_cli.engine.data.manifest import atomic_write_text
from pcavmae_cli.engine.data.preprocess import preprocess
from pcavmae_cli.engine.data.stats import fbank_stats
from pcavmae_cli.engine.train.checkpoint import find_checkpoint
from pcavmae_cli.engine.train.pretrain import pretrain

NOT_YET = ("finetune", "evaluate", "figures")


@dataclass
class StageResult:
    name: str
    seconds: float
    summary: str


@dataclass
class DemoResult:
    out: Path
    recipe_path: Path
    stages: list[StageResult] = field(default_factory=list)
    not_yet: tuple[str, ...] = NOT_YET


class Reporter(Protocol):
    """How the demo shows progress; the CLI implements it with Rich."""

    def progress(self, description: str, total: int) -> ContextManager[Callable[..., None]]: ...

    def stage_done(self, result: StageResult) -> None: ...


class SilentReporter:
    """A reporter that shows nothing (tests, library use)."""

    @contextlib.contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        yield lambda n=1, note="": None

    def stage_done(self, result: StageResult) -> None:
        pass


def run_demo(
    out: str | Path,
    *,
    recipe: str = "demo",
    overrides: list[str] | None = None,
    seed: int = 0,
    classes: int = 6,
    clips_per_class: int = 10,
    eval_per_class: int = 2,
    reporter: Reporter | None = None,
) -> DemoResult:
    """Run every available stage under ``out`` and return what each did and how long it took."""
    out = Path(out)
    reporter = reporter or SilentReporter()
    result = DemoResult(out=out, recipe_path=out / "recipe.yaml")
    overrides = list(overrides or [])
    cfg = config.load_recipe(recipe, overrides)  # a bad override fails here, before any work

    def stage(name: str, started: float, summary: str) -> None:
        done = StageResult(name, time.perf_counter() - started, summary)
        result.stages.append(done)
        reporter.stage_done(done)

    started = time.perf_counter()
    n_clips = classes * clips_per_class
    with reporter.progress("demo data", n_clips) as advance:
        corpus = make_demo_corpus(
            out / "corpus", classes=classes, clips_per_class=clips_per_class,
            eval_per_class=eval_per_class, seed=seed, progress=advance,
        )
    stage("demo data", started, f"{n_clips} clips, {classes} classes -> {corpus.videos}")

    manifests = {}
    for split in ("train", "eval"):
        started = time.perf_counter()
        n_split = classes * (eval_per_class if split == "eval" else clips_per_class - eval_per_class)
        with reporter.progress(f"preprocess {split}", n_split) as advance:
            report = preprocess(
                corpus.segment_csvs[split], out / "data" / split, cfg.data,
                videos=corpus.videos, progress=advance,
            )
        manifests[split] = report.manifest
        stage(f"preprocess {split}", started, f"{report.n_ok} clips, {report.n_failed} failures -> {report.manifest}")

    started = time.perf_counter()
    with reporter.progress("fbank stats", n_clips - classes * eval_per_class) as advance:
        stats = fbank_stats(manifests["train"], cfg.data, progress=advance)
    stage("fbank stats", started, f"mean {stats.mean:.4f}, std {stats.std:.4f} over {stats.n_clips} clips")

    run_dir = out / "runs" / "pretrain"
    n_train = classes * (clips_per_class - eval_per_class)
    ours = [f"train.run_dir={run_dir}"]
    if cfg.prototypes is not None and cfg.prototypes.method == "kmeans":
        # The demo recipe's k-means granularities are (classes, 2 x classes) of the default
        # corpus; follow the corpus actually made, never asking for more clusters than clips.
        ours.append(f"prototypes.num_clusters=[{min(classes, n_train)}, {min(2 * classes, n_train)}]")
    overrides = [
        *ours,
        f"data.train_manifest={manifests['train']}",
        f"data.eval_manifest={manifests['eval']}",
        f"data.label_csv={corpus.label_csv}",
        f"data.audio.fbank.mean={stats.mean:.6f}",
        f"data.audio.fbank.std={stats.std:.6f}",
        *overrides,
    ]
    cfg = config.load_recipe(recipe, overrides)
    atomic_write_text(result.recipe_path, config.dump_yaml(cfg))

    started = time.perf_counter()
    cfg.train.resume = find_checkpoint(cfg.train.run_dir, "last") is not None
    run = pretrain(cfg, reporter)
    first, last = run.epochs[0], run.epochs[-1]
    stage(
        "pretrain", started,
        f"loss {first['loss_total']:.3f} (epoch 1) -> {last['loss_total']:.3f} (epoch {last['epoch'] + 1}), "
        f"{run.steps} steps -> {run.run_dir}",
    )  # fmt: skip
    return result
