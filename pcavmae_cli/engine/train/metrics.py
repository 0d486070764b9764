"""``metrics.jsonl``: one JSON object per logged optimiser step and per epoch.

Every line has ``kind`` (``"step"`` or ``"epoch"``), ``step`` (optimiser steps done so far),
``epoch`` (0-based, global across stages), ``stage``, ``lr``, ``samples_per_s``,
``prototypes`` (whether the prototype losses were on) and one key per loss part:
``loss_total``, ``loss_infonce``, ``loss_r`` (= ``loss_r_a + loss_r_v``, eq. 4), ``loss_r_a``,
``loss_r_v``, ``loss_pje`` (eq. 1), ``loss_pcpe`` (eq. 3). A part that was not computed -- the
prototype losses during warm-up or without prototypes, L_r and L_PCPE in a stage that gives them
weight 0 -- is ``null``, never 0. Values are unweighted means over the samples since the
previous line (``loss_total`` is the weighted sum that was optimised). Epoch lines add
``seconds``, ``estep_seconds`` and ``num_prototypes`` (clusters per granularity, or ``null``).

With a recipe ``health`` section, epoch lines also carry the representation health of the
momentum encoder's embeddings of the training set, measured at the epoch's start
(``engine/evaluate/health.py``), for m in ``a`` (audio), ``v`` (video), ``joint``:
``health_cos_{m}`` (mean pairwise cosine), ``health_rank_{m}`` (effective rank),
``health_collapsed_{m}`` (true when a collapse limit was crossed), ``health_spread_{m}`` (cosine
spread to the prototypes, one value per granularity) and ``health_agree_a``, ``health_agree_v``
(share of clips whose nearest audio / video prototype is their joint cluster, per granularity).
The prototype fields are ``null`` in epochs without prototypes, and all of them in epochs that
measured nothing (``health.every_epochs``).

On resume the lines past the checkpoint's step are dropped first, so a run that crashed after
its last checkpoint does not log the replayed steps twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pcavmae_cli.engine.data.manifest import atomic_write_text
from pcavmae_cli.engine.errors import UserError

LOSS_PARTS = ("total", "infonce", "r", "r_a", "r_v", "pje", "pcpe")


class Meter:
    """Sample-weighted running means of the loss parts; a part never added stays ``None``.

    Each part is averaged over the samples of the batches that logged it (a batch of one clip
    logs no InfoNCE: it has no negatives), ``samples`` counts every batch's.

    Args:
        parts: the names ``means`` reports (pre-training's ``LOSS_PARTS`` by default).
    """

    def __init__(self, parts: tuple[str, ...] = LOSS_PARTS) -> None:
        self.parts = parts
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}  # samples behind each part's sum
        self.samples = 0

    def add(self, parts: dict[str, float], n: int) -> None:
        for name, value in parts.items():
            self.sums[name] = self.sums.get(name, 0.0) + value * n
            self.counts[name] = self.counts.get(name, 0) + n
        self.samples += n

    def means(self) -> dict[str, float | None]:
        return {p: (self.sums[p] / self.counts[p] if self.counts.get(p) else None) for p in self.parts}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "counts": dict(self.counts), "samples": self.samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.samples = dict(state["sums"]), int(state["samples"])
        # checkpoints from before per-part counts: every part was logged by every batch
        self.counts = dict(state.get("counts") or {name: self.samples for name in self.sums})


def loss_fields(means: dict[str, float | None]) -> dict[str, float | None]:
    return {f"loss_{p}": means.get(p) for p in LOSS_PARTS}


def format_losses(means: dict[str, float | None]) -> str:
    """``loss 1.23 nce 0.50 r 0.70 pje 0.41`` for progress bars: the parts computed, 2 decimals."""
    short = {"total": "loss", "infonce": "nce", "r": "r", "pje": "pje", "pcpe": "pcpe"}
    return " ".join(f"{label} {means[p]:.2f}" for p, label in short.items() if means.get(p) is not None)


class MetricsLog:
    """Appends lines to ``path``; a no-op on processes other than the main one.

    Args:
        keep_until_step: ``None`` starts a new file; a step keeps the existing lines up to it.
    """

    def __init__(self, path: str | Path, *, enabled: bool = True, keep_until_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        kept = [] if keep_until_step is None else [r for r in read_metrics(self.path) if r["step"] <= keep_until_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")


def read_metrics(path: str | Path, kind: str | None = None, *, strict: bool = True) -> list[dict[str, Any]]:
    """The lines of a ``metrics.jsonl`` (of one ``kind`` if given); none if the file is missing.

    A torn last line (a kill mid-write) is skipped: what was written before it stands. Any other
    line that is not JSON is an error naming it, or, with ``strict=False`` (readers that only
    report on a run: its model card, ``pcav runs``), skipped too.

    Epochs are numbered from 1 (the n-th epoch), as on screen. Older files counted from 0: a
    file with an epoch 0 is read as one of those and its epochs are shifted by one.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number == len(lines) or not strict:
                continue
            raise UserError(f"{path}: line {number} is not JSON") from None
    if any(r.get("epoch") == 0 for r in rows if isinstance(r, dict)):  # an older 0-based file
        rows = [{**r, "epoch": r["epoch"] + 1} if isinstance(r.get("epoch"), int) else r for r in rows]
    return [r for r in rows if kind is None or r.get("kind") == kind]


def training_hours(epochs: list[dict[str, Any]]) -> float:
    """Hours of training the epoch lines add up to (epochs, E-steps and validations)."""
    return sum(e.get("seconds", 0.0) + e.get("estep_seconds", 0.0) + e.get("eval_seconds", 0.0) for e in epochs) / 3600


def best_validated(epochs: list[dict[str, Any]]) -> tuple[str, float, int] | None:
    """The validation metric the epoch lines name (``metric``: fine-tuning's ``top1`` / ``mAP``,
    pre-training's ``knn_joint`` ...), its best (highest) ``val_`` value and the index of the
    epoch line ``checkpoints/best`` holds (ties go to the later epoch, as the trainers keep it);
    ``None`` where no epoch was validated by a metric."""
    metric = next((e.get("metric") for e in reversed(epochs) if e.get("metric")), None)
    scored = [(e.get(f"val_{metric}"), i) for i, e in enumerate(epochs)]
    scored = [(v, i) for v, i in scored if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not scored:
        return None
    value = max(v for v, _ in scored)
    return metric, float(value), [i for v, i in scored if v == value][-1]
