"""``pcav demo``: the main job on the built-in demo corpus, stage after stage.

Stages: demo data -> preprocess (train and eval splits) -> fbank statistics -> one pass over
the training loader. The resolved recipe, with the corpus's own paths and statistics as
overrides, is written to ``OUT/recipe.yaml`` so that later commands can reuse it. Stages that
this version does not have yet are listed in the result, never faked.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ContextManager, Protocol

import torch
from torch.utils.data import DataLoader

from pcavmae_cli.engine import config
from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.data.demo_corpus import make_demo_corpus
from pcavmae_cli.engine.data.manifest import atomic_write_text
from pcavmae_cli.engine.data.preprocess import preprocess
from pcavmae_cli.engine.data.stats import fbank_stats
from pcavmae_cli.engine.schema import Recipe

NOT_YET = ("pretrain", "finetune", "evaluate", "figures")


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

    overrides = [
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
    samples = loader_pass(cfg, reporter)
    seconds = time.perf_counter() - started
    stage("loader pass", started, f"{samples} samples, {samples / seconds:.1f} samples/s")
    return result


def loader_pass(cfg: Recipe, reporter: Reporter) -> int:
    """Read every training sample once through a DataLoader and check what the model will see."""
    torch.manual_seed(cfg.seed)
    dataset = AudioVisualDataset.for_split(cfg.data, "train")
    loader = DataLoader(
        dataset, batch_size=cfg.data.loader.batch_size, shuffle=True, num_workers=cfg.data.loader.num_workers
    )
    fb, video = cfg.data.audio.fbank, cfg.data.video
    seen = 0
    with reporter.progress("loader pass", len(loader)) as advance:
        for batch in loader:
            n = batch["fbank"].shape[0]
            assert batch["fbank"].shape == (n, fb.target_frames, fb.num_mel_bins)
            assert batch["frames"].shape == (n, 3, video.crop_size, video.crop_size)
            seen += n
            advance(1, f"{seen} samples")
    return seen
