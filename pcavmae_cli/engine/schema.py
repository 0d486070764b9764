"""The recipe schema: every key a recipe may hold, with its type.

This is the single list of settings. Fields carry no numeric defaults: the numbers live in
``recipes/*.yaml`` and nowhere else. A field typed ``X | None`` may be left out (it is then
``None``); every other field must be present, and ``config.build`` refuses unknown keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class FbankConfig:
    """Kaldi-compatible log-Mel filterbank (METHOD_NOTES, Inputs) and its normalisation."""

    num_mel_bins: int
    target_frames: int  # padded with zeros or cut to this many 10 ms frames
    frame_length_ms: float
    frame_shift_ms: float
    window_type: Literal["hanning", "hamming", "povey", "rectangular", "blackman"]
    dither: float
    use_energy: bool
    htk_compat: bool
    subtract_waveform_mean: bool  # remove the clip's mean sample value first, as CAV-MAE does
    mean: float  # corpus mean of the log-Mel values (`pcav stats` computes it)
    std: float  # corpus standard deviation of the log-Mel values
    std_scale: float  # normalised = (x - mean) / (std * std_scale); CAV-MAE uses 1, AST 2


@dataclass
class AudioConfig:
    sample_rate: int  # preprocessing writes mono WAV at this rate; fbank reads it
    fbank: FbankConfig


@dataclass
class VideoConfig:
    fps: float  # frames sampled per second of the clip
    n_frames: int  # frames kept per clip
    short_side: int  # preprocessing resizes the shorter side to this many pixels
    crop_size: int  # the loader centre-crops a square of this side
    jpeg_quality: int  # ffmpeg -q:v, 2 (best) to 31
    mean: list[float]  # per-channel RGB mean in [0, 1] (ImageNet)
    std: list[float]


@dataclass
class PreprocessConfig:
    min_seconds: float  # clips shorter than this are failures; longer short clips are padded
    jobs: int  # parallel ffmpeg processes; 0 means one per CPU core
    # A clip with ffmpeg decode errors, or whose decoded audio or frames disagree with its streams'
    # length (a corrupt middle): "fail" lists it in failures.jsonl; "flag" keeps it with the
    # problem in its manifest record's decode_issue. Defaulted, so run folders written before the
    # key existed still load.
    on_decode_error: Literal["fail", "flag"] = "fail"


@dataclass
class LoaderConfig:
    batch_size: int  # clips per (micro-)batch of all processes together; each rank takes its slice
    num_workers: int
    train_frame: Literal["random", "middle"]  # which frame a training sample shows
    eval_frames: Literal["all", "middle"]  # evaluation: all frames (averaged) or the middle one
    prefetch_factor: int  # batches each worker loads ahead (only with num_workers > 0)


@dataclass
class PackConfig:
    """The packed layout (``pcav preprocess --pack``, ``pcav pack``; engine/data/pack.py)."""

    clips_per_shard: int  # clips per shard file set; clip i lives in shard i // clips_per_shard


@dataclass
class DataConfig:
    clip_seconds: float
    label_mode: Literal["multi_hot", "single"]  # AudioSet: multi-hot + BCE; VGGSound: class index
    audio: AudioConfig
    video: VideoConfig
    preprocess: PreprocessConfig
    loader: LoaderConfig
    pack: PackConfig
    train_manifest: str | None = None
    eval_manifest: str | None = None
    label_csv: str | None = None  # AudioSet-style index,mid,display_name


@dataclass
class ModelConfig:
    """PCAV-MAE sizes (METHOD_NOTES, Backbone). One code path from a test-sized model to ViT-B."""

    embed_dim: int  # encoder width (768 in the paper); a multiple of 4 (2-D sin-cos positions)
    depth_modality: int  # blocks of each modality-specific encoder (11)
    depth_joint: int  # shared joint blocks after them (1)
    num_heads: int  # encoder attention heads (12)
    mlp_ratio: float  # encoder MLP width / embed_dim (4)
    decoder_dim: int  # joint decoder width (384); a multiple of 4
    decoder_depth: int  # (4)
    decoder_heads: int  # (6)
    decoder_mlp_dim: int  # (1536)
    patch_size: int  # square patches of both modalities (16)
    audio_frames: int  # fbank time frames the model takes; must equal data.audio.fbank.target_frames
    mel_bins: int  # must equal data.audio.fbank.num_mel_bins
    image_size: int  # must equal data.video.crop_size
    mask_ratio_audio: float  # fraction of audio tokens masked in pre-training (0.5)
    mask_ratio_video: float  # (0.75)
    proj_dim: int  # width of the shared contrastive space of z_a, z_v, zd_a, zd_v
    momentum: float  # EMA coefficient of the momentum encoder (e.g. 0.999)
    norm_pix_loss: bool  # reconstruction targets normalised per patch (MAE)
    # "per_modality": CAV-MAE's joint layer, one LayerNorm pair per stream (audio+video, audio,
    # video) around shared attention/MLP weights; "shared": one pair for every stream.
    joint_norms: Literal["per_modality", "shared"]
    layer_norm_eps: float  # CAV-MAE uses torch's 1e-5, MAE 1e-6
    proj_hidden_dim: int | None = None  # None: projection heads are one Linear; else Linear-GELU-Linear
    # false: no projection heads at all (CAV-MAE): z_a, z_v are the normalised mean-pooled joint
    # outputs themselves (proj_dim must equal embed_dim) and the decoder's pooled tokens are not
    # projected either (zd_a, zd_v are decoder_dim wide, so the PCPE loss is unavailable).
    projection_heads: bool = True
    # "fixed": sin-cos positions, a buffer outside checkpoints; "learned": a parameter that starts
    # as the sin-cos table and trains (CAV-MAE's fine-tuning model, tr_pos=True).
    pos_embed: Literal["fixed", "learned"] = "fixed"
    # The decoder's positions, likewise: "learned" holds CAV-MAE pre-training checkpoints made
    # with tr_pos=True, whose decoder tables trained away from sin-cos.
    decoder_pos_embed: Literal["fixed", "learned"] = "fixed"


@dataclass
class PrototypeConfig:
    """The E-step (METHOD_NOTES, Prototypes): clusters of the joint clip embedding, and eq. 2.

    ``kmeans`` needs ``num_clusters``; ``density_peaks`` needs ``granularities``,
    ``max_points_exact`` and ``overcluster_k``. One set of prototypes per list item.
    """

    method: Literal["kmeans", "density_peaks"]
    kmeans_iters: int  # Lloyd iterations (k-means, and the density-peaks over-clustering) (20)
    beta: float  # eq. 2 smoothing, PCL's alpha (10)
    tau: float  # gammas are rescaled to this mean (0.1)
    gamma_percentiles: list[float]  # [low, high]: gammas clamped to these percentiles (10, 90)
    warmup_epochs: int  # instance-InfoNCE-only epochs before the first E-step
    seed: int  # clustering seed; each epoch and granularity derives its own from it
    num_clusters: list[int] | None = None  # kmeans: K_1..K_M
    granularities: list[float] | None = None  # density_peaks: sigma = mean pair distance / g
    max_points_exact: int | None = None  # density_peaks: exact O(N^2) up to this many samples
    overcluster_k: int | None = None  # density_peaks above that: micro-clusters of k-means
    # k-means' similarity matrix: fp32, bf16 (re-checked in fp32 where bf16 cannot decide: the
    # same assignment), auto (bf16 on GPUs and where a bf16 product runs >= 1.5x fp32, bf16_speed.py)
    assign_precision: Literal["auto", "fp32", "bf16"] = "auto"
    # what the clusters are found on: joint = normalise(z_a + z_v) (METHOD_NOTES); balanced =
    # each modality centred and scaled to equal variance first (prototypes/step.py)
    cluster_on: Literal["joint", "balanced"] = "joint"

    def __post_init__(self) -> None:
        from pcavmae_cli.engine.errors import UserError

        if self.method == "kmeans" and not self.num_clusters:
            raise UserError("prototypes: method 'kmeans' needs a non-empty 'num_clusters' list")
        if self.method == "density_peaks":
            for key in ("granularities", "max_points_exact", "overcluster_k"):
                if not getattr(self, key):
                    raise UserError(f"prototypes: method 'density_peaks' needs '{key}'")
            if any(g <= 0 for g in self.granularities or []):
                raise UserError("prototypes: every granularity must be > 0")
        bounds = self.gamma_percentiles
        if len(bounds) != 2 or not 0 <= bounds[0] <= bounds[1] <= 100:
            raise UserError("prototypes: 'gamma_percentiles' must be [low, high], 0 <= low <= high <= 100")
        if any(k <= 0 for k in self.num_clusters or []):
            raise UserError("prototypes: every entry of 'num_clusters' must be > 0")


@dataclass
class LossConfig:
    """Loss weights and settings of the M-step (METHOD_NOTES, Losses); see engine/losses.py.

    The reconstruction target normalisation (norm_pix_loss) is ``model.norm_pix_loss``.
    """

    w_pje: float  # eq. 1 (1)
    w_pcpe: float  # eq. 3 (1; 0 in the encoder-only stage)
    w_r: float  # eq. 4 (1; 0 in the encoder-only stage)
    w_infonce: float  # CAV-MAE's instance cross-modal InfoNCE (1)
    infonce_temperature: float  # (0.1, METHOD_NOTES' tau)
    num_negatives: int | None = None  # r, PCL's sampled negative prototypes; null or 0: all


# The parts of the model a stage can train (``PCAVMAE.parts``); the others are frozen.
Part = Literal["encoder_a", "encoder_v", "joint", "proj", "decoder", "dproj"]


@dataclass
class StageConfig:
    """One stage of pre-training (sec. 3.2: "400 epochs for the PJE and 200 for the decoder").

    Stages run in order; each names its epochs, its loss weights and the parts it trains.
    """

    name: str
    epochs: int
    trainable: list[Part]
    loss: LossConfig


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, stepped per optimiser step."""

    lr: float  # peak learning rate (2e-4 in the paper)
    betas: list[float]  # AdamW betas (0.9, 0.95)
    weight_decay: float  # decoupled weight decay on weights (not on norms, biases, embeddings)
    effective_batch: int  # samples per optimiser step; reached by gradient accumulation (512)
    warmup_epochs: float  # linear warm-up from 0 to lr
    min_lr: float  # the cosine ends here
    grad_clip: float | None = None  # max global gradient norm; null: no clipping


