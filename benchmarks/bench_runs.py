"""Pieces the downstream benchmarks share: a corpus as recipe overrides, shorter schedules,
the time a pre-training took, and mean +- std tables over seeds.

Why one module: ``downstream_demo.py`` (the demo corpus) and ``real_media.py`` (real media)
pre-train the same recipes on different corpora; they must point the recipes at a corpus, and
report, the same way, or their tables would not be comparable.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from pcavmae_cli.engine import config
from pcavmae_cli.engine.data.manifest import read_manifest
from pcavmae_cli.engine.evaluate.probes import knn
from pcavmae_cli.engine.evaluate.runner import evaluate
from pcavmae_cli.engine.schema import EvaluateConfig, Recipe
from pcavmae_cli.engine.train.checkpoint import FINETUNE_FILES, find_checkpoint
from pcavmae_cli.engine.train.finetune import finetune
from pcavmae_cli.engine.viz.explain import Explainer

HEADS = {  # name: (run folder, overrides)
    "linear": ("finetune_linear", ["finetune.head=linear"]),
    "prototype (frozen)": ("finetune_prototype", ["finetune.head=prototype",
                                                  "finetune.prototype_head.trainable_prototypes=false"]),
    "prototype (trainable)": ("finetune_prototype_trainable", ["finetune.head=prototype",
                                                               "finetune.prototype_head.trainable_prototypes=true"]),
}  # fmt: skip


def corpus_keys(train: Path, held_out: Path, label_csv: Path, mean: float, std: float) -> list[str]:
    """The overrides that point a recipe at a preprocessed corpus and its fbank statistics."""
    return [
        f"data.train_manifest={train}", f"data.eval_manifest={held_out}", f"data.label_csv={label_csv}",
        f"data.audio.fbank.mean={mean:.6f}", f"data.audio.fbank.std={std:.6f}",
    ]  # fmt: skip


def corpus_overrides(recipe: dict) -> list[str]:
    """``corpus_keys`` of a resolved recipe (``pcav demo``'s ``recipe.yaml``)."""
    data = recipe["data"]
    return corpus_keys(Path(data["train_manifest"]), Path(data["eval_manifest"]), Path(data["label_csv"]),
                       float(data["audio"]["fbank"]["mean"]), float(data["audio"]["fbank"]["std"]))  # fmt: skip


def epoch_overrides(cfg: Recipe, epochs: int) -> list[str]:
    """Overrides that shrink (or stretch) ``cfg``'s schedule to ``epochs`` in all, keeping its
    shape: each stage, the learning-rate warm-up and the prototypes' warm-up scale in
    proportion (every stage keeps at least one epoch)."""
    stages = [s.epochs for s in cfg.stages]
    if epochs < len(stages):
        raise ValueError(f"--epochs {epochs} is fewer than the recipe's {len(stages)} stages")
    total = sum(stages)
    scaled = [max(1, round(e * epochs / total)) for e in stages[:-1]]
    scaled.append(epochs - sum(scaled))
    while scaled[-1] < 1:  # rounding gave the earlier stages too much
        scaled[scaled.index(max(scaled))] -= 1
        scaled[-1] += 1
    out = [f"stages.{i}.epochs={e}" for i, e in enumerate(scaled)]
    out.append(f"optim.warmup_epochs={cfg.optim.warmup_epochs * epochs / total:g}")
    if cfg.prototypes is not None:
        out.append(f"prototypes.warmup_epochs={round(cfg.prototypes.warmup_epochs * epochs / total)}")
    return out


def knn_top1(train_x, train_y, test_x, test_y, num_classes: int, ev: EvaluateConfig) -> float:
    """Single-label kNN top-1 (a fraction) with a recipe's ``evaluate`` settings, as ``pcav
    evaluate --task knn`` scores it."""
    return knn(train_x, train_y, test_x, test_y, "single", k=ev.knn_k, weighting=ev.knn_weighting,
               temperature=ev.knn_temperature, num_classes=num_classes).metrics["top1"]  # fmt: skip


def pretrain_seconds(run: Path) -> float:
    """Training + E-step seconds of a pre-training run, from its ``metrics.jsonl``."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return round(sum(r["seconds"] + r.get("estep_seconds", 0) for r in lines if r["kind"] == "epoch"), 1)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN-free inputs expected."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def markdown_table(rows: dict[str, list[dict]], columns: dict[str, str], percent: bool = True) -> str:
    """One line per model: ``mean +- std`` over its rows (one row per seed) of each column.

    Args:
        rows: model name -> one dict of metrics per seed.
        columns: metric key -> column title.
        percent: rates in [0, 1] are shown in percent.
    """
    scale = 100.0 if percent else 1.0
    lines = ["| model | seeds | " + " | ".join(columns.values()) + " |", "|---" * (len(columns) + 2) + "|"]
    for model, seeds in rows.items():
        cells = []
        for key in columns:
            mean, std = mean_std([scale * r[key] for r in seeds])
            digits = 1 if percent else 2
            cells.append(f"{mean:.{digits}f} +- {std:.{digits}f}" if len(seeds) > 1 else f"{mean:.{digits}f}")
        lines.append(f"| {model} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(statistics.fmean(kept), 3) if kept else None


def head_row(name: str, run: Path, init_from: Path, overrides: list[str], held_out: Path) -> dict:
    """Fine-tune ``init_from`` with ``finetune_demo`` + ``overrides`` into ``run`` (resumed, or
    left alone when finished), then score it on ``held_out``: top-1 (10-frame averaging) and,
    clip by clip, ``pcav explain``'s faithfulness numbers (docs/method.md, "Faithfulness"): the
    mean prototype share of the top logit and the mean logit drop when the 3 top-contributing
    prototypes are removed vs 3 random others, per granularity."""
    done = run / "eval" / "head_row.json"
    if done.is_file():  # an earlier run of the benchmark finished this head
        return json.loads(done.read_text())
    cfg = config.load_recipe("finetune_demo", [f"train.run_dir={run}", f"finetune.init_from={init_from}", *overrides])
    cfg.train.resume = find_checkpoint(run, "last", FINETUNE_FILES) is not None
    finetune(cfg)
    scored = run / "eval" / "metrics.json"
    if scored.is_file():
        top1 = json.loads(scored.read_text())["metrics"]["top1"]
    else:
        top1 = evaluate("classification", run, held_out, out=run / "eval").metrics["top1"]
    explainer = Explainer(run, data=held_out, device="cpu", top=1, exemplars=0)
    per_level: dict[int, dict[str, list]] = {}
    for record in read_manifest(held_out):
        for f in explainer.explain(record.id).prediction.faithfulness:
            level = per_level.setdefault(f.level, {"share": [], "top": [], "random": []})
            level["share"].append(f.share)
            level["top"].append(f.deletion.top_logit_drop)
            level["random"].append(f.deletion.random_logit_drop)
    row = {"head": name, "top1": round(top1, 3),
           "levels": {lvl: {k: _mean(v) for k, v in d.items()} for lvl, d in per_level.items()}}  # fmt: skip
    done.write_text(json.dumps(row, indent=2) + "\n")
    return row


def head_markdown(per_seed: list[list[dict]], level_names: dict[str, str] | None = None) -> str:
    """``head_row`` results as a Markdown table, one line per head and granularity: top-1 in
    percent, then the faithfulness means; with several seeds (one list of heads per seed, in the
    same order) each cell is ``mean +- std`` over them. ``level_names`` names the granularities
    (e.g. ``{"0": "K=3"}``); otherwise they are their level index."""

    def cell(values: list[float | None], digits: int) -> str:
        kept = [v for v in values if v is not None]
        if not kept:
            return "-"
        mean, std = mean_std(kept)
        return f"{mean:.{digits}f} +- {std:.{digits}f}" if len(kept) > 1 else f"{mean:.{digits}f}"

    names = level_names or {}
    lines = ["| head | seeds | top-1 | granularity | prototype share | logit drop, top 3 removed | "
             "logit drop, 3 random removed |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for i, row in enumerate(per_seed[0]):
        same = [seed_rows[i] for seed_rows in per_seed]
        assert all(r["head"] == row["head"] for r in same), "every seed lists the heads in one order"
        top1 = cell([100 * r["top1"] for r in same], 1)
        # Keys are ints when just measured and strings when read back from head_row.json.
        levels = [{str(k): v for k, v in r["levels"].items()} for r in same]
        for level in levels[0]:
            faith = [cell([lv.get(level, {}).get(k) for lv in levels], 2) for k in ("share", "top", "random")]
            lines.append(f"| {row['head']} | {len(same)} | {top1} | {names.get(level, level)} | " + " | ".join(faith) + " |")
    return "\n".join(lines) + "\n"
