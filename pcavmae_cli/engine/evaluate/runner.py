"""``pcav evaluate``: a checkpoint, a manifest, a task -> ``metrics.json`` (+ ``per_class.csv``).

Tasks (docs/method.md ("Downstream")):

- ``classification``: a fine-tuning checkpoint's class probabilities, averaged over the clip's
  frames (``predict.clip_scores``), scored with mAP / mean AUC / d' (multi-label) or top-1 /
  top-5 (single-label) and a per-class table sorted best first;
- ``retrieval``: a pre-training checkpoint's clip embeddings z_a, z_v, audio->video and
  video->audio R@k and median rank (CAV-MAE's protocol, ``retrieval.retrieval_metrics``);
- ``linear-probe`` / ``knn``: a pre-training checkpoint's frozen clip features of a training
  manifest and of the evaluated one (``probes``).

The settings come from the checkpoint's own ``config.yaml`` (the resolved recipe it was trained
with: fbank statistics, sizes, ``evaluate`` section), with ``key=value`` overrides on top; a
checkpoint whose recipe predates the ``evaluate`` section takes the ``base`` recipe's.
``random_init`` evaluates a freshly initialised model of the checkpoint's size instead of its
weights: the baseline a representation should beat.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.data.manifest import LabelSet, atomic_write_text, read_label_csv
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.evaluate.metrics import ClassRow, classification_metrics
from pcavmae_cli.engine.evaluate.predict import clip_features, clip_scores
from pcavmae_cli.engine.evaluate.probes import knn, linear_probe
from pcavmae_cli.engine.evaluate.retrieval import retrieval_metrics
from pcavmae_cli.engine.model import PCAVMAE, Classifier
from pcavmae_cli.engine.model.classifier import load_classifier_checkpoint
from pcavmae_cli.engine.progress import ProgressReporter as Reporter
from pcavmae_cli.engine.progress import default_reporter
from pcavmae_cli.engine.run_folder import read_run_recipe
from pcavmae_cli.engine.schema import Recipe
from pcavmae_cli.engine.train import checkpoint as ckpt
from pcavmae_cli.engine.train.data import close_loader, embed_loader
from pcavmae_cli.engine.train.runtime import Runtime, resolve_runtime, seed_everything

Task = Literal["classification", "retrieval", "linear-probe", "knn"]
TASKS: tuple[str, ...] = ("classification", "retrieval", "linear-probe", "knn")
Kind = Literal["pretrain", "finetune"]


@dataclass
class Checkpoint:
    """A checkpoint folder, what trained it, and the run folder it belongs to."""

    folder: Path
    kind: Kind  # "pretrain" (has momentum.safetensors) or "finetune"
    run_dir: Path


@dataclass
class EvalResult:
    task: str
    checkpoint: Checkpoint
    metrics: dict[str, Any]  # the task's numbers (rates in [0, 1])
    classes: list[ClassRow] | None  # per-class rows, best first (classification, probes)
    label_mode: str | None
    out_dir: Path
    files: list[Path]
    record: dict[str, Any]  # everything written to metrics.json


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A run folder or a checkpoint folder -> ``Checkpoint``.

    For a run folder: a pre-training run's ``checkpoints/last``; a fine-tuning run's
    ``checkpoints/averaged`` when it averaged weights, else ``checkpoints/last``. ``best`` is
    never picked by default: it was chosen on the validation split, which is often the split
    being evaluated; name it explicitly (``RUN/checkpoints/best``) to use it.
    """
    where = Path(path)
    if (where / "checkpoints").is_dir():
        found = ckpt.find_checkpoint(where, "last", ckpt.FILES)
        if found is not None:
            return Checkpoint(found, "pretrain", where)
        for name in ("averaged", "last"):
            found = ckpt.find_checkpoint(where, name, ckpt.FINETUNE_FILES)
            if found is not None:
                return Checkpoint(found, "finetune", where)
        raise UserError(f"{where} holds no complete checkpoint under checkpoints/")
    if (where / "model.safetensors").is_file() and (where / "config.yaml").is_file():
        kind: Kind = "pretrain" if (where / "momentum.safetensors").is_file() else "finetune"
        run_dir = where.parent.parent if where.parent.name == "checkpoints" else where
        return Checkpoint(where, kind, run_dir)
    raise UserError(f"{where} is neither a run folder nor a checkpoint folder (model.safetensors + config.yaml)")


def checkpoint_recipe(folder: Path, overrides: Sequence[str] = ()) -> Recipe:
    """The checkpoint's resolved recipe, its paths rebased to where the run folder is now
    (``run_folder.py``), with ``overrides``; ``evaluate`` from ``base`` if it has none."""
    cfg = read_run_recipe(folder / "config.yaml", overrides)
    if cfg.model is None or cfg.train is None:
        raise UserError(f"{folder / 'config.yaml'} lacks the 'model' or 'train' section of a training run")
    return cfg


