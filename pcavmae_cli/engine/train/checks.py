"""Start-up checks of a pre-training or fine-tuning recipe, before any work: each failure names the key.

Also the numbers derived from the recipe that the loop needs (accumulation steps, stage of an
epoch), so that they are computed in one place. ``check_any`` runs the checks of every command a
recipe is written for (``pcav recipes show`` and ``check``), so a recipe that prints cleanly
also starts; ``check_inputs`` adds what ``pretrain``/``finetune`` check in the files the recipe
names (``pcav recipes check``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.model import check_config
from pcavmae_cli.engine.schema import Recipe, StageConfig

SECTIONS = ("model", "optim", "stages", "train")
FINETUNE_SECTIONS = ("model", "optim", "train", "finetune")


@dataclass
class Plan:
    """What the recipe implies for the loop."""

    accum_steps: int  # micro-batches per optimiser step: effective_batch / batch_size (global batches)
    total_epochs: int  # all stages


def check_recipe(cfg: Recipe, world_size: int = 1) -> Plan:
    """Refuse a recipe that cannot pre-train, naming the key; return the derived numbers."""
    for section in SECTIONS:
        if getattr(cfg, section) is None:
            raise UserError(f"pre-training needs the recipe section '{section}'")
    check_shapes(cfg)
    if cfg.data.train_manifest is None:
        raise UserError("key 'data.train_manifest' is not set in the recipe")
    if not cfg.stages:
        raise UserError("key 'stages' must list at least one stage")
    for i, stage in enumerate(cfg.stages):
        check_stage(cfg, i, stage)
    accum = check_loop(cfg, world_size)
    return Plan(accum_steps=accum, total_epochs=sum(s.epochs for s in cfg.stages))


def check_shapes(cfg: Recipe) -> None:
    """The model's input sizes must be the data's, and the model buildable."""
    m, fb, video = cfg.model, cfg.data.audio.fbank, cfg.data.video
    for key, got, want_key, want in (
        ("model.audio_frames", m.audio_frames, "data.audio.fbank.target_frames", fb.target_frames),
        ("model.mel_bins", m.mel_bins, "data.audio.fbank.num_mel_bins", fb.num_mel_bins),
        ("model.image_size", m.image_size, "data.video.crop_size", video.crop_size),
    ):
        if got != want:
            raise UserError(f"key '{key}' ({got}) must equal '{want_key}' ({want})")
    check_config(m)


def check_loop(cfg: Recipe, world_size: int = 1) -> int:
    """The ``optim``/``train``/loader settings every training loop shares; returns the accumulation steps."""
    loader = cfg.data.loader
    if len(cfg.optim.betas) != 2:
        raise UserError(f"key 'optim.betas' expects two numbers, got {len(cfg.optim.betas)}")
    positive = [
        ("data.loader.batch_size", loader.batch_size),
        ("optim.effective_batch", cfg.optim.effective_batch),
        ("train.log_every", cfg.train.log_every),
        ("train.save_every_epochs", cfg.train.save_every_epochs),
        ("train.max_steps_per_epoch", cfg.train.max_steps_per_epoch),
    ]
    for key, value in positive:
        if value is not None and value < 1:
            raise UserError(f"key '{key}' must be >= 1, got {value}")
    if loader.num_workers < 0:
        raise UserError(f"key 'data.loader.num_workers' must be >= 0, got {loader.num_workers}")
    # data.loader.batch_size is the micro-batch of all processes together (train/distributed.py):
    # the accumulation, like the rest of the recipe, does not depend on the world size.
    if cfg.optim.effective_batch % loader.batch_size:
        raise UserError(
            f"key 'optim.effective_batch' ({cfg.optim.effective_batch}) must be a multiple of "
            f"'data.loader.batch_size' ({loader.batch_size})"
        )
    if loader.batch_size < world_size:
        raise UserError(
            f"key 'data.loader.batch_size' ({loader.batch_size}) is the batch of all {world_size} processes "
            "together and must give each at least one clip"
        )
    if cfg.optim.lr < 0 or cfg.optim.min_lr < 0 or cfg.optim.warmup_epochs < 0:
        raise UserError("keys 'optim.lr', 'optim.min_lr' and 'optim.warmup_epochs' must be >= 0")
    return cfg.optim.effective_batch // loader.batch_size


def check_finetune(cfg: Recipe, world_size: int = 1) -> Plan:
    """Refuse a recipe that cannot fine-tune, naming the key; ``total_epochs`` is ``finetune.epochs``."""
    for section in FINETUNE_SECTIONS:
        if getattr(cfg, section) is None:
            raise UserError(f"fine-tuning needs the recipe section '{section}'")
    check_shapes(cfg)
    for key in ("train_manifest", "label_csv"):
        if getattr(cfg.data, key) is None:
            raise UserError(f"key 'data.{key}' is not set in the recipe")
    ft, m, fb = cfg.finetune, cfg.model, cfg.data.audio.fbank
    rules = [
        (ft.epochs >= 1, "finetune.epochs", "must be >= 1"),
        (ft.eval_every_epochs >= 1, "finetune.eval_every_epochs", "must be >= 1"),
        (ft.head_lr_multiplier > 0, "finetune.head_lr_multiplier", "must be > 0"),
        (0 <= ft.mixup <= 1, "finetune.mixup", "is a probability, in [0, 1]"),
        (ft.mixup_alpha > 0, "finetune.mixup_alpha", "must be > 0"),
        (0 <= ft.label_smoothing < 1, "finetune.label_smoothing", "must lie in [0, 1)"),
        (0 <= ft.freq_mask <= m.mel_bins, "finetune.freq_mask", f"must lie in [0, model.mel_bins = {m.mel_bins}]"),
        (0 <= ft.time_mask <= fb.target_frames, "finetune.time_mask",
         f"must lie in [0, data.audio.fbank.target_frames = {fb.target_frames}]"),
        (ft.layer_decay is None or 0 < ft.layer_decay <= 1, "finetune.layer_decay", "must lie in (0, 1] or be null"),
        (ft.average_from_epoch is None or 1 <= ft.average_from_epoch <= ft.epochs, "finetune.average_from_epoch",
         f"must lie in [1, finetune.epochs = {ft.epochs}] or be null"),
    ]  # fmt: skip
    for ok, key, rule in rules:
        if not ok:
            raise UserError(f"key '{key}' {rule}, got {getattr(ft, key.split('.')[1])}")
    if ft.lr_schedule == "step":
        for key in ("step_start_epoch", "step_every_epochs", "step_decay"):
            if getattr(ft, key) is None:
                raise UserError(f"key 'finetune.lr_schedule' is 'step', which needs 'finetune.{key}'")
        if ft.step_start_epoch < 0 or ft.step_every_epochs < 1 or not 0 < ft.step_decay <= 1:
            raise UserError(
                "keys 'finetune.step_start_epoch' (>= 0), 'finetune.step_every_epochs' (>= 1) and "
                "'finetune.step_decay' (in (0, 1]) are out of range"
            )
    accum = check_loop(cfg, world_size)
    return Plan(accum_steps=accum, total_epochs=ft.epochs)


def check_stage(cfg: Recipe, i: int, stage: StageConfig) -> None:
    key = f"stages.{i}"
    if stage.epochs < 1:
        raise UserError(f"key '{key}.epochs' must be >= 1, got {stage.epochs}")
    if not stage.trainable:
        raise UserError(f"key '{key}.trainable' must name at least one model part")
    w = stage.loss
    if cfg.prototypes is None and (w.w_pje != 0 or w.w_pcpe != 0):
        raise UserError(
            f"key 'prototypes' is null, but stage '{stage.name}' ({key}.loss) has w_pje = {w.w_pje} "
            f"and w_pcpe = {w.w_pcpe}; the prototype losses need a 'prototypes' section"
        )
    if not cfg.model.projection_heads and w.w_pcpe != 0 and cfg.model.decoder_dim != cfg.model.embed_dim:
        raise UserError(
            f"key '{key}.loss': w_pcpe = {w.w_pcpe} needs the decoder's projection heads, but "
            "'model.projection_heads' is false (set it to true or w_pcpe to 0)"
        )
    if w.w_infonce == 0 and w.w_r == 0:
        if w.w_pje == 0 and w.w_pcpe == 0:
            raise UserError(f"key '{key}.loss': every loss weight of stage '{stage.name}' is 0")
        first = sum(s.epochs for s in cfg.stages[:i])
        if cfg.prototypes is not None and first < cfg.prototypes.warmup_epochs:
            raise UserError(
                f"key '{key}.loss': stage '{stage.name}' starts during 'prototypes.warmup_epochs' "
                f"({cfg.prototypes.warmup_epochs}) but has only prototype losses (w_infonce = w_r = 0)"
            )


def check_clusters(cfg: Recipe, n_clips: int) -> None:
    """k-means cannot make more clusters than there are training clips."""
    protos = cfg.prototypes
    if protos is None or protos.method != "kmeans":
        return
    largest = max(protos.num_clusters or [0])
    if largest > n_clips:
        raise UserError(
            f"key 'prototypes.num_clusters' asks for {largest} clusters but 'data.train_manifest' "
            f"has {n_clips} clips"
        )


def check_any(cfg: Recipe, world_size: int = 1) -> list[str]:
    """The start-up checks of each command ``cfg`` is written for; returns what it is for.

    A recipe with ``stages`` is for pre-training, one with ``finetune`` for fine-tuning; a
    ``model`` alone must still fit the data; a recipe of ``data`` alone has only its schema.
    """
    uses = []
    if cfg.stages is not None:
        check_recipe(cfg, world_size)
        uses.append("pre-training")
    if cfg.finetune is not None:
        check_finetune(cfg, world_size)
        uses.append("fine-tuning")
    if not uses and cfg.model is not None:
        check_shapes(cfg)
    return uses


def check_inputs(cfg: Recipe) -> None:
    """The files ``cfg`` names, checked as training opens them: manifests (and the clusters
    k-means can make from the training one) and the label CSV."""
    from pcavmae_cli.engine.data.manifest import read_label_csv, read_manifest

    if cfg.data.train_manifest is not None:
        n_clips = len(read_manifest(cfg.data.train_manifest))
        if cfg.stages is not None:
            check_clusters(cfg, n_clips)
    if cfg.data.eval_manifest is not None:
        read_manifest(cfg.data.eval_manifest)
    if cfg.data.label_csv is not None and cfg.finetune is not None:
        read_label_csv(cfg.data.label_csv)


def stage_of(cfg: Recipe, epoch: int) -> tuple[int, StageConfig]:
    """The stage (index and settings) that global epoch ``epoch`` (0-based) belongs to."""
    first = 0
    for i, stage in enumerate(cfg.stages or []):
        if epoch < first + stage.epochs:
            return i, stage
        first += stage.epochs
    raise IndexError(f"epoch {epoch} is past the last stage")


def is_stage_end(cfg: Recipe, epoch: int) -> bool:
    """Whether ``epoch`` is the last epoch of its stage."""
    i, _ = stage_of(cfg, epoch)
    return epoch + 1 == sum(s.epochs for s in (cfg.stages or [])[: i + 1])
