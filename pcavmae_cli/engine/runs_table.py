"""``pcav runs [FOLDER]``: the run folders under a folder, what each is and how far it got.

A run folder is one with a ``config.yaml`` next to ``metrics.jsonl`` or ``checkpoints/``
(checkpoint folders inside it are not runs of their own). For each: pre-training or
fine-tuning, its recipe's description, the status -- ``finished`` when every planned epoch is
logged, else ``stopped at step N`` (a run still training shows the same until it ends) -- the
best metric (fine-tuning: the best validation value of the recipe's metric; pre-training: the
last epoch's total loss), and the training time its epoch lines add up to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.train.metrics import best_validated, read_metrics, training_hours

MAX_DEPTH = 4  # runs/<group>/<name>/... is as deep as folders of runs go


@dataclass
class RunRow:
    path: Path
    kind: str  # "pretrain" or "finetune"
    description: str
    status: str
    best: str
    hours: float


def _planned_epochs(cfg: dict) -> int | None:
    if cfg.get("finetune"):
        return cfg["finetune"].get("epochs")
    stages = cfg.get("stages") or []
    return sum(int(s.get("epochs", 0)) for s in stages) or None


def describe(run: Path) -> RunRow:
    """One run folder as a row (module docstring)."""
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        return RunRow(run, "?", f"unreadable config.yaml ({exc.__class__.__name__})", "?", "-", 0.0)
    kind = "finetune" if cfg.get("finetune") else "pretrain"
    epochs = read_metrics(run / "metrics.jsonl", "epoch", strict=False)
    planned = _planned_epochs(cfg)
    if not epochs:
        status = "no epoch finished"
    elif planned is not None and len({e["epoch"] for e in epochs}) >= planned:
        status = "finished"
    else:
        last = epochs[-1]
        status = f"stopped at step {last['step']} (epoch {last['epoch']}/{planned or '?'})"
    best = "-"
    validated = best_validated(epochs)
    if validated is not None:
        metric, value, index = validated
        best = f"val {metric} {value:.4g} (epoch {epochs[index]['epoch']})"
    elif epochs and isinstance(epochs[-1].get("loss_total", epochs[-1].get("loss")), (int, float)):
        best = f"loss {epochs[-1].get('loss_total', epochs[-1].get('loss')):.4g} (last)"
    return RunRow(run, kind, str(cfg.get("description") or ""), status, best, training_hours(epochs))


def find_runs(folder: str | Path) -> list[Path]:
    """Run folders under ``folder`` (itself included), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    found = []

    def walk(d: Path, depth: int) -> None:
        if (d / "config.yaml").is_file() and ((d / "metrics.jsonl").is_file() or (d / "checkpoints").is_dir()):
            found.append(d)
            return  # its checkpoints/ are not runs
        if depth >= MAX_DEPTH:
            return
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            walk(child, depth + 1)

    walk(folder, 0)
    return found


def list_runs(folder: str | Path) -> list[RunRow]:
    return [describe(run) for run in find_runs(folder)]
