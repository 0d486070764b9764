"""Classification fine-tuning: ``finetune(cfg, reporter)`` (docs/method.md ("Downstream")).

The model is ``Classifier``: the pre-trained encoders and joint layer of ``finetune.init_from``
(loaded strictly through an explicit key map) and a fresh head. Each epoch the loop draws the
training clips (a seeded permutation, or balanced draws with replacement), builds soft targets,
mixes, masks and perturbs the batch (``augment``), and minimises BCE (``multi_hot``) or
cross-entropy (``single``), accumulating gradients to ``optim.effective_batch`` before each
AdamW step. Learning rates follow a cosine or CAV-MAE's step schedule, the head at
``head_lr_multiplier`` times the rate, optionally with layer-wise decay.

Every ``finetune.eval_every_epochs`` epochs (and after the last) the model is validated on
``data.eval_manifest`` with the task metric (mAP for ``multi_hot``, top-1 for ``single``),
predictions averaged over frames as ``pcav evaluate`` does. ``checkpoints/last`` is written as in
pre-training, ``checkpoints/best`` at the best validation metric, and, with
``finetune.average_from_epoch``, ``checkpoints/averaged``: the mean of the weights at the end of
epochs N..last (CAV-MAE's checkpoint averaging), validated once more.

The pieces are pre-training's: ``runtime`` (device, bf16 autocast, RNG states), ``checks``,
``schedule``, ``optim``, ``data`` (seeded order and per-clip seeds), ``checkpoint`` (atomic folders),
``metrics`` and ``stop``; resume (``train.resume=true``) is exact in the same way.

Under torchrun (``distributed.py``) the classifier is wrapped in DDP, each rank takes its slice
of every global batch (mixup pairs clips within a rank's slice), the loss is weighted so that
DDP's average is the global batch's mean, the logged loss is reduced across ranks together with
any stop request, each rank scores its contiguous shard of the eval manifest and one all-reduce
gives every rank the whole score matrix (``validation.py``: identical numbers, so all agree on
``best``), and only rank 0 writes.

As in pre-training, the step reads nothing back from the device: each micro-batch's loss stays
there until a flush point (``pending.py``: every ``train.log_every`` steps, at the end of an
epoch, before a checkpoint write), where it is read, checked and, under DDP, reduced in one
all-reduce with the stop requests (so a stop waits for the next flush point).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from pcavmae_cli.engine import config
from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.data.manifest import atomic_write_text, read_label_csv
from pcavmae_cli.engine.data.model_inputs import model_inputs
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.folder_lock import run_folder_lock
from pcavmae_cli.engine.evaluate.metrics import classification_metrics
from pcavmae_cli.engine.model import PCAVMAE, Classifier, LoadReport, load_pretrained, load_pretraining_state
from pcavmae_cli.engine.model.prototype_head import PrototypeHeadSpec, stack_prototypes
from pcavmae_cli.engine.model_card import write_model_card
from pcavmae_cli.engine.run_folder import keep_labels, portable_recipe
from pcavmae_cli.engine.schema import Recipe
from pcavmae_cli.engine.tensor_io import read_safetensors
from pcavmae_cli.engine.train import augment
from pcavmae_cli.engine.train import checkpoint as ckpt
from pcavmae_cli.engine.train.checks import check_finetune
from pcavmae_cli.engine.train.data import EpochBatchSampler, balanced_weights, close_loader, embed_loader, train_loader
from pcavmae_cli.engine.train.distributed import BatchShard, check_batches_fit_world, comm_device, split, world_from_env
from pcavmae_cli.engine.train.fast import StepCompiler, set_activation_checkpointing
from pcavmae_cli.engine.train.log_lines import RunClock, significant, tell
from pcavmae_cli.engine.train.memory import MemoryCheck, StepEstimate, estimate_loop_step, gigabytes, peak_bytes
from pcavmae_cli.engine.train.experiment_logs import ExperimentLogs
from pcavmae_cli.engine.train.metrics import Meter, MetricsLog, read_metrics
from pcavmae_cli.engine.train.optim import build_finetune_optimizer, set_lr
from pcavmae_cli.engine.train.pending import PendingLosses, finite_weights
from pcavmae_cli.engine.progress import default_reporter
from pcavmae_cli.engine.train.pretrain import ProgressReporter, StepInfo, TrainingDiverged
from pcavmae_cli.engine.train.replicas import replicas_for
from pcavmae_cli.engine.train.runtime import (
    capture_rng, keep_started_precision, resolve_runtime, restore_rng, seed_everything,
)
from pcavmae_cli.engine.train.schedule import Schedule, StepSchedule
from pcavmae_cli.engine.train.stop import StopRequests, call_on_step, run_stoppable
from pcavmae_cli.engine.train.validation import eval_shard, shared_clip_scores

STATE_FORMAT = 1
STAGE = "finetune"  # the ``stage`` of metrics lines and ``StepInfo``
AVERAGE_FILE = "average.safetensors"
# The model settings that shape the encoders: they must be the pre-training run's.
BACKBONE_KEYS = (
    "embed_dim", "depth_modality", "depth_joint", "num_heads", "mlp_ratio", "patch_size",
    "audio_frames", "mel_bins", "image_size", "joint_norms", "layer_norm_eps",
)  # fmt: skip


def task_metric(label_mode: str) -> str:
    """The metric fine-tuning selects ``best`` by: mAP (multi-label) or top-1 (single-label)."""
    return "mAP" if label_mode == "multi_hot" else "top1"


@dataclass
class FinetuneState:
    """Where the run is; saved with every checkpoint (``state.pt``)."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    best_metric: float | None = None  # highest validation task metric so far
    best_epoch: int | None = None
    averaged_epochs: int = 0  # epochs summed into the weight average


