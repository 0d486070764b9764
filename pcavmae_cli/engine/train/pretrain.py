"""The pre-training loop of PCAV-MAE: stages, E-step, M-step, checkpoints, resume.

``pretrain(cfg, reporter)`` runs a recipe's stages in order (sec. 3.2). Each epoch (global,
0-based, across stages): the stage's parts are made trainable (``PCAVMAE.set_trainable``); from
``prototypes.warmup_epochs`` on, the E-step finds this epoch's prototypes (``estep.run_estep``);
then the M-step runs over the epoch's batches (``objective.batch_losses``), accumulating
gradients to ``optim.effective_batch`` before each AdamW step, after which the learning rate
follows ``schedule.Schedule`` and the momentum encoder moves towards the model. With a recipe
``health`` section the epoch also measures the representation health of the momentum encoder's
embeddings of the training set (``evaluate/health.py``) -- from the E-step's features, or on
epochs without one from an embedding of its own of ``health.max_rows`` evenly spaced clips --
logs it in the epoch line and warns (``RepresentationCollapse``, through the reporter: a line in
the CLI, a Python warning from Python) once per episode in which a modality stays collapsed.

The step reads nothing back from the device, so the host can queue work ahead of the GPU: the
logged loss parts stay on the device (``pending.PendingLosses``) until a flush point -- every
``train.log_every`` steps (the step line), the end of an epoch, and before any checkpoint write --
where they are read in one transfer, checked for NaN / inf (``TrainingDiverged`` names the step
the bad batch belonged to) and added to the running means in batch order, so the logged numbers
are those of a per-batch read. The progress note and ``StepInfo.losses`` show the means as of the
last flush.

Resume (``train.resume=true``) restores weights, optimiser, step, epoch, the position inside the
epoch, the RNG states and the running means from ``checkpoints/last`` and goes on as if nothing
had happened: the data order and per-clip randomness are functions of (seed, epoch, clip)
(``data.py``), the masks come from the restored global RNG, and a mid-epoch resume reloads that
epoch's prototypes from ``prototypes/`` instead of recomputing them from moved weights.

The same loop runs under torchrun (``distributed.py``): the model is wrapped in DDP (rebuilt when
a stage changes what trains), each rank takes its slice of every global batch, the contrastive
losses see the gathered global batch, the logged parts are reduced across ranks at the flush
points (one all-reduce per flush, which also carries the ranks' stop requests, so that all ranks
stop at the same step: under DDP a Ctrl-C or SIGTERM is taken at the next flush point, up to
``train.log_every`` steps later, or in the E-step), the E-step is sharded, and only rank 0
writes. Checkpoints hold the unwrapped model and the global RNG state, which every rank shares,
so they resume at any world size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset

from pcavmae_cli.engine import config
from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.data.manifest import atomic_write_text
from pcavmae_cli.engine.data.model_inputs import model_inputs
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.evaluate.health import (
    CollapseEpisodes,
    collapse_message,
    collapsed_modalities,
    empty_health,
)
from pcavmae_cli.engine.folder_lock import run_folder_lock
from pcavmae_cli.engine.model import PCAVMAE, MomentumEncoder
from pcavmae_cli.engine.prototypes import Prototypes, load_prototypes, prototypes_active
from pcavmae_cli.engine.progress import ProgressReporter, default_reporter
from pcavmae_cli.engine.model_card import write_model_card
from pcavmae_cli.engine.run_folder import keep_labels, portable_recipe
from pcavmae_cli.engine.schema import Recipe, StageConfig
from pcavmae_cli.engine.train import augment
from pcavmae_cli.engine.train import checkpoint as ckpt
from pcavmae_cli.engine.train.checks import check_clusters, check_recipe, is_stage_end, stage_of
from pcavmae_cli.engine.train.data import EpochBatchSampler, close_loader, embed_loader, train_loader
from pcavmae_cli.engine.train.distributed import (
    BatchShard,
    agree,
    bounds,
    check_batches_fit_world,
    comm_device,
    split,
    world_from_env,
)
from pcavmae_cli.engine.train.estep import health_shard, measure_health, run_estep
from pcavmae_cli.engine.train.pretrain_validation import PretrainValidation
from pcavmae_cli.engine.train.validation_figures import draw_epoch_figures, epoch_folder
from pcavmae_cli.engine.train.fast import StepCompiler, set_activation_checkpointing
from pcavmae_cli.engine.train.memory import MemoryCheck, StepEstimate, estimate_loop_step, gigabytes, peak_bytes
from pcavmae_cli.engine.train.log_lines import RunClock, significant, tell
from pcavmae_cli.engine.train.experiment_logs import ExperimentLogs
from pcavmae_cli.engine.train.metrics import Meter, MetricsLog, format_losses, loss_fields, read_metrics
from pcavmae_cli.engine.train.objective import BatchObjective, batch_losses
from pcavmae_cli.engine.train.optim import build_optimizer, set_lr
from pcavmae_cli.engine.train.pending import PendingLosses, finite_weights
from pcavmae_cli.engine.train.replicas import replicas_for
from pcavmae_cli.engine.train.runtime import (
    capture_rng, keep_started_precision, resolve_runtime, restore_rng, seed_everything,
)
from pcavmae_cli.engine.train.schedule import Schedule
from pcavmae_cli.engine.train.stop import StopRequests, call_on_step, run_stoppable

STATE_FORMAT = 1


class RepresentationCollapse(UserWarning):
    """A modality's representation health stayed collapsed for two measurements in a row
    (``health.collapse_*``); issued once per such episode (``CollapseEpisodes``)."""


class TrainingDiverged(UserError):
    """A loss part became NaN or infinite; the message names the step, the part and the last checkpoint."""


@dataclass
class StepInfo:
    """What the loop passes to ``on_step`` after each optimiser step."""

    step: int  # optimiser steps done, this one included
    epoch: int
    position: int  # batches of this epoch done
    stage: str
    lr: float
    losses: dict[str, float | None]  # means of the last step line (the window read at the last flush)


@dataclass
class PretrainResult:
    run_dir: Path
    epochs: list[dict[str, Any]]  # the epoch lines of metrics.jsonl, resumed parts included
    steps: int  # optimiser steps of the whole run
    seconds: float  # wall time of this call
    last: Path | None
    best: Path | None
    device: str
    precision: str
    resumed_from_step: int | None = None
    log: Path = field(default_factory=Path)


@dataclass
class TrainState:
    """Where the run is; saved with every checkpoint (``state.pt``)."""

    step: int = 0  # optimiser steps done
    epoch: int = 0  # the epoch in progress (global, 0-based)
    position: int = 0  # batches of that epoch done (always a whole number of optimiser steps)
    best_metric: float | None = None  # the best value of best_by so far
    best_epoch: int | None = None
    best_regime: list[int] | None = None  # by loss: [stage index, prototypes on]; totals compare only within one
    best_by: str = "loss"  # "loss" (lowest epoch-mean total) or the validation figure, e.g. "val_knn_joint" (highest)
    health: dict[str, Any] | None = None  # this epoch's representation health, measured at its start


def estep_figures(protos: list[Prototypes] | None) -> dict[str, list[float] | None]:
    """Per granularity of this epoch's prototypes: the largest cluster's share of the clips and
    the smallest and largest concentration gamma of eq. 2 (rescaled to mean ``tau``): a cluster
    swallowing the data, or gammas pinned at their clamps, show here first. Null in warm-up."""
    if protos is None:
        return {"proto_largest_share": None, "proto_gamma_min": None, "proto_gamma_max": None}
    return {
        "proto_largest_share": [round(float(p.counts.max() / p.counts.sum()), 4) for p in protos],
        "proto_gamma_min": [round(float(p.gamma.min()), 5) for p in protos],
        "proto_gamma_max": [round(float(p.gamma.max()), 5) for p in protos],
    }


def pretrain(
    cfg: Recipe, reporter: ProgressReporter | None = None, *, on_step: Callable[[StepInfo], None] | None = None
) -> PretrainResult:
    """Pre-train with recipe ``cfg``; returns the run's epoch summaries and checkpoint folders.

    Raises ``UserError`` (before any work) for a recipe that cannot run or a ``train.run_dir`` that
    another process is writing into (``folder_lock``), ``TrainingDiverged`` for a
    non-finite loss, and ``Interrupted`` after writing ``checkpoints/last`` when stopped by Ctrl-C,
    SIGTERM or a ``KeyboardInterrupt`` (from ``on_step``, say).
    """
    run_dir = cfg.train.run_dir if cfg.train is not None else None
    with run_folder_lock(run_dir, world_from_env().rank):  # one run per folder
        return Trainer(cfg, default_reporter(reporter), on_step).run()


class Trainer:
    """One pre-training run; ``run`` executes it. Built in start-up order: checks first."""

    def __init__(self, cfg: Recipe, reporter: ProgressReporter, on_step: Callable[[StepInfo], None] | None):
        self.started = time.perf_counter()
        self.cfg, self.reporter, self.on_step = cfg, reporter, on_step
        self.plan = check_recipe(cfg, world_from_env().world_size)  # before any work, the group included
        self.rt = resolve_runtime(cfg.train, cfg.model)
        self.run_dir = Path(cfg.train.run_dir)
        resume_from = self._check_run_dir()
        data, loader_cfg = cfg.data, cfg.data.loader
        self.dataset = AudioVisualDataset(data.train_manifest, data, frames=loader_cfg.train_frame, compact=True)
        check_clusters(cfg, len(self.dataset))

        self.sampler = EpochBatchSampler(
            len(self.dataset), loader_cfg.batch_size, cfg.seed,
            max_batches=None if cfg.train.max_steps_per_epoch is None
            else cfg.train.max_steps_per_epoch * self.plan.accum_steps,
            rank=self.rt.rank, world_size=self.rt.world_size,
        )  # fmt: skip
        check_batches_fit_world(self.sampler, self.rt.world_size)
        if self.sampler.smallest_batch() == 1 and any(st.loss.w_infonce != 0 for st in cfg.stages):
            reporter.warning(f"a batch of 1 clip (data.loader.batch_size {loader_cfg.batch_size}, {len(self.dataset)} "
                             "clips) has no negatives for the InfoNCE: it is left out of the logged InfoNCE means")  # fmt: skip
        self.loader = train_loader(self.dataset, self.sampler, loader_cfg, self.rt)
        self.embed_loader = self.health_loader = None
        n, world = len(self.dataset), self.rt.world_size
        # the E-step's shard of the manifest, and the most batches any rank's shard takes
        self.embed_rounds = max(-(-size // loader_cfg.batch_size) for size in split(n, world))
        if cfg.prototypes is not None or cfg.health is not None:  # the E-step's and the health's features
            middle = AudioVisualDataset(data.train_manifest, data, frames="middle", compact=True)
            if cfg.prototypes is not None:
                shard = middle if world == 1 else Subset(middle, range(*bounds(n, world, self.rt.rank)))
                self.embed_loader = embed_loader(shard, loader_cfg, self.rt)
            if cfg.health is not None:
                self._health_loader(middle)
        self.validation = PretrainValidation(cfg, self.rt, reporter.warning) if PretrainValidation.active(cfg) else None
        steps_per_epoch = -(-self.sampler.batches_per_epoch // self.plan.accum_steps)
        self.schedule = Schedule(steps_per_epoch, self.plan.total_epochs, cfg.optim)

        seed_everything(cfg.seed)
        self.model = PCAVMAE(cfg.model).to(self.rt.device)
        self.momentum = MomentumEncoder(self.model).to(self.rt.device)
        set_activation_checkpointing(self.model, cfg.train.activation_checkpointing)
        self.compiler = StepCompiler(cfg.train.compile)  # train.compile: eager fallback, fast.py
        self.replicas = replicas_for(self.model, cfg.train, self.rt.device, self.rt.world_size, loader_cfg.batch_size)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.memory = MemoryCheck(self.rt.device, self.rt.is_main, reporter.warning)  # memory.py
        self.ddp: DistributedDataParallel | None = None  # built per stage (what trains), world > 1
        self.ddp_parts: tuple[str, ...] | None = None
        self.state = TrainState()
        self.collapse_episodes = CollapseEpisodes()  # when to warn about a collapse (_note_health)
        self.epoch_meter, self.window_meter = Meter(), Meter()
        self.pending = PendingLosses()  # logged parts not read from the device yet (pending.py)
        self.shown: dict[str, float | None] = Meter().means()  # the last step line's means
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

    # ------------------------------------------------------------------ start-up

    def _check_run_dir(self) -> Path | None:
        return ckpt.resume_point(self.run_dir, self.cfg.train.resume)

    def _health_loader(self, middle: AudioVisualDataset) -> None:
        """The loader of epochs that measure health without an E-step: only the
        ``health.max_rows`` evenly spaced clips the figures use (this rank's share), as the
        E-step's loader would load them; the E-step's own loader when that is the whole set."""
        n, world, loader_cfg = len(middle), self.rt.world_size, self.cfg.data.loader
        self.health_shard = health_shard(n, self.cfg.health.max_rows, loader_cfg.batch_size, self.rt.rank, world)
        whole = self.health_shard.rows == list(range(*bounds(n, world, self.rt.rank)))
        if whole and self.embed_loader is not None:
            self.health_loader = self.embed_loader
        else:
            self.health_loader = embed_loader(Subset(middle, self.health_shard.rows), loader_cfg, self.rt)

    def _resume(self, folder: Path) -> None:
        saved = ckpt.load_state(folder)
        if saved.get("format") != STATE_FORMAT:
            raise UserError(f"{folder / 'state.pt'}: unknown training-state format {saved.get('format')!r}")
        mine = dataclasses.asdict(self.cfg.model)
        for key, value in saved["model_config"].items():
            if mine.get(key) != value:
                raise UserError(
                    f"key 'train.resume': model.{key} is {mine.get(key)!r} in the recipe but {value!r} "
                    f"in {folder}; resume with the recipe of the run"
                )
        if saved["train"]["position"] and saved["batch_size"] != self.cfg.data.loader.batch_size:
            raise UserError(
                f"key 'data.loader.batch_size' is {self.cfg.data.loader.batch_size} but {folder} stopped "
                f"mid-epoch with batches of {saved['batch_size']}; resume with the same batch size"
            )
        switched = keep_started_precision(self.rt, self.cfg.train.precision, saved.get("precision"))
        if switched:
            self.reporter.warning(switched)
        ckpt.load_weights(folder, self.model, self.momentum, self.rt.device)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.state = TrainState(**saved["train"])
        self.epoch_meter.load_state_dict(saved["epoch_meter"])
        self.window_meter.load_state_dict(saved["window_meter"])
        restore_rng(saved["rng"], self.rt.device)
        self.resumed_from_step = self.state.step

    # ------------------------------------------------------------------ checkpoints

    def _snapshot(self) -> dict[str, Any]:
        """The small part of the state at an optimiser-step boundary (weights are unchanged in
        between). The running means are added when a checkpoint is written (``_save``), after the
        flush that brings them up to this boundary."""
        return {"train": dataclasses.asdict(self.state), "rng": capture_rng(self.rt.device)}

    def _save(self, name: str) -> Path | None:
        """Write checkpoint ``name`` from the last boundary (rank 0 only; the other ranks note
        where it went, so that every rank's divergence message names it). What is still pending
        is read first: a NaN among it raises instead of saving garbage weights."""
        self._settle()
        if not self.rt.is_main:
            if name == "last":
                self.last_saved = (ckpt.checkpoints_root(self.run_dir) / name, self.boundary["train"]["step"])
            return None
        state = {
            "format": STATE_FORMAT,
            **self.boundary,
            "epoch_meter": self.epoch_meter.state_dict(),
            "window_meter": self.window_meter.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "batch_size": self.cfg.data.loader.batch_size,
            "precision": self.rt.precision,  # a resumed run keeps it (runtime.keep_started_precision)
            "model_config": dataclasses.asdict(self.cfg.model),
        }
        path = ckpt.save_checkpoint(
            self.run_dir, name, model=self.model, momentum=self.momentum, state=state, config_text=self.config_text
        )
        write_model_card(self.run_dir)  # README.md: what the run is, as of this checkpoint
        if name == "last":
            self.last_saved = (path, self.boundary["train"]["step"])
        return path

    # ------------------------------------------------------------------ the loop

    def run(self) -> PretrainResult:
        def close_loaders() -> None:
            close_loader(self.loader)
            close_loader(self.embed_loader)
            close_loader(self.health_loader)
            if self.validation is not None:
                self.validation.close()
            if self.replicas is not None:
                self.replicas.close()
            self.logs.close()

        run_stoppable(self._epoch, lambda: self.state.epoch >= self.plan.total_epochs,
                      lambda: self._save("last"), lambda: self.boundary, close_loaders)  # fmt: skip
        return PretrainResult(
            run_dir=self.run_dir,
            epochs=read_metrics(self.metrics.path, "epoch") if self.rt.is_main else [],
            steps=self.state.step,
            seconds=time.perf_counter() - self.started,
            last=ckpt.find_checkpoint(self.run_dir, "last"),
            best=ckpt.find_checkpoint(self.run_dir, "best"),
            device=str(self.rt.device),
            precision=self.rt.precision,
            resumed_from_step=self.resumed_from_step,
            log=self.metrics.path,
        )

    def _prototypes(self, epoch: int, stage: StageConfig, stop: StopRequests) -> list[Prototypes] | None:
        """This epoch's prototypes: ``None`` in warm-up, without prototypes, or if the stage uses none.

        Sets ``state.health`` from the same features (``_health`` on epochs without an E-step); a
        mid-epoch resume keeps the restored one (measured before the weights moved on).
        """
        protos_cfg = self.cfg.prototypes
        uses = stage.loss.w_pje != 0 or stage.loss.w_pcpe != 0
        if protos_cfg is None or not uses or not prototypes_active(epoch, protos_cfg):
            if self.state.position == 0:
                self.state.health = self._health(epoch, stop)
            return None
        folder = self.run_dir / "prototypes"
        if self.state.position > 0:  # resumed mid-epoch: the weights moved on since this epoch's E-step
            return [p.to(self.rt.device) for p in load_prototypes(folder, epoch, self.rt.device)]
        with self.reporter.progress(f"E-step {epoch + 1}/{self.plan.total_epochs}", len(self.embed_loader)) as advance:
            out = run_estep(
                self.momentum, self.embed_loader, protos_cfg, epoch, self.rt, folder, advance,
                lambda: self._check_stop(stop), n_total=len(self.dataset), rounds=self.embed_rounds,
                data=self.cfg.data, health=self.cfg.health,
            )  # fmt: skip
        self._note_health(out.health, epoch)
        return [p.to(self.rt.device) for p in out.prototypes]

    def _health(self, epoch: int, stop: StopRequests) -> dict[str, Any] | None:
        """Representation health of an epoch without an E-step, every ``health.every_epochs``,
        on the ``health.max_rows`` clips of ``health_loader`` (not the whole training set)."""
        cfg = self.cfg.health
        if cfg is None or cfg.every_epochs == 0 or epoch % cfg.every_epochs != 0:
            return None
        with self.reporter.progress(f"health {epoch + 1}/{self.plan.total_epochs}", len(self.health_loader)) as advance:
            figures = measure_health(
                self.momentum, self.health_loader, cfg, self.rt, advance, lambda: self._check_stop(stop),
                rows=self.health_shard.rows, rounds=self.health_shard.rounds, data=self.cfg.data,
            )  # fmt: skip
        return self._note_health(figures, epoch)

    def _note_health(self, figures: dict[str, Any] | None, epoch: int) -> dict[str, Any] | None:
        """Keep ``figures`` for the epoch line; warn (rank 0) once per collapse episode.

        A modality is warned about at its second flagged measurement in a row: a randomly
        initialised encoder's embeddings are often nearly parallel (the demo model's video side:
        mean cosine 0.96-0.99 at initialisation), so one flagged measurement at the start is the
        norm, not a problem; one that persists is. Then nothing more about it until a measurement
        finds it recovered (``CollapseEpisodes``). The epoch line's ``health_collapsed_*`` flags
        record every measurement.
        """
        self.state.health = figures
        cfg = self.cfg.health
        if figures is None or cfg is None:
            return figures
        new = self.collapse_episodes.update(collapsed_modalities(figures))
        if new and self.rt.is_main:
            shown = {**figures, **{f"health_collapsed_{m}": m in new for m in collapsed_modalities(figures)}}
            message = collapse_message(shown, epoch, collapse_cosine=cfg.collapse_cosine,
                                       collapse_rank=cfg.collapse_rank)  # fmt: skip
            self.reporter.warning(message, RepresentationCollapse)
        return figures

    def _epoch(self, stop: StopRequests) -> None:
        cfg, st = self.cfg, self.state
        epoch = st.epoch
        stage_index, stage = stage_of(cfg, epoch)
        self.model.set_trainable(stage.trainable)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.memory.before_first_step(lambda: self._estimate_step(stage))
        net = self.compiler(self._wrapped(stage))
        if st.position == 0:
            self.epoch_meter, self.window_meter = Meter(), Meter()
        started = time.perf_counter()
        protos = self._prototypes(epoch, stage, stop)
        estep_seconds = time.perf_counter() - started

        accum, n_batches = self.plan.accum_steps, self.sampler.batches_per_epoch
        self.sampler.set_epoch(epoch, st.position)
        total_steps_here = self.schedule.steps_per_epoch
        title = f"{stage.name} {epoch + 1}/{self.plan.total_epochs}"
        lr = self.schedule.lr(st.step)
        window_start, epoch_start, epoch_samples = time.perf_counter(), time.perf_counter(), 0
        with self.reporter.progress(title, total_steps_here) as advance:
            advance(st.position // accum, "")
            in_group = 0
            for batch in self.loader:
                if self.ddp is None:
                    stop.check()  # under DDP the ranks agree on it at flush points (_flush)
                batch = model_inputs(batch, cfg.data, self.rt.device)  # compact samples, normalised here
                if cfg.augment is not None and cfg.augment.active:
                    aug = cfg.augment
                    batch["fbank"] = augment.pretrain_audio_view(batch["fbank"], aug.audio_roll, aug.freq_mask, aug.time_mask)
                shard = self._shard(st.position + in_group)
                group = min(accum, n_batches - st.position)
                last_of_group = in_group + 1 == group
                with contextlib.nullcontext() if self.ddp is None or last_of_group else self.ddp.no_sync():
                    if self.ddp is None:
                        total, logged = batch_losses(net, batch, stage.loss, protos, self.rt, replicas=self.replicas)
                    else:  # DDP around BatchObjective: the loss is the wrapped forward's output
                        total, logged = net(batch, stage.loss, protos, self.rt, shard)
                    (total / group).backward()
                    if self.replicas is not None:
                        self.replicas.backward()
                clips = batch["fbank"].shape[0]
                n = clips if shard is None else shard.total
                self.pending.add(st.step + 1, logged, clips, n)  # read at the next flush, not now
                epoch_samples += n
                in_group += 1
                if in_group < group:
                    continue
                in_group = 0
                lr = self._optimizer_step(trainable)
                st.position += group
                st.step += 1
                self.boundary = self._snapshot()
                log_step = st.step % cfg.train.log_every == 0
                info = StepInfo(st.step, epoch, st.position, stage.name, lr, self.shown)
                interrupted = call_on_step(self.on_step, info, defer=log_step)
                asked = False
                if log_step:  # a flush point: read the window, write its step line
                    asked = self._flush(stage, stop, interrupted is not None)
                    rate = self.window_meter.samples / max(time.perf_counter() - window_start, 1e-9)
                    self.shown = self.window_meter.means()
                    self._log("step", epoch, stage, lr, self.shown, rate, prototypes=protos is not None)
                    self.window_meter, window_start = Meter(), time.perf_counter()
                rate = epoch_samples / max(time.perf_counter() - epoch_start, 1e-9)
                note = f"{format_losses(self.epoch_meter.means())} {significant(rate)}/s{self.clock.note(st.step)}"
                advance(1, note)  # the losses as of the last flush
                if interrupted is not None:
                    raise interrupted
                if asked:
                    raise KeyboardInterrupt(stop.reason or "another process stopped")
        if self._flush(stage, stop):  # the epoch line and the best/last checkpoints need every value
            raise KeyboardInterrupt(stop.reason or "another process stopped")
        seconds = time.perf_counter() - epoch_start
        val = self._validate(epoch, protos, stop)
        self._end_epoch(epoch, stage_index, stage, lr, protos, seconds, estep_seconds, epoch_samples, val)

    # ------------------------------------------------------------------ several processes

    def _wrapped(self, stage: StageConfig) -> torch.nn.Module:
        """The module the M-step runs: the model itself, or under torchrun DDP around the
        model's ``BatchObjective``, rebuilt when the stage changes which parts train (DDP
        registers them when built). ``find_unused_parameters``: the parts a batch uses vary (no
        decoder in stage 2, no L_PCPE projections during warm-up)."""
        if self.rt.world_size == 1:
            return self.model
        parts = tuple(stage.trainable)
        if self.ddp is None or self.ddp_parts != parts:
            self.ddp = None  # the old reducer's hooks go with it
            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(
                BatchObjective(self.model), device_ids=ids, find_unused_parameters=True, broadcast_buffers=False
            )
            self.ddp_parts = parts
        return self.ddp

    def _shard(self, b: int) -> BatchShard | None:
        """This rank's slice of global batch ``b`` of the epoch (``None`` in one process)."""
        if self.rt.world_size == 1:
            return None
        sizes = split(self.sampler.global_size(b), self.rt.world_size)
        return BatchShard(tuple(sizes), self.rt.rank)

    def _flush(self, stage: StageConfig, stop: StopRequests, asked: bool = False) -> bool:
        """A flush point: read the pending losses (one transfer), raise ``TrainingDiverged`` at
        the first non-finite one, else add them to the running means in batch order.

        Under DDP the read is one all-reduce that also carries this rank's stop request (or
        ``asked``); returns whether any rank asked, so that all stop at this boundary. In one
        process ``stop.check`` runs before every batch instead, and this returns ``False``.
        """
        reduce_on = None if self.rt.world_size == 1 else comm_device(self.rt.device)
        flushed = self.pending.read_into(
            (self.epoch_meter, self.window_meter), self._loss_diverged(stage),
            reduce_on=reduce_on, stop=stop.reason is not None or asked,
        )  # fmt: skip
        return flushed.stop

    def _loss_diverged(self, stage: StageConfig) -> Callable[[int, str, float], TrainingDiverged]:
        return lambda step, part, value: self._diverged(stage, step, f"loss part '{part}' is {value}")

    def _settle(self) -> None:
        """Before a checkpoint write: read what is pending without any collective (on a stop, a
        rank may be alone here), raise on a NaN among it, and bring the running means up to the
        boundary the checkpoint holds (a partial step past it is discarded, to be redone).

        Under DDP this happens only off the flush points (another rank's loader died, or
        ``on_step`` raised on one rank): the values are then this rank's (the contrastive parts
        are global-batch values anyway; L_r is this rank's clips), and since a NaN on another
        rank reaches these weights through the gradient all-reduce, the weights are checked too.
        """
        if not len(self.pending):
            return
        stage = stage_of(self.cfg, self.state.epoch)[1]
        flushed = self.pending.read_into(
            (self.epoch_meter, self.window_meter), self._loss_diverged(stage), up_to=self.boundary["train"]["step"]
        )
        if self.rt.world_size > 1 and not finite_weights(self.model):
            what = "the weights are not finite (another process's loss diverged)"
            raise self._diverged(stage, flushed.batches[0].step, what)

    def _check_stop(self, stop: StopRequests) -> None:
        """``stop.check``, agreed across ranks under DDP (a collective: every rank calls it)."""
        if self.rt.world_size == 1:
            stop.check()
        elif agree(stop.reason is not None, self.rt.device):
            raise KeyboardInterrupt(stop.reason or "another process stopped")

    def _estimate_step(self, stage: StageConfig) -> StepEstimate | None:
        """What a step of this process's micro-batch will hold (``memory.estimate_loop_step``):
        dry passes through this stage's losses (no prototypes)."""
        return estimate_loop_step(
            self.model, lambda batch: batch_losses(self.model, batch, stage.loss, None, self.rt)[0], self.cfg,
            len(self.dataset), self.rt, self.replicas, self.optimizer,
        )  # fmt: skip

    def _optimizer_step(self, trainable: list[torch.nn.Parameter]) -> float:
        """Clip, step AdamW at the scheduled rate, clear gradients, move the momentum encoder."""
        if self.replicas is not None:
            self.replicas.collect_grads()
        if self.cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trainable, self.cfg.optim.grad_clip)
        lr = self.schedule.lr(self.state.step)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.momentum.update(self.model, self.cfg.model.momentum)
        self.memory.after_step()
        return lr

    def _validate(self, epoch: int, protos: list[Prototypes] | None, stop: StopRequests) -> dict[str, Any] | None:
        """The validation figures of the model as this epoch leaves it, where one is due
        (``pretrain_validation.py``), with ``seconds``; ``None`` otherwise. A stop request is
        taken between batches in one process (under DDP at the next flush point: the shards may
        differ in batches, so no collective runs here)."""
        v = self.validation
        if v is None or not v.due(epoch, epoch + 1 == self.plan.total_epochs):
            return None
        started = time.perf_counter()

        def step(n: int = 1, note: str = "") -> None:
            advance(n, note)
            if self.rt.world_size == 1:
                stop.check()

        with self.reporter.progress(f"validate {epoch + 1}/{self.plan.total_epochs}", v.batches()) as advance:
            figures = v.measure(self.model.backbone, protos, step)
        if v.figures_due(epoch) and self.rt.is_main:
            folder = epoch_folder(self.run_dir, epoch)
            drawn = draw_epoch_figures(self.model, self.cfg.data, v.features, protos, v.names, folder, epoch)
            for name, png in drawn.items():
                self.logs.image(f"figures/{name}", png, self.state.step)
        return {**figures, "seconds": round(time.perf_counter() - started, 3)}

    def _end_epoch(
        self, epoch: int, stage_index: int, stage: StageConfig, lr: float,
        protos: list[Prototypes] | None, seconds: float, estep_seconds: float, samples: int,
        val: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        st = self.state
        means = self.epoch_meter.means()
        extra = {
            "seconds": round(seconds, 3),
            "estep_seconds": round(estep_seconds, 3),
            "peak_memory_gb": gigabytes(peak_bytes(self.rt.device)),
            "num_prototypes": None if protos is None else [int(p.centroids.shape[0]) for p in protos],
            **estep_figures(protos),
        }
        if self.cfg.health is not None:  # measured at the epoch's start; null where it was not
            extra |= st.health if st.health is not None else empty_health()
        if self.validation is not None:  # the figure that picks best; val_* on validated epochs only
            extra["metric"] = self.validation.metric
            if val is not None:  # eval_seconds: as fine-tuning's validation time
                extra |= {f"val_{k}": v for k, v in val.items() if k != "seconds"} | {"eval_seconds": val["seconds"]}
        self._log("epoch", epoch, stage, lr, means, samples / max(seconds, 1e-9), prototypes=protos is not None, **extra)
        if self.validation is not None and self.validation.metric != "loss":
            by = f"val_{self.validation.metric}"
            value = None if val is None else val[self.validation.metric]
            # ties go to the later epoch: as good by the metric, and trained longer (a small eval
            # set's kNN often reaches 1.0 early and stays there)
            improved = value is not None and (st.best_by != by or st.best_metric is None or value >= st.best_metric)
            if improved:
                st.best_metric, st.best_epoch, st.best_regime, st.best_by = value, epoch, None, by
        else:
            regime = [stage_index, int(protos is not None)]
            metric = means["total"]
            improved = metric is not None and (
                st.best_by != "loss" or st.best_regime != regime or st.best_metric is None or metric < st.best_metric
            )
            if improved:
                st.best_metric, st.best_epoch, st.best_regime, st.best_by = metric, epoch, regime, "loss"
        st.epoch, st.position, st.health = epoch + 1, 0, None
        self.epoch_meter, self.window_meter = Meter(), Meter()
        self.boundary = self._snapshot()
        final = st.epoch == self.plan.total_epochs
        if (epoch + 1) % self.cfg.train.save_every_epochs == 0 or is_stage_end(self.cfg, epoch) or final:
            self._save("last")
        if improved:
            self._save("best")

    def _log(
        self, kind: str, epoch: int, stage: StageConfig, lr: float, means: dict, rate: float, *,
        prototypes: bool, **extra: Any,
    ) -> None:  # fmt: skip
        record = {
            "kind": kind, "step": self.state.step, "epoch": epoch + 1, "stage": stage.name, "lr": lr,
            **loss_fields(means), "samples_per_s": round(rate, 2), "prototypes": prototypes,
            "time": round(time.time(), 3), **extra,
        }  # fmt: skip
        self.metrics.write(record)
        self.logs.write(record)
        tell(self.reporter, record, self.plan.total_epochs, self.schedule.total_steps, self.clock, self.rt.is_main)

    def _diverged(self, stage: StageConfig, step: int, what: str) -> TrainingDiverged:
        """``{what} at step 4 (epoch 1, stage 'joint'); the run stopped, the last good checkpoint is ...``"""
        if self.last_saved is None:
            where = "no checkpoint was written yet"
        else:
            where = f"the last good checkpoint is {self.last_saved[0]} (step {self.last_saved[1]})"
        return TrainingDiverged(
            f"{what} at step {step} (epoch {self.state.epoch + 1}, "
            f"stage '{stage.name}'); the run stopped, {where}"
        )