@dataclass
class TrainConfig:
    """Where a run lives and how it runs."""

    run_dir: str  # runs/<name>: config.yaml, metrics.jsonl, checkpoints/, prototypes/, plots/
    device: Literal["auto", "cpu", "cuda"]  # auto: cuda when available
    # auto: bf16 autocast on GPUs with bf16, and on CPUs whose bf16 products of the model's width
    # run >= 1.5x as fast as fp32 ones (bf16_speed.py, measured when the run starts); else fp32
    precision: Literal["auto", "bf16", "fp32"]
    log_every: int  # optimiser steps between metrics lines
    save_every_epochs: int  # checkpoint period; `last` is always written at the end of a stage
    resume: bool  # continue from checkpoints/last in run_dir
    max_steps_per_epoch: int | None = None  # cap for smoke runs; null: the whole manifest
    compile: bool = False  # torch.compile the pre-training step; eager with a warning where it fails
    activation_checkpointing: bool = False  # recompute block activations in backward (large batches)
    tensorboard: bool = True  # event files in run_dir/tensorboard/ mirroring metrics.jsonl (tensorboard_log.py)
    threads: int | None = None  # CPU compute threads; null: OMP_NUM_THREADS, else the CPUs the process may use (threads.py)
    replicas: int | None = None  # training on a CPU: threads each running a slice of a micro-batch (replicas.py); null: 2 with 2 compute threads, else 1
    wandb: bool = False  # also log to Weights & Biases (wandb_log.py; the 'wandb' extra; WANDB_MODE=offline works offline)