@dataclass
class FinetuneResult:
    run_dir: Path
    metric: str  # "mAP" or "top1"
    epochs: list[dict[str, Any]]  # the epoch lines of metrics.jsonl
    averaged: dict[str, Any] | None  # the "averaged" line (validation of the averaged weights)
    steps: int
    seconds: float
    last: Path | None
    best: Path | None
    average: Path | None
    device: str
    precision: str
    init: LoadReport | None  # None: random init, or a resumed run
    resumed_from_step: int | None = None
    log: Path = field(default_factory=Path)


def resolve_init(path: str) -> Path:
    """``finetune.init_from`` -> the pre-training checkpoint folder (a run folder's ``checkpoints/last``)."""
    where = Path(path)
    if (where / "checkpoints").is_dir():
        found = ckpt.find_checkpoint(where, "last")
        if found is None:
            raise UserError(f"key 'finetune.init_from': {where} holds no complete pre-training checkpoints/last")
        return found
    if (where / "model.safetensors").is_file() and (where / "config.yaml").is_file():
        if not (where / "momentum.safetensors").is_file():
            raise UserError(
                f"key 'finetune.init_from': {where} is a fine-tuning checkpoint; give a pre-training run or checkpoint"
            )
        return where
    raise UserError(f"key 'finetune.init_from': {where} is neither a pre-training run folder nor a checkpoint folder")


def check_same_backbone(cfg: Recipe, folder: Path) -> None:
    """The recipe's encoder settings must be those the checkpoint was trained with, key by key."""
    theirs = config.load_recipe(str(folder / "config.yaml")).model
    for key in BACKBONE_KEYS:
        mine, other = getattr(cfg.model, key), getattr(theirs, key)
        if mine != other:
            raise UserError(
                f"key 'model.{key}' is {mine!r} in the recipe but {other!r} in {folder / 'config.yaml'}; "
                "fine-tune with the pre-training run's model settings"
            )


