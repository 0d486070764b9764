"""A trained run on the user's own files, from Python: ``load(RUN)``, then ``embed`` / ``predict``.

    import pcavmae_cli
    model = pcavmae_cli.load("runs/finetune")          # a run folder, a checkpoint, a converted CAV-MAE
    model.predict("clip.mp4").top                      # [("Dog", 0.91), ("Bark", 0.62), ...]
    model.embed("clip.mp4")["joint"]                   # (width,) numpy
    model.scores(fbank, frames)                        # a batch of tensors -> (B, C) probabilities

The commands use the same object: ``pcav predict`` and ``pcav search`` are loops over it. A
video file goes through the preprocessing of ``pcav preprocess`` with the run's own data
settings (ffmpeg: 16 kHz mono audio, frames at ``data.video.fps``, shorter side
``data.video.short_side``), then through the dataset's reading code, so a clip gives the same
numbers from its file as from a manifest. A waveform and frames given as arrays skip ffmpeg:
the fbank is the same Kaldi computation; the frames are resized and centre-cropped by
torchvision, which can differ from ffmpeg's scaling in the last grey level.

**Scores** are CAV-MAE's evaluation: each frame is one forward pass (the clip's audio with that
frame), its logits go through the task's activation (softmax for ``single``, sigmoid for
``multi_hot``), and the probabilities are averaged over the frames (``frames="all"``, the
default) or taken from the middle frame (``frames="middle"``, K times cheaper in the video
encoder).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from pcavmae_cli.engine.data import fbank as fb
from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.data.manifest import LabelSet, read_label_csv
from pcavmae_cli.engine.data.model_inputs import model_inputs
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.evaluate.predict import FEATURES, activation, backbone_features
from pcavmae_cli.engine.evaluate.runner import Checkpoint, checkpoint_recipe, open_checkpoint
from pcavmae_cli.engine.model import Backbone, Classifier
from pcavmae_cli.engine.model.embed import audio_image
from pcavmae_cli.engine.schema import Recipe
from pcavmae_cli.engine.train.runtime import Runtime, resolve_runtime

FramePolicy = Literal["all", "middle"]


@dataclass
class ClipInputs:
    """One clip as the model reads it, before normalisation: what a dataset's compact sample holds."""

    fbank: torch.Tensor  # (T, F), not normalised
    frames: torch.Tensor  # (K, 3, S, S) uint8


def _frames_batch(frames: torch.Tensor) -> torch.Tensor:
    """``(K, 3, S, S)`` -> ``(1, K, 3, S, S)``; ``(B, K, 3, S, S)`` unchanged."""
    return frames.unsqueeze(0) if frames.dim() == 4 else frames