@dataclass
class PrototypeHeadConfig:
    """The prototype head (``finetune.head: prototype``; docs/method.md, "Prototype head")."""

    trainable_prototypes: bool  # false: the pre-training prototypes stay fixed (buffers); true: they train
    temperature: float  # similarities cos(e, p_k) / temperature feed the head's Linear layer


@dataclass
class HealthConfig:
    """Representation health of the clip embeddings, logged per epoch in pre-training
    (``engine/evaluate/health.py``; docs/method.md, "Representation health").

    Measured on the momentum encoder's embeddings of the training set at the start of an epoch:
    free where the E-step embeds it anyway; other epochs (warm-up, runs without prototypes) embed
    ``max_rows`` evenly spaced clips of it when ``every_epochs`` says so.
    """

    every_epochs: int = 1  # epochs without an E-step: measure on every n-th (epoch % n == 0); 0: only with an E-step
    max_rows: int = 4096  # those epochs embed this many clips, evenly spaced; the effective rank uses at most this many
    collapse_cosine: float = 0.9  # a modality is collapsed when its mean pairwise cosine reaches this ...
    collapse_rank: float = 1.5  # ... or its effective rank falls below this

    def __post_init__(self) -> None:
        from pcavmae_cli.engine.errors import UserError

        if self.every_epochs < 0:
            raise UserError("health: 'every_epochs' must be >= 0")
        if self.max_rows < 2:
            raise UserError("health: 'max_rows' must be >= 2")
        if not -1.0 <= self.collapse_cosine <= 1.0:
            raise UserError("health: 'collapse_cosine' must be in [-1, 1]")
        if self.collapse_rank < 0:
            raise UserError("health: 'collapse_rank' must be >= 0")