def _labels(cfg: Recipe, labels_csv: str | Path | None, task: str) -> LabelSet:
    source = labels_csv if labels_csv is not None else cfg.data.label_csv
    if source is None:
        raise UserError(f"--task {task} needs class labels: pass --labels CSV or set data.label_csv")
    return read_label_csv(source)


def _finite(value: Any) -> Any:
    """JSON has no nan or infinity: they are written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_outputs(out_dir: Path, record: dict[str, Any], classes: list[ClassRow] | None, label_mode: str | None) -> list[Path]:
    """``metrics.json`` and, with per-class rows, ``per_class.csv`` (best first, rank 1-based)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = {k: ({m: _finite(v) for m, v in value.items()} if isinstance(value, dict) else _finite(value))
             for k, value in record.items()}  # fmt: skip
    files = [out_dir / "metrics.json"]
    atomic_write_text(files[0], json.dumps(clean, indent=2) + "\n")
    if classes is not None:
        cols = ["ap", "auc"] if label_mode == "multi_hot" else ["accuracy"]
        rows = [["rank", "index", "name", "positives", *cols]]
        for rank, row in enumerate(classes, 1):
            values = ["" if getattr(row, c) is None else f"{getattr(row, c):.6f}" for c in cols]
            rows.append([str(rank), str(row.index), row.name, str(row.positives), *values])
        path = out_dir / "per_class.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows(rows)
        files.append(path)
    return files


def frozen_backbone(cp: Checkpoint, cfg: Recipe, rt: Runtime, random_init: bool):
    """The pre-training checkpoint's backbone (encoders, joint layer, projections), or a fresh one
    initialised from ``cfg.seed`` (``--random-init``: the same random encoder on every call)."""
    seed_everything(cfg.seed)
    model = PCAVMAE(cfg.model)
    if not random_init:
        ckpt.load_module(cp.folder / "model.safetensors", model, torch.device("cpu"))
    return model.backbone.to(rt.device)