class Model:
    """A run loaded for inference. Build it with ``load``.

    Attributes:
        kind: ``"finetune"`` (has a classifier: ``predict`` / ``scores``) or ``"pretrain"``
            (``embed`` only).
        cfg: the run's recipe, paths rebased to where the run is (``run_folder.py``).
        label_set: the classes (``None`` for a pre-training run without a label CSV).
    """

    def __init__(self, checkpoint: Checkpoint, cfg: Recipe, rt: Runtime, label_set: LabelSet | None):
        self.checkpoint, self.cfg, self.rt, self.label_set = checkpoint, cfg, rt, label_set
        self.kind = checkpoint.kind
        self._backbone: Backbone | None = None
        self._classifier: Classifier | None = None

    def __repr__(self) -> str:
        classes = f", {len(self.label_set.mids)} classes" if self.label_set else ""
        return f"Model({self.checkpoint.folder}, {self.kind}{classes}, {self.device}, {self.precision})"

    @property
    def device(self) -> torch.device:
        return self.rt.device

    @property
    def precision(self) -> str:
        """``bf16`` or ``fp32``: what the forward pass computes in (``train.precision``; ``auto``
        follows the machine, ``runtime.resolve_precision``)."""
        return self.rt.precision

    @property
    def labels(self) -> list[str]:
        """Display names of the classes, in logit order (empty without a label CSV)."""
        if self.label_set is None:
            return []
        return [name or mid for mid, name in zip(self.label_set.mids, self.label_set.names or self.label_set.mids)]

    # ------------------------------------------------------------------ weights, loaded on first use

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            from pcavmae_cli.engine.embed import feature_backbone

            self._backbone = feature_backbone(self.checkpoint, self.cfg).to(self.device).eval()
        return self._backbone

    @property
    def classifier(self) -> Classifier:
        if self.kind != "finetune":
            raise UserError(f"{self.checkpoint.folder} is a pre-training checkpoint: it embeds but does not classify; "
                            "give a fine-tuned run")  # fmt: skip
        if self._classifier is None:
            from pcavmae_cli.engine.model.classifier import load_classifier_checkpoint

            if self.label_set is None:
                named = self.cfg.data.label_csv
                what = f"its label CSV {named} (data.label_csv) is not found" if named else "the run names no label CSV"
                raise UserError(f"{self.checkpoint.folder}: {what}; pass labels=CSV (--labels)")
            self._classifier = load_classifier_checkpoint(
                self.checkpoint.folder / "model.safetensors", self.cfg.model, len(self.label_set.mids),
                self.cfg.finetune, self.device,
            ).eval()  # fmt: skip
        return self._classifier

    # ------------------------------------------------------------------ inputs

    def read_video(self, path: str | Path, *, start: float | None = None, frames: FramePolicy = "all") -> ClipInputs:
        """A media file (the ``data.clip_seconds`` from ``start``, default its beginning) as model inputs."""
        from pcavmae_cli.engine.data.preprocess import preprocess_file

        path = Path(path)
        if not path.is_file():
            raise UserError(f"not found: {path}")
        with tempfile.TemporaryDirectory(prefix="pcav-clip-") as tmp:
            end = None if start is None else start + self.cfg.data.clip_seconds
            manifest = preprocess_file(path, Path(tmp), self.cfg.data, start=start, end=end)
            sample = AudioVisualDataset(manifest, self.cfg.data, frames=frames, compact=True)[0]
        frames_k = sample["frames"]  # (3, S, S) for one frame, (K, 3, S, S) for all
        return ClipInputs(sample["fbank"], frames_k.unsqueeze(0) if frames_k.dim() == 3 else frames_k)

    def read_audio(self, path: str | Path) -> torch.Tensor:
        """A sound file (any format ffmpeg reads; its first ``data.clip_seconds``) as the fbank
        ``(T, F)`` the audio encoder reads, not normalised: 16 kHz mono, as preprocessing makes it."""
        import subprocess

        from pcavmae_cli.engine.data.audio_io import read_wav
        from pcavmae_cli.engine.media import ffmpeg_exe

        path = Path(path)
        if not path.is_file():
            raise UserError(f"not found: {path}")
        rate = self.cfg.data.audio.sample_rate
        with tempfile.TemporaryDirectory(prefix="pcav-audio-") as tmp:
            wav = Path(tmp) / "audio.wav"
            cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-vn", "-t", f"{self.cfg.data.clip_seconds}",
                   "-ac", "1", "-ar", str(rate), "-c:a", "pcm_s16le", "-f", "wav", str(wav)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0 or not wav.is_file() or wav.stat().st_size <= 44:
                line = (done.stderr.strip().splitlines() or ["no audio stream"])[-1]
                raise UserError(f"{path}: no sound could be read ({line})")
            waveform = read_wav(wav, rate)
        return fb.fit_length(fb.log_mel(waveform, rate, self.cfg.data.audio.fbank), self.cfg.data.audio.fbank.target_frames)

    @torch.no_grad()
    def audio_features(self, fbank: torch.Tensor) -> dict[str, torch.Tensor]:
        """The audio-only features of a batch of fbanks ``(B, T, F)`` (not normalised): ``audio``
        (the joint layer's audio stream, mean-pooled) and ``z_a``, as ``features`` computes them,
        without any frame: what searching videos by a sound needs."""
        bb = self.backbone
        fbank = fbank if fbank.dim() == 3 else fbank.unsqueeze(0)
        x = fb.normalise(fbank.to(self.device), self.cfg.data.audio.fbank)
        with self.rt.autocast():
            pooled = bb.joint(bb.encoder_a(bb.encoder_a.embed(audio_image(x))), "a").mean(dim=1)
            z_a = torch.nn.functional.normalize(bb.proj_a(pooled), dim=-1)
        return {"audio": pooled.float().cpu(), "z_a": z_a.float().cpu()}

    def from_arrays(self, waveform: np.ndarray | torch.Tensor, sample_rate: int, frames: np.ndarray | torch.Tensor) -> ClipInputs:
        """A mono (or ``(channels, samples)``) waveform and frames ``(K, H, W, 3)`` or ``(K, 3, H, W)``
        uint8 as model inputs: the recipe's fbank, frames resized and centre-cropped."""
        wav = torch.as_tensor(np.asarray(waveform, dtype=np.float32))
        wav = wav.mean(dim=0, keepdim=True) if wav.dim() == 2 else wav.reshape(1, -1)
        want = self.cfg.data.audio.sample_rate
        if sample_rate != want:
            import torchaudio.functional as AF

            wav = AF.resample(wav, sample_rate, want)
        fbank = fb.fit_length(fb.log_mel(wav, want, self.cfg.data.audio.fbank), self.cfg.data.audio.fbank.target_frames)
        images = torch.as_tensor(np.asarray(frames))
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise UserError(f"frames: expected uint8 (K, H, W, 3) or (K, 3, H, W), got {tuple(images.shape)} {images.dtype}")
        if images.shape[1] != 3 and images.shape[-1] == 3:
            images = images.permute(0, 3, 1, 2)
        video = self.cfg.data.video
        images = TF.resize(images, video.short_side, antialias=True)
        images = TF.center_crop(images, [video.crop_size, video.crop_size]).contiguous()
        return ClipInputs(fbank, images)

    def _inputs(self, video, frames: FramePolicy) -> ClipInputs:
        if isinstance(video, ClipInputs):
            return video
        if isinstance(video, (str, Path)):
            return self.read_video(video, frames=frames)
        raise UserError(f"expected a media file path or ClipInputs, got {type(video).__name__}")

    def _normalised(self, fbank: torch.Tensor, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = {"fbank": fbank if fbank.dim() == 3 else fbank.unsqueeze(0), "frames": _frames_batch(frames)}
        return model_inputs(batch, self.cfg.data, self.device)

    # ------------------------------------------------------------------ outputs

    @torch.no_grad()
    def frame_logits(self, fbank: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Logits of every frame of a batch (inputs as ``scores``): ``(B, K, C)`` float32 on the CPU."""
        inputs = self._normalised(fbank, frames)
        with self.rt.autocast():
            return self.classifier.frame_logits(inputs["fbank"], inputs["frames"]).float().cpu()

    def scores(self, fbank: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Class probabilities of a batch: fbank ``(B, T, F)`` and frames ``(B, K, 3, S, S)`` uint8,
        not normalised (a loader's compact batch) -> ``(B, C)`` float32 on the CPU, averaged over K."""
        return self.probabilities(self.frame_logits(fbank, frames))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Frame logits ``(B, K, C)`` -> the task's probabilities averaged over K, ``(B, C)``."""
        return activation(logits, self.cfg.data.label_mode).mean(dim=1)

    @torch.no_grad()
    def features(self, fbank: torch.Tensor, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """``FEATURES`` of a batch (inputs as ``scores``): ``{name: (B, width)}`` float32 on the CPU."""
        inputs = self._normalised(fbank, frames)
        with self.rt.autocast():
            feats = backbone_features(self.backbone, inputs["fbank"], inputs["frames"])
        return {name: value.float().cpu() for name, value in feats.items()}

    def embed(self, video: str | Path | ClipInputs, *, frames: FramePolicy = "all") -> dict[str, np.ndarray]:
        """One clip's embeddings: ``{"audio", "video", "joint", "z_a", "z_v": (width,) float32}``."""
        clip = self._inputs(video, frames)
        feats = self.features(clip.fbank, clip.frames)
        return {name: feats[name][0].numpy() for name in FEATURES}

    def predict(self, video: str | Path | ClipInputs, *, top_k: int = 5, frames: FramePolicy = "all") -> Prediction:
        """The classes of one clip (its first ``data.clip_seconds``; ``pcav predict`` windows long videos)."""
        clip = self._inputs(video, frames)
        return self.prediction(self.scores(clip.fbank, clip.frames)[0], top_k)

    def prediction(self, scores: torch.Tensor, top_k: int = 5) -> Prediction:
        """``(C,)`` probabilities -> the top ``top_k`` classes with their names."""
        if top_k < 1:
            raise UserError(f"top_k must be >= 1, got {top_k}")
        values, order = torch.sort(scores.float(), descending=True)
        names, mids = self.labels, self.label_set.mids if self.label_set else []
        top = [TopClass(mids[i], names[i], float(v)) for v, i in zip(values[:top_k].tolist(), order[:top_k].tolist())]
        return Prediction(top, scores.float().numpy())


@dataclass
class TopClass:
    mid: str  # the label id (AudioSet: /m/0jbk)
    name: str  # its display name
    score: float  # probability (softmax for single-label tasks, sigmoid for multi-label)

    def __iter__(self):  # ``name, score = top`` reads naturally
        return iter((self.name, self.score))


@dataclass
class Prediction:
    top: list[TopClass]  # best first
    scores: np.ndarray  # (C,) every class's probability, in label order


def load(
    path: str | Path,
    *,
    device: str = "auto",
    labels: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> Model:
    """A run folder, a checkpoint folder or a converted CAV-MAE checkpoint, ready for inference.

    Args:
        device: ``auto`` (the GPU if there is one), ``cpu`` or ``cuda``.
        labels: a label CSV (``index,mid,display_name``) instead of the run's (an imported
            CAV-MAE model has none of its own).
        overrides: ``key=value`` settings on top of the run's recipe (``data.loader.batch_size=64``,
            ``train.precision=bf16``).
    """
    cp = open_checkpoint(path)
    extra = [*overrides, f"train.device={device}"] if device != "auto" else list(overrides)
    if labels is not None:
        extra.append(f"data.label_csv={labels}")
    cfg = checkpoint_recipe(cp.folder, extra)
    rt = resolve_runtime(cfg.train, cfg.model)
    named = cfg.data.label_csv
    if labels is not None or (named and Path(named).is_file()):
        label_set = read_label_csv(named)  # a CSV given by the caller must exist: read_label_csv names it
    else:
        label_set = None  # embedding needs no labels; classifying says which file is missing
    return Model(cp, cfg, rt, label_set)