@dataclass
class PretrainAugmentConfig:
    """Augmentations of the audio in pre-training (``train/augment.py``; docs/method.md, "When
    one modality learns nothing").

    The picture already changes between epochs (``data.loader.train_frame: random``), the fbank
    does not: without these, the audio side can solve the cross-modal objectives by recognising
    each training recording, which does not carry over to new ones. All are off by default, as
    in the paper's pre-training. Applied to the normalised fbank the model sees, which is also
    the reconstruction target.
    """

    audio_roll: int = 0  # roll each clip in time by U{-n, .., n} frames (circularly); 0: none
    freq_mask: int = 0  # SpecAugment: one frequency mask of width < this many bins per clip; 0: none
    time_mask: int = 0  # one time mask of width < this many frames per clip; 0: none

    def __post_init__(self) -> None:
        from pcavmae_cli.engine.errors import UserError

        for key in ("audio_roll", "freq_mask", "time_mask"):
            if getattr(self, key) < 0:
                raise UserError(f"augment: '{key}' must be >= 0")

    @property
    def active(self) -> bool:
        return bool(self.audio_roll or self.freq_mask or self.time_mask)


@dataclass
class FinetuneConfig:
    """Classification fine-tuning (METHOD_NOTES, Downstream; docs/method.md ("Downstream")).

    A head (LayerNorm + Linear) on the mean-pooled joint-layer output of the pre-trained
    encoders; the loss follows ``data.label_mode`` (``multi_hot``: BCE, ``single``: CE) and the
    optimiser, warm-up and run folder come from the ``optim`` and ``train`` sections.
    """

    # "av": the joint layer on audio+video; "a" / "v": one modality through the joint layer with
    # its own norms; "sum": the pooled av, a and v stream outputs added (the paper: "perform similarly").
    mode: Literal["a", "v", "av", "sum"]
    epochs: int
    head_lr_multiplier: float  # the head's lr is optim.lr x this (CAV-MAE's head_lr)
    lr_schedule: Literal["cosine", "step"]  # cosine to optim.min_lr, or CAV-MAE's step decay per epoch
    mixup: float  # probability that a training clip is mixed with another clip of its batch
    mixup_alpha: float  # the mixing weight lambda ~ Beta(alpha, alpha) (CAV-MAE: 10)
    label_smoothing: float  # targets y (1 - eps) + eps / C
    freq_mask: int  # SpecAugment: one frequency mask of width < this many bins per clip; 0: none
    time_mask: int  # one time mask of width < this many frames per clip; 0: none
    audio_noise: bool  # CAV-MAE's fbank noise: + U(0, 1) x U(0, 0.1), rolled by up to 10 frames
    balanced_sampling: bool  # draw clips with weights sum_c y_c / count_c, with replacement
    eval_every_epochs: int  # validate on data.eval_manifest every this many epochs (and after the last)
    init_from: str | None = None  # pre-training run folder or checkpoint folder; null: random init
    layer_decay: float | None = None  # layer-wise lr decay (lr x decay^(depth - layer)); null: plain
    step_start_epoch: int | None = None  # step: epochs before the first decay (CAV-MAE lrscheduler_start)
    step_every_epochs: int | None = None  # step: epochs between decays (lrscheduler_step)
    step_decay: float | None = None  # step: factor per decay (lrscheduler_decay)
    average_from_epoch: int | None = None  # average the weights of epochs N..last (1-based; CAV-MAE wa)
    # "linear" (null too): LayerNorm + Linear on the pooled joint output; "prototype": a Linear layer on
    # the clip's similarities to the pre-training prototypes of finetune.init_from (prototype_head).
    head: Literal["linear", "prototype"] | None = None
    prototype_head: PrototypeHeadConfig | None = None