def manifest_features(
    manifest: Path,
    backbone,
    cfg: Recipe,
    rt: Runtime,
    policy: str,
    labels: LabelSet | None = None,
    reporter: Reporter | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """``clip_features`` of every clip of ``manifest`` (frames ``policy``), and their targets
    when ``labels`` are given: what the retrieval, kNN and linear-probe tasks score."""
    reporter = default_reporter(reporter)
    ds = AudioVisualDataset(manifest, cfg.data, frames=policy, labels=labels, compact=True)
    loader = embed_loader(ds, cfg.data.loader, rt)
    try:
        with reporter.progress(f"embed {manifest.parent.name}", len(loader)) as advance:
            feats = clip_features(backbone, loader, rt, advance, data=cfg.data)
    finally:
        close_loader(loader)
    return feats, (ds.targets() if labels is not None else None)


def _classifier(cp: Checkpoint, cfg: Recipe, labels: LabelSet, rt: Runtime) -> Classifier:
    if cfg.finetune is None:
        raise UserError(f"{cp.folder / 'config.yaml'} has no 'finetune' section; is it a fine-tuning run?")
    return load_classifier_checkpoint(cp.folder / "model.safetensors", cfg.model, len(labels.mids), cfg.finetune,
                                      rt.device)  # fmt: skip


def _probe_features(feats: dict[str, torch.Tensor], which: str) -> torch.Tensor:
    if which == "audio+video":
        return torch.cat([feats["audio"], feats["video"]], dim=1)
    return feats[which]


def evaluate(
    task: Task,
    checkpoint: str | Path,
    data: str | Path,
    *,
    train_data: str | Path | None = None,
    frames: Literal["all", "middle"] | None = None,
    random_init: bool = False,
    labels_csv: str | Path | None = None,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    reporter: Reporter | None = None,
) -> EvalResult:
    """Run ``task`` on manifest ``data`` with ``checkpoint``; write and return the results.

    Args:
        frames: ``"all"`` (predictions or features averaged over the clip's frames) or
            ``"middle"``; default ``data.loader.eval_frames`` for classification,
            ``evaluate.frames`` for the others.
        train_data: the probes' training manifest (default: the checkpoint recipe's
            ``data.train_manifest``).
        out: output folder (default ``RUN/eval/TASK-SPLIT``, SPLIT the manifest's folder name).
    """
    started = time.perf_counter()
    if task not in TASKS:
        raise UserError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
    reporter = default_reporter(reporter)
    cp = open_checkpoint(checkpoint)
    cfg = checkpoint_recipe(cp.folder, overrides)
    data = Path(data)
    if task == "classification":
        if random_init:
            raise UserError("--random-init applies to retrieval, linear-probe and knn, not classification")
        if cp.kind != "finetune":
            raise UserError(
                f"classification needs a fine-tuning checkpoint; {cp.folder} is a pre-training checkpoint "
                "(use --task retrieval, linear-probe or knn, or fine-tune it with pcav finetune)"
            )
    elif cp.kind != "pretrain":
        raise UserError(f"--task {task} needs a pre-training checkpoint; {cp.folder} is a fine-tuning checkpoint")
    rt = resolve_runtime(cfg.train, cfg.model)
    policy = frames or (cfg.data.loader.eval_frames if task == "classification" else cfg.evaluate.frames)
    record: dict[str, Any] = {
        "task": task, "checkpoint": str(cp.folder), "kind": cp.kind, "random_init": random_init,
        "data": str(data), "frames": policy,
    }  # fmt: skip
    classes: list[ClassRow] | None = None
    label_mode: str | None = None

    def features_of(manifest: Path, backbone, labels: LabelSet | None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        return manifest_features(manifest, backbone, cfg, rt, policy, labels, reporter)

    if task == "classification":
        labels = _labels(cfg, labels_csv, task)
        label_mode = cfg.data.label_mode
        model = _classifier(cp, cfg, labels, rt)
        ds = AudioVisualDataset(data, cfg.data, frames=policy, labels=labels, compact=True)
        loader = embed_loader(ds, cfg.data.loader, rt)
        try:
            with reporter.progress(f"classify {data.parent.name}", len(loader)) as advance:
                scores, targets = clip_scores(model, loader, label_mode, rt, advance, data=cfg.data)
        finally:
            close_loader(loader)
        metrics, classes = classification_metrics(scores, targets, label_mode, labels.names)
        record.update({"mode": cfg.finetune.mode, "label_mode": label_mode, "n_clips": len(ds)})
    elif task == "retrieval":
        backbone = frozen_backbone(cp, cfg, rt, random_init)
        feats, _ = features_of(data, backbone, None)
        metrics = retrieval_metrics(feats["z_a"], feats["z_v"], ks=cfg.evaluate.retrieval_ks)
        record.update({"n_clips": len(feats["z_a"]), "embeddings": "z_a, z_v (contrastive space)"})
    else:
        train_manifest = Path(train_data) if train_data is not None else None
        if train_manifest is None and cfg.data.train_manifest is not None:
            train_manifest = Path(cfg.data.train_manifest)
        if train_manifest is None:
            raise UserError(f"--task {task} needs training clips: pass --train-data MANIFEST")
        labels = _labels(cfg, labels_csv, task)
        label_mode = cfg.data.label_mode
        backbone = frozen_backbone(cp, cfg, rt, random_init)
        train_feats, train_y = features_of(train_manifest, backbone, labels)
        test_feats, test_y = features_of(data, backbone, labels)
        ev, which = cfg.evaluate, cfg.evaluate.features
        xtr, xte = _probe_features(train_feats, which), _probe_features(test_feats, which)
        common = dict(num_classes=len(labels.mids), class_names=labels.names)
        if task == "linear-probe":
            result = linear_probe(xtr, train_y, xte, test_y, label_mode, weight_decay=ev.linear_weight_decay,
                                  max_iter=ev.linear_max_iter, **common)  # fmt: skip
        else:
            result = knn(xtr, train_y, xte, test_y, label_mode, k=ev.knn_k, weighting=ev.knn_weighting,
                         temperature=ev.knn_temperature, **common)  # fmt: skip
        metrics, classes = result.metrics, result.classes
        record.update({"train_data": str(train_manifest), "features": which, "label_mode": label_mode,
                       "n_clips": len(xte), "n_train_clips": len(xtr)})  # fmt: skip
    record["metrics"] = metrics
    record["seconds"] = round(time.perf_counter() - started, 3)
    if out is None:
        suffix = "-random-init" if random_init else ""
        out = cp.run_dir / "eval" / f"{task}-{data.parent.name}{suffix}"
    out_dir = Path(out)
    files = write_outputs(out_dir, record, classes, label_mode)
    if out_dir.resolve().is_relative_to((cp.run_dir / "eval").resolve()):
        from pcavmae_cli.engine.model_card import write_model_card  # the card lists the run's evaluations

        if (cp.run_dir / "config.yaml").is_file():
            write_model_card(cp.run_dir)
    return EvalResult(task, cp, metrics, classes, label_mode, out_dir, files, record)
