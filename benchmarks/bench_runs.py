"""Pieces the downstream benchmarks share: a corpus as recipe overrides, shorter schedules,
the time a pre-training took, and mean +- std tables over seeds.

Why one module: ``downstream_demo.py`` (the demo corpus) and ``real_media.py`` (real media)
pre-train the same recipes on different corpora; they must point the recipes at a corpus, and
report, the same way, or their tables would not be comparable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from pcavmae_cli.engine.schema import Recipe


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
            cells.append(f"{mean:.1f} +- {std:.1f}" if len(seeds) > 1 else f"{mean:.1f}")
        lines.append(f"| {model} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
