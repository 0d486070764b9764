"""``pcav demo``: the main job on the built-in demo corpus, stage after stage.

Stages: demo data -> preprocess (train and eval splits) -> fbank statistics -> pre-training
(``engine.train.pretrain``, run folder ``OUT/runs/pretrain``) -> fine-tuning on the train split
(``engine.train.finetune`` with the ``finetune_demo`` recipe, ``OUT/runs/finetune``) ->
evaluation on the held-out eval split: the fine-tuned classifier (10-frame averaging), then
the pre-trained encoders' frozen features (linear probe, kNN, retrieval, and a linear probe of a
randomly initialised model of the same size as the reference) -> figures (curves, t-SNE,
reconstructions, prototype galleries and the explanation of one held-out clip, under
``OUT/runs/pretrain/plots``). The resolved recipes, with the
corpus's own paths and statistics as overrides, are written to ``OUT/recipe.yaml`` and
``OUT/finetune_recipe.yaml`` so that later commands can reuse them. Stages that this version
does not have yet are listed in the result, never faked.

Overrides given to the demo apply to the pre-training recipe; those of ``model.*`` and
``data.*`` keys apply to the fine-tuning recipe too (the encoders must match), which takes its
own overrides as well (``finetune_overrides``).

Running the demo again reuses what is there: the corpus, the preprocessed clips, and the
pre-training and fine-tuning runs, which are resumed from ``checkpoints/last`` (so a demo
stopped with Ctrl-C goes on where it stopped, and a finished one is not trained again).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pcavmae_cli.engine import config, progress
from pcavmae_cli.engine.data.demo_corpus import make_demo_corpus
from pcavmae_cli.engine.data.manifest import atomic_write_text
from pcavmae_cli.engine.data.preprocess import preprocess
from pcavmae_cli.engine.data.stats import fbank_stats
from pcavmae_cli.engine.evaluate.runner import evaluate
from pcavmae_cli.engine.progress import ProgressReporter
from pcavmae_cli.engine.train.checkpoint import FINETUNE_FILES, find_checkpoint
from pcavmae_cli.engine.train.finetune import finetune
from pcavmae_cli.engine.train.pretrain import pretrain
from pcavmae_cli.engine.viz.report import demo_figures

NOT_YET: tuple[str, ...] = ()
SHARED_PREFIXES = ("model.", "data.")  # demo overrides that reach the fine-tuning recipe too


@dataclass
class StageResult:
    name: str
    seconds: float
    summary: str


@dataclass
class DemoMetric:
    """One row of the demo's metrics table."""

    what: str  # e.g. "fine-tuned (av), held-out clips"
    metric: str  # e.g. "top1"
    value: float | None
    source: Path  # the metrics.json it comes from


@dataclass
class DemoResult:
    out: Path
    recipe_path: Path
    stages: list[StageResult] = field(default_factory=list)
    not_yet: tuple[str, ...] = NOT_YET
    metrics: list[DemoMetric] = field(default_factory=list)
    finetune_recipe_path: Path | None = None
    figures: list[Path] = field(default_factory=list)


class Reporter(ProgressReporter, Protocol):
    """How the demo shows progress: bars, plus a line when a stage is done (the CLI uses Rich)."""

    def stage_done(self, result: StageResult) -> None: ...


class SilentReporter(progress.SilentReporter):
    """A reporter that shows nothing (tests, library use)."""

    def stage_done(self, result: StageResult) -> None:
        pass