@dataclass
class EvaluateConfig:
    """Frozen-feature evaluation of a pre-training checkpoint (``pcav evaluate --task
    retrieval|linear-probe|knn``); see docs/method.md ("Evaluation", "Downstream")."""

    # Probe features: "joint" (pooled audio+video stream, what an av head reads), "audio" /
    # "video" (each modality's pooled stream, before projection), "audio+video" (both, concatenated).
    features: Literal["joint", "audio", "video", "audio+video"]
    frames: Literal["middle", "all"]  # frames per clip: the middle one (CAV-MAE's retrieval) or all, averaged
    retrieval_ks: list[int]  # R@k cut-offs (1, 5, 10)
    linear_weight_decay: float  # L2 on the probe's weights
    linear_max_iter: int  # L-BFGS iterations
    knn_k: int  # neighbours
    knn_weighting: Literal["uniform", "similarity"]
    knn_temperature: float  # exp(s / T) weights of "similarity"


VALIDATION_METRICS = ("knn_joint", "knn_audio", "knn_video", "a2v_r1", "a2v_r5", "v2a_r1", "v2a_r5", "loss")


@dataclass
class ValidationConfig:
    """Pre-training's validation: frozen-feature metrics of the model on ``data.eval_manifest``
    after every ``every_epochs``-th epoch and the last (``train/pretrain_validation.py``;
    docs/method.md, "Validation during pre-training"). ``metric`` picks ``checkpoints/best``.
    """

    every_epochs: int = 1  # validate after every n-th epoch (and after the last); 0: never
    # what picks checkpoints/best (highest wins): knn_joint / knn_audio / knn_video (leave-one-out
    # kNN on the eval clips: top-1, or mAP for multi-hot labels), a2v_r1, a2v_r5, v2a_r1, v2a_r5;
    # "loss": the lowest epoch-mean training loss within a stage, as without validation
    metric: str = "knn_joint"
    frames: Literal["middle", "all"] = "middle"  # frames per eval clip: the middle one, or all averaged
    # kNN neighbours come from this many training clips, evenly spaced (all when fewer); 0: from
    # the other eval clips (leave-one-out)
    gallery_clips: int = 4096
    # t-SNE and reconstruction figures of the model every n-th epoch (validated then too), into
    # RUN/plots/epochNNNN/ and TensorBoard's images (train/validation_figures.py); 0: never
    figures_every_epochs: int = 10

    def __post_init__(self) -> None:
        from pcavmae_cli.engine.errors import UserError

        if self.every_epochs < 0:
            raise UserError("validation: 'every_epochs' must be >= 0")
        if self.gallery_clips < 0:
            raise UserError("validation: 'gallery_clips' must be >= 0")
        if self.figures_every_epochs < 0:
            raise UserError("validation: 'figures_every_epochs' must be >= 0")
        if self.metric not in VALIDATION_METRICS:
            raise UserError(f"validation: 'metric' must be one of {', '.join(VALIDATION_METRICS)}, not {self.metric!r}")


@dataclass
class Recipe:
    """A whole recipe. ``extends: NAME`` in the YAML merges this recipe over another.

    Only ``data`` is needed by data commands; pre-training also needs ``model``, ``optim``,
    ``stages`` and ``train`` (and ``prototypes`` unless every stage has ``w_pje = w_pcpe = 0``);
    fine-tuning needs ``model``, ``optim``, ``train`` and ``finetune``; ``pcav evaluate`` reads
    ``evaluate`` (from ``base`` when a checkpoint's recipe has none).
    """

    description: str
    seed: int
    data: DataConfig
    model: ModelConfig | None = None
    prototypes: PrototypeConfig | None = None
    optim: OptimConfig | None = None
    stages: list[StageConfig] | None = None
    train: TrainConfig | None = None
    finetune: FinetuneConfig | None = None
    evaluate: EvaluateConfig | None = None
    health: HealthConfig | None = None  # pre-training's representation health; null: not measured
    validation: ValidationConfig | None = None  # pre-training's validation on data.eval_manifest; null: none
    augment: PretrainAugmentConfig | None = None  # pre-training's audio augmentations; null: none