def init_prototypes(cfg: Recipe, init_folder: Path | None) -> tuple[torch.Tensor, tuple[int, ...]] | None:
    """The prototypes a ``finetune.head: prototype`` starts from, ``(P, proj_dim)`` over all
    granularities, and the count per granularity (``None`` for the linear head): those of the
    init checkpoint's epoch (or the latest before it), as ``pcav explain`` reads them, so that the
    head's explanations name the prototypes explain shows."""
    ft = cfg.finetune
    if (ft.head or "linear") == "linear":
        return None
    if ft.prototype_head is None:
        raise UserError("key 'finetune.head' is 'prototype', which needs the section 'finetune.prototype_head'")
    if not ft.prototype_head.temperature > 0:
        raise UserError(f"key 'finetune.prototype_head.temperature' must be > 0, got {ft.prototype_head.temperature}")
    if init_folder is None:
        raise UserError("key 'finetune.head' is 'prototype', which needs 'finetune.init_from': a pre-training run "
                        "with prototypes")  # fmt: skip
    from pcavmae_cli.engine.viz.run import open_run  # the one reader of a run's prototypes

    run = open_run(init_folder)
    if not run.prototype_epochs():
        raise UserError(f"key 'finetune.head' is 'prototype' but the pre-training run {run.run_dir} has no "
                        "prototypes (it stopped in warm-up, or its recipe has none)")  # fmt: skip
    _, levels = run.latest_prototypes()
    prototypes, sizes = stack_prototypes(levels, ft.mode)
    if prototypes.shape[1] != cfg.model.proj_dim:
        raise UserError(f"key 'finetune.head': the prototypes of {run.run_dir} have {prototypes.shape[1]} dimensions "
                        f"but model.proj_dim is {cfg.model.proj_dim}")  # fmt: skip
    return prototypes, sizes


def head_spec(cfg: Recipe, sizes: tuple[int, ...]) -> PrototypeHeadSpec:
    """The prototype head's shape from the recipe and the prototypes per granularity."""
    ph = cfg.finetune.prototype_head
    return PrototypeHeadSpec(tuple(sizes), ph.trainable_prototypes, ph.temperature)


def finetune(
    cfg: Recipe, reporter: ProgressReporter | None = None, *, on_step: Callable[[StepInfo], None] | None = None
) -> FinetuneResult:
    """Fine-tune with recipe ``cfg``; returns the epoch summaries and checkpoint folders.

    Raises ``UserError`` before any work for a recipe or checkpoint that cannot run, or a
    ``train.run_dir`` that another process is writing into (``folder_lock``),
    ``TrainingDiverged`` for a non-finite loss, ``Interrupted`` after writing ``checkpoints/last``
    on Ctrl-C / SIGTERM / a ``KeyboardInterrupt`` from ``on_step``.
    """
    run_dir = cfg.train.run_dir if cfg.train is not None else None
    with run_folder_lock(run_dir, world_from_env().rank):  # one run per folder
        return FineTuner(cfg, default_reporter(reporter), on_step).run()