def run_demo(
    out: str | Path,
    *,
    recipe: str = "demo",
    overrides: list[str] | None = None,
    finetune_recipe: str = "finetune_demo",
    finetune_overrides: list[str] | None = None,
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
    shared = [o for o in overrides if o.startswith(SHARED_PREFIXES)]
    finetune_overrides = [*shared, *(finetune_overrides or [])]
    cfg = config.load_recipe(recipe, overrides)  # a bad override fails here, before any work
    config.load_recipe(finetune_recipe, finetune_overrides)

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
    corpus_keys = [
        f"data.train_manifest={manifests['train']}",
        f"data.eval_manifest={manifests['eval']}",
        f"data.label_csv={corpus.label_csv}",
        f"data.audio.fbank.mean={stats.mean:.6f}",
        f"data.audio.fbank.std={stats.std:.6f}",
    ]
    cfg = config.load_recipe(recipe, [*ours, *corpus_keys, *overrides])
    atomic_write_text(result.recipe_path, config.dump_yaml(cfg))

    started = time.perf_counter()
    cfg.train.resume = find_checkpoint(cfg.train.run_dir, "last") is not None
    run = pretrain(cfg, reporter)
    first, last = run.epochs[0], run.epochs[-1]
    stage(
        "pretrain", started,
        f"loss {first['loss_total']:.3f} (epoch 1) -> {last['loss_total']:.3f} (epoch {last['epoch']}), "
        f"{run.steps} steps -> {run.run_dir}",
    )  # fmt: skip

    started = time.perf_counter()
    ft_dir = out / "runs" / "finetune"
    ft_cfg = config.load_recipe(
        finetune_recipe, [f"train.run_dir={ft_dir}", f"finetune.init_from={run_dir}", *corpus_keys, *finetune_overrides]
    )
    ft_cfg.train.resume = find_checkpoint(ft_dir, "last", FINETUNE_FILES) is not None
    result.finetune_recipe_path = out / "finetune_recipe.yaml"
    atomic_write_text(result.finetune_recipe_path, config.dump_yaml(ft_cfg))
    tuned = finetune(ft_cfg, reporter)
    metric, last_ft = tuned.metric, tuned.epochs[-1]
    stage(
        "finetune", started,
        f"{ft_cfg.finetune.mode}, loss {tuned.epochs[0]['loss']:.3f} -> {last_ft['loss']:.3f}, "
        f"validation {metric} {_percent(last_ft.get(f'val_{metric}'))} (epoch {last_ft['epoch']}) -> {tuned.run_dir}",
    )  # fmt: skip

    eval_manifest = manifests["eval"]
    started = time.perf_counter()
    classified = evaluate("classification", ft_dir, eval_manifest, reporter=reporter)
    held_out = f"fine-tuned ({ft_cfg.finetune.mode}), held-out clips"
    for name in ("top1", "top5") if ft_cfg.data.label_mode == "single" else ("mAP", "mAUC", "d_prime"):
        result.metrics.append(DemoMetric(held_out, name, classified.metrics[name], classified.files[0]))
    stage(
        "evaluate", started,
        f"{classified.record['n_clips']} held-out clips, frames averaged: {metric} "
        f"{_percent(classified.metrics[metric])} -> {classified.out_dir}",
    )  # fmt: skip

    started = time.perf_counter()
    frozen = [("linear-probe", False, "linear probe, pre-trained"), ("linear-probe", True, "linear probe, random init"),
              ("knn", False, "kNN, pre-trained"), ("knn", True, "kNN, random init")]  # fmt: skip
    for task, random_init, what in frozen:
        probe = evaluate(task, run_dir, eval_manifest, train_data=manifests["train"], random_init=random_init,
                         reporter=reporter)  # fmt: skip
        probe_metric = "top1" if probe.label_mode == "single" else "mAP"
        result.metrics.append(DemoMetric(what, probe_metric, probe.metrics[probe_metric], probe.files[0]))
    retrieval = evaluate("retrieval", run_dir, eval_manifest, reporter=reporter)
    for name in ("a2v_r1", "a2v_r5", "v2a_r1", "v2a_r5", "a2v_median_rank", "v2a_median_rank"):
        result.metrics.append(DemoMetric("retrieval, pre-trained", name, retrieval.metrics[name], retrieval.files[0]))
    stage(
        "frozen features", started,
        f"linear probe, kNN, retrieval on the pre-trained encoders -> {run_dir / 'eval'}",
    )

    started = time.perf_counter()
    result.figures = demo_figures(run_dir, manifests["train"], finetune_dir=ft_dir, device=cfg.train.device)
    stage("figures", started, f"{len(result.figures)} files -> {run_dir / 'plots'}")
    return result


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"