class FineTuner:
    """One fine-tuning run; ``run`` executes it. Built in start-up order: checks first."""

    def __init__(self, cfg: Recipe, reporter: ProgressReporter, on_step: Callable[[StepInfo], None] | None):
        self.started = time.perf_counter()
        self.cfg, self.reporter, self.on_step = cfg, reporter, on_step
        self.plan = check_finetune(cfg, world_from_env().world_size)  # before any work, the group included
        self.rt = resolve_runtime(cfg.train, cfg.model)
        ft, data, loader_cfg = cfg.finetune, cfg.data, cfg.data.loader
        self.run_dir = Path(cfg.train.run_dir)
        init_folder = None
        if ft.init_from is not None:
            init_folder = resolve_init(ft.init_from)
            check_same_backbone(cfg, init_folder)
        resume_from = ckpt.resume_point(self.run_dir, cfg.train.resume, ckpt.FINETUNE_FILES)
        start = init_prototypes(cfg, init_folder)  # before any work: a run without prototypes fails here

        labels = read_label_csv(data.label_csv)
        self.class_names = labels.names
        self.num_classes = len(labels.mids)
        self.label_mode = data.label_mode
        self.metric = task_metric(data.label_mode)
        self.dataset = AudioVisualDataset(
            data.train_manifest, data, frames=loader_cfg.train_frame, labels=labels, compact=True
        )
        self.eval_dataset = None
        if data.eval_manifest is not None:
            self.eval_dataset = AudioVisualDataset(
                data.eval_manifest, data, frames=loader_cfg.eval_frames, labels=labels, compact=True
            )
        weights = None
        if ft.balanced_sampling:
            weights = balanced_weights(self.dataset.targets(), self.num_classes)
            if float(weights.sum()) == 0:
                raise UserError("key 'finetune.balanced_sampling': no training clip has a label")
        self.sampler = EpochBatchSampler(
            len(self.dataset), loader_cfg.batch_size, cfg.seed, weights=weights,
            max_batches=None if cfg.train.max_steps_per_epoch is None
            else cfg.train.max_steps_per_epoch * self.plan.accum_steps,
            rank=self.rt.rank, world_size=self.rt.world_size,
        )  # fmt: skip
        check_batches_fit_world(self.sampler, self.rt.world_size)
        self.loader = train_loader(self.dataset, self.sampler, loader_cfg, self.rt)
        self.eval_loader = None  # this rank's shard of the eval manifest (validation.py)
        if self.eval_dataset is not None:
            self.eval_loader = embed_loader(eval_shard(self.eval_dataset, self.rt), loader_cfg, self.rt)
        steps_per_epoch = -(-self.sampler.batches_per_epoch // self.plan.accum_steps)
        if ft.lr_schedule == "step":
            self.schedule = StepSchedule(
                steps_per_epoch, ft.epochs, cfg.optim, ft.step_start_epoch, ft.step_every_epochs, ft.step_decay
            )
        else:
            self.schedule = Schedule(steps_per_epoch, ft.epochs, cfg.optim)

        seed_everything(cfg.seed)
        self.model = Classifier(cfg.model, self.num_classes, ft.mode,
                                prototype_head=None if start is None else head_spec(cfg, start[1]))  # fmt: skip
        if start is not None:
            self.model.head.set_prototypes(start[0])
        self.init: LoadReport | None = None
        if resume_from is None:
            if init_folder is not None:
                self.init = load_pretrained(self.model, init_folder / "model.safetensors")
            else:  # a baseline: the encoders as a fresh pre-training model would start
                load_pretraining_state(self.model, PCAVMAE(cfg.model).state_dict(), "a freshly initialised PCAV-MAE")
        self.model.to(self.rt.device)
        self.net: torch.nn.Module = self.model  # under torchrun: the DDP wrapper, built at the first epoch
        set_activation_checkpointing(self.model, cfg.train.activation_checkpointing)
        self.compiler = StepCompiler(cfg.train.compile)  # the training forward; validation stays eager
        self.replicas = replicas_for(self.model, cfg.train, self.rt.device, self.rt.world_size, loader_cfg.batch_size)
        self.optimizer = build_finetune_optimizer(
            self.model, cfg.optim, head_lr_multiplier=ft.head_lr_multiplier, layer_decay=ft.layer_decay
        )
        self.memory = MemoryCheck(self.rt.device, self.rt.is_main, reporter.warning)  # memory.py
        self.state = FinetuneState()
        self.epoch_meter, self.window_meter = Meter(("loss",)), Meter(("loss",))
        self.pending = PendingLosses()  # losses not read from the device yet (pending.py)
        self.shown: dict[str, float | None] = {"loss": None}  # the last step line's mean
        self.average: dict[str, torch.Tensor] | None = None
        self.resumed_from_step = None
        if resume_from is not None:
            self._resume(resume_from)
        self.clock = RunClock(self.schedule.total_steps, self.state.step)  # the whole-run ETA of log lines
        # paths absolute and the labels copied in: the run folder works wherever it is moved (run_folder.py)
        self.config_text = config.dump_yaml(portable_recipe(cfg))
        if self.rt.is_main:
            atomic_write_text(self.run_dir / "config.yaml", self.config_text)
            keep_labels(cfg, self.run_dir)
        self.metrics = MetricsLog(
            self.run_dir / "metrics.jsonl", enabled=self.rt.is_main, keep_until_step=self.resumed_from_step
        )
        self.logs = ExperimentLogs(  # TensorBoard and W&B, where the recipe asks for them
            self.run_dir, cfg.train, self.rt.is_main, warn=self.reporter.warning, config=dataclasses.asdict(cfg),
            purge_step=None if self.resumed_from_step is None else self.resumed_from_step + 1,
        )  # fmt: skip
        self.boundary = self._snapshot()
        self.last_saved: tuple[Path, int] | None = (resume_from, self.state.step) if resume_from else None

    # ------------------------------------------------------------------ checkpoints and resume

    def _resume(self, folder: Path) -> None:
        saved = ckpt.load_state(folder)
        if saved.get("format") != STATE_FORMAT or saved.get("kind") != STAGE:
            raise UserError(f"{folder / 'state.pt'}: not a fine-tuning state of this version")
        mine = self._settings()
        for key, value in saved["settings"].items():
            if mine.get(key) != value:
                raise UserError(
                    f"key 'train.resume': {key} is {mine.get(key)!r} in the recipe but {value!r} in {folder}; "
                    "resume with the recipe of the run"
                )
        if saved["train"]["position"] and saved["batch_size"] != self.cfg.data.loader.batch_size:
            raise UserError(
                f"key 'data.loader.batch_size' is {self.cfg.data.loader.batch_size} but {folder} stopped "
                f"mid-epoch with batches of {saved['batch_size']}; resume with the same batch size"
            )
        switched = keep_started_precision(self.rt, self.cfg.train.precision, saved.get("precision"))
        if switched:
            self.reporter.warning(switched)
        ckpt.load_module(folder / "model.safetensors", self.model, self.rt.device)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.state = FinetuneState(**saved["train"])
        self.epoch_meter.load_state_dict(saved["epoch_meter"])
        self.window_meter.load_state_dict(saved["window_meter"])
        if (folder / AVERAGE_FILE).is_file():
            self.average = read_safetensors(folder / AVERAGE_FILE, self.rt.device)
        restore_rng(saved["rng"], self.rt.device)
        self.resumed_from_step = self.state.step

    def _settings(self) -> dict[str, Any]:
        """What a checkpoint's weights depend on: a resumed run must agree on all of it."""
        ft = self.cfg.finetune
        settings = {**dataclasses.asdict(self.cfg.model), "mode": ft.mode, "num_classes": self.num_classes}
        if self.model.prototype_head is not None:  # left out for the linear head: older states resume
            spec = self.model.prototype_head
            settings["prototype_head"] = {"sizes": list(spec.sizes), "trainable": spec.trainable,
                                          "temperature": spec.temperature}  # fmt: skip
        return settings

    def _snapshot(self) -> dict[str, Any]:
        """The small part of the state at an optimiser-step boundary; the running means are added
        by ``_save``, after the flush that brings them up to it (as in pre-training)."""
        return {"train": dataclasses.asdict(self.state), "rng": capture_rng(self.rt.device)}

    def _save(self, name: str, weights: dict[str, Any] | None = None) -> Path | None:
        self._settle()  # never a checkpoint after an unread NaN
        if not self.rt.is_main:
            return None
        state = {
            "format": STATE_FORMAT,
            "kind": STAGE,
            **self.boundary,
            "epoch_meter": self.epoch_meter.state_dict(),
            "window_meter": self.window_meter.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "batch_size": self.cfg.data.loader.batch_size,
            "precision": self.rt.precision,  # a resumed run keeps it (runtime.keep_started_precision)
            "settings": self._settings(),
        }
        files: dict[str, Any] = {"model": self.model if weights is None else weights}
        if self.average is not None and weights is None:
            files["average"] = self.average
        path = ckpt.save_files(self.run_dir, name, weights=files, state=state, config_text=self.config_text)
        write_model_card(self.run_dir)  # README.md: what the run is, as of this checkpoint
        if name == "last":
            self.last_saved = (path, self.boundary["train"]["step"])
        return path

    # ------------------------------------------------------------------ the loop

    def run(self) -> FinetuneResult:
        def close_loaders() -> None:
            close_loader(self.loader)
            close_loader(self.eval_loader)
            if self.replicas is not None:
                self.replicas.close()
            self.logs.close()

        run_stoppable(self._epoch, lambda: self.state.epoch >= self.plan.total_epochs,
                      lambda: self._save("last"), lambda: self.boundary, close_loaders)  # fmt: skip
        if self.average is not None and ckpt.find_checkpoint(self.run_dir, "averaged", ckpt.FINETUNE_FILES) is None:
            self._finish_average()
        lines = read_metrics(self.metrics.path) if self.rt.is_main else []  # rank 0 writes it
        averaged = [r for r in lines if r["kind"] == "averaged"]
        files = ckpt.FINETUNE_FILES
        return FinetuneResult(
            run_dir=self.run_dir,
            metric=self.metric,
            epochs=[r for r in lines if r["kind"] == "epoch"],
            averaged=averaged[-1] if averaged else None,
            steps=self.state.step,
            seconds=time.perf_counter() - self.started,
            last=ckpt.find_checkpoint(self.run_dir, "last", files),
            best=ckpt.find_checkpoint(self.run_dir, "best", files),
            average=ckpt.find_checkpoint(self.run_dir, "averaged", files),
            device=str(self.rt.device),
            precision=self.rt.precision,
            init=self.init,
            resumed_from_step=self.resumed_from_step,
            log=self.metrics.path,
        )

    def batch_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalisation (of the compact batch), soft targets, mixup, SpecAugment, fbank noise,
        label smoothing, forward, loss."""
        ft = self.cfg.finetune
        batch = model_inputs(batch, self.cfg.data, self.rt.device)
        fbank, frames = batch["fbank"], batch["frames"]
        targets = augment.one_hot_targets(batch["label"], self.label_mode, self.num_classes)
        if ft.mixup > 0:
            mixed = augment.mixup(fbank, frames, targets, ft.mixup, ft.mixup_alpha)
            fbank, frames, targets = mixed.fbank, mixed.frames, mixed.targets
        if ft.freq_mask or ft.time_mask:
            fbank = augment.spec_augment(fbank, ft.freq_mask, ft.time_mask)
        if ft.audio_noise:
            fbank = augment.fbank_noise(fbank)
        targets = augment.smooth_targets(targets, ft.label_smoothing)
        if self.replicas is not None:  # the batch's rows in slices on threads (replicas.py)
            logits = self.replicas.forward_rows(
                fbank.shape[0], self.rt, lambda net, rows: net(fbank[rows], frames[rows])
            )
        else:
            with self.rt.autocast():
                logits = self.compiler(self.net)(fbank, frames)
        return augment.classification_loss(logits, targets, self.label_mode)

    def _wrap(self) -> None:
        """DDP around the classifier, once (what trains never changes here)."""
        if self.rt.world_size > 1 and self.net is self.model:
            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            self.net = DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=True, broadcast_buffers=False
            )

    def _shard(self, b: int) -> BatchShard | None:
        if self.rt.world_size == 1:
            return None
        sizes = split(self.sampler.global_size(b), self.rt.world_size)
        return BatchShard(tuple(sizes), self.rt.rank)

    def _epoch(self, stop: StopRequests) -> None:
        st = self.state
        epoch = st.epoch
        self.model.train()
        self._wrap()
        self.memory.before_first_step(self._estimate_step)
        if st.position == 0:
            self.epoch_meter, self.window_meter = Meter(("loss",)), Meter(("loss",))
        accum, n_batches = self.plan.accum_steps, self.sampler.batches_per_epoch
        self.sampler.set_epoch(epoch, st.position)
        lr = self.schedule.lr(st.step)
        window_start, epoch_start, epoch_samples = time.perf_counter(), time.perf_counter(), 0
        with self.reporter.progress(f"{STAGE} {epoch + 1}/{self.plan.total_epochs}", self.schedule.steps_per_epoch) as advance:
            advance(st.position // accum, "")
            in_group = 0
            for batch in self.loader:
                shard = self._shard(st.position + in_group)
                if shard is None:
                    stop.check()  # under DDP: agreed at flush points (_flush)
                group = min(accum, n_batches - st.position)
                last_of_group = in_group + 1 == group
                with contextlib.nullcontext() if shard is None or last_of_group else self.net.no_sync():
                    loss = self.batch_loss(batch)
                    clips = batch["fbank"].shape[0]
                    n = clips if shard is None else shard.total
                    self.pending.add(st.step + 1, {"loss": loss}, clips, n)  # read at the next flush, not now
                    if shard is not None:
                        loss = loss * shard.local_weight  # DDP averages: sum_r n_r / B grad(L_r)
                    (loss / group).backward()
                    if self.replicas is not None:
                        self.replicas.backward()
                epoch_samples += n
                in_group += 1
                if in_group < group:
                    continue
                in_group = 0
                lr = self._optimizer_step()
                st.position += group
                st.step += 1
                self.boundary = self._snapshot()
                log_step = st.step % self.cfg.train.log_every == 0
                interrupted = call_on_step(self.on_step, StepInfo(st.step, epoch, st.position, STAGE, lr, self.shown),
                                           defer=log_step)  # fmt: skip
                asked = False
                if log_step:  # a flush point: read the window, write its step line
                    asked = self._flush(stop, interrupted is not None)
                    rate = self.window_meter.samples / max(time.perf_counter() - window_start, 1e-9)
                    self.shown = self.window_meter.means()
                    self._log("step", epoch, lr, self.shown["loss"], rate)
                    self.window_meter, window_start = Meter(("loss",)), time.perf_counter()
                rate = epoch_samples / max(time.perf_counter() - epoch_start, 1e-9)
                mean = self.epoch_meter.means()["loss"]  # as of the last flush
                advance(1, f"loss {'-' if mean is None else f'{mean:.3f}'} {significant(rate)}/s{self.clock.note(st.step)}")
                if interrupted is not None:
                    raise interrupted
                if asked:
                    raise KeyboardInterrupt(stop.reason or "another process stopped")
        if self._flush(stop):  # the epoch line and the best/last checkpoints need every value
            raise KeyboardInterrupt(stop.reason or "another process stopped")
        self._end_epoch(epoch, lr, time.perf_counter() - epoch_start, epoch_samples)

    def _flush(self, stop: StopRequests, asked: bool = False) -> bool:
        """A flush point, as ``Trainer._flush``: read the pending losses into the running means,
        raise on the first non-finite one; under DDP returns whether any rank asked to stop."""
        reduce_on = None if self.rt.world_size == 1 else comm_device(self.rt.device)
        flushed = self.pending.read_into(
            (self.epoch_meter, self.window_meter), self._loss_diverged,
            reduce_on=reduce_on, stop=stop.reason is not None or asked,
        )  # fmt: skip
        return flushed.stop

    def _loss_diverged(self, step: int, _part: str, value: float) -> TrainingDiverged:
        return self._diverged(step, f"the fine-tuning loss is {value}")

    def _settle(self) -> None:
        """Before a checkpoint write, as ``Trainer._settle``: read what is pending without any
        collective, raise on a NaN, bring the running means up to the saved boundary."""
        if not len(self.pending):
            return
        flushed = self.pending.read_into(
            (self.epoch_meter, self.window_meter), self._loss_diverged, up_to=self.boundary["train"]["step"]
        )
        if self.rt.world_size > 1 and not finite_weights(self.model):
            raise self._diverged(flushed.batches[0].step, "the weights are not finite (another process's loss diverged)")

    def _estimate_step(self) -> StepEstimate | None:
        """What a step of this process's micro-batch will hold (``memory.estimate_loop_step``):
        dry passes of the classifier."""

        def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with self.rt.autocast():
                return self.model(batch["fbank"], batch["frames"])

        return estimate_loop_step(self.model, forward, self.cfg, len(self.dataset), self.rt, self.replicas,
                                  self.optimizer)  # fmt: skip

    def _optimizer_step(self) -> float:
        if self.replicas is not None:
            self.replicas.collect_grads()
        if self.cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        lr = self.schedule.lr(self.state.step)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.memory.after_step()
        return lr

    def validate(self, model: Classifier, title: str) -> dict[str, float] | None:
        """The task metrics of ``model`` on ``data.eval_manifest`` (``None`` without one); under
        torchrun each rank scores its shard and all get the same numbers (``validation.py``)."""
        if self.eval_loader is None:
            return None
        with self.reporter.progress(title, len(self.eval_loader)) as advance:
            scores, targets = shared_clip_scores(
                model, self.eval_loader, self.label_mode, self.num_classes, self.rt, advance,
                rows=len(self.eval_dataset), data=self.cfg.data,
            )  # fmt: skip
        model.train()
        summary, _ = classification_metrics(scores, targets, self.label_mode, self.class_names)
        return summary

    def _end_epoch(self, epoch: int, lr: float, seconds: float, samples: int) -> None:
        ft, st = self.cfg.finetune, self.state
        final = epoch + 1 == self.plan.total_epochs
        started = time.perf_counter()
        val = None
        if final or (epoch + 1) % ft.eval_every_epochs == 0:
            val = self.validate(self.model, f"validate {epoch + 1}/{self.plan.total_epochs}")
        eval_seconds = time.perf_counter() - started
        metric = None if val is None else val[self.metric]
        # ties go to the later epoch (as in pre-training): as good on validation, trained longer
        finite = metric is not None and not math.isnan(metric)
        improved = finite and (st.best_metric is None or metric >= st.best_metric)
        if improved:
            st.best_metric, st.best_epoch = metric, epoch
        if ft.average_from_epoch is not None and epoch + 1 >= ft.average_from_epoch:
            self._accumulate_average()
        means = self.epoch_meter.means()
        st.epoch, st.position = epoch + 1, 0
        self.epoch_meter, self.window_meter = Meter(("loss",)), Meter(("loss",))
        self.boundary = self._snapshot()
        extra = {"seconds": round(seconds, 3), "eval_seconds": round(eval_seconds, 3), "metric": self.metric,
                 "peak_memory_gb": gigabytes(peak_bytes(self.rt.device))}  # fmt: skip
        self._log("epoch", epoch, lr, means["loss"], samples / max(seconds, 1e-9), val=val, **extra)
        if (epoch + 1) % self.cfg.train.save_every_epochs == 0 or final:
            self._save("last")
        if improved:
            self._save("best")

    def _accumulate_average(self) -> None:
        weights = {k: v.detach().float() for k, v in self.model.state_dict().items()}
        if self.average is None:
            self.average = {k: v.clone() for k, v in weights.items()}
        else:
            for k, v in weights.items():
                self.average[k] += v
        self.state.averaged_epochs += 1

    def _finish_average(self) -> None:
        """Average the summed weights, validate them, write ``checkpoints/averaged``."""
        n = self.state.averaged_epochs
        mean = {k: v / n for k, v in self.average.items()}
        model = copy.deepcopy(self.model)
        model.load_state_dict(mean, strict=True)
        val = self.validate(model, "validate averaged")
        first = self.cfg.finetune.average_from_epoch
        self._log("averaged", self.state.epoch - 1, 0.0, None, 0.0, val=val, metric=self.metric,
                  averaged_epochs=[first, first + n - 1])  # fmt: skip
        self._save("averaged", weights=model)

    def _log(self, kind: str, epoch: int, lr: float, loss: float | None, rate: float, *,
             val: dict[str, float] | None = None, **extra: Any) -> None:  # fmt: skip
        record = {"kind": kind, "step": self.state.step, "epoch": epoch + 1, "stage": STAGE, "lr": lr, "loss": loss,
                  "samples_per_s": round(rate, 2), "time": round(time.time(), 3), **extra}  # fmt: skip
        if val is not None:
            record.update({f"val_{k}": v for k, v in val.items()})
        self.metrics.write(record)
        self.logs.write(record)
        tell(self.reporter, record, self.plan.total_epochs, self.schedule.total_steps, self.clock, self.rt.is_main)

    def _diverged(self, step: int, what: str) -> TrainingDiverged:
        if self.last_saved is None:
            where = "no checkpoint was written yet"
        else:
            where = f"the last good checkpoint is {self.last_saved[0]} (step {self.last_saved[1]})"
        return TrainingDiverged(
            f"{what} at step {step} (epoch {self.state.epoch + 1}); "
            f"the run stopped, {where}"
        )
