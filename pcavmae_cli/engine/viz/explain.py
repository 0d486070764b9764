"""``pcav explain``: why the model sees a clip as it does (docs/method.md, "Figures and explanations").

For one clip -- a manifest id, or a video file preprocessed on the fly into a temporary folder
with the run's data settings -- and a checkpoint:

1. the clip's joint embedding normalise(z_a + z_v) from the pre-training run's momentum encoder
   (middle frame, as the E-step) is compared with the run's latest prototypes at every
   granularity: cosine similarity to p^m, eq. 1's posterior softmax(z . p / gamma), and the
   audio and video similarities z_a . p_a and z_v . p_v;
2. for the ``top`` nearest prototypes: size, concentration, label make-up of the members, and
   the exemplar members nearest the prototype (``exemplars.py``; the clip itself is left out);
3. with a fine-tuned checkpoint: the predicted classes (frame-averaged probabilities, as
   ``pcav evaluate``) and the decomposition of the top class's logit over prototypes
   (``contributions.py``). The prototypes are those of the run the model was fine-tuned from
   (``finetune.init_from``, or ``prototypes_run``). A prototype head's logit is decomposed
   exactly, with no residual; either head's decomposition gets its faithfulness measures
   (``faithfulness.py``: prototype share, deletion test);
4. whether the decision is audio- or video-driven (``modality_share.py``): per granularity, the
   audio share of the margin between the nearest and the second-nearest prototype; with a
   fine-tuned model also the audio share of the top logit.

What a person needs to check it by eye and ear is kept too: the clip's middle frame, its
un-normalised log-Mel (the recipe's fbank settings, cut to the model's length), its WAV and the
source video if it still exists (``explain_media.py`` writes them next to the report).

``Explainer`` loads everything once, so several clips can be explained cheaply; ``render``
writes ``explain.png``, ``explain.html`` and ``explain.json``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.data.manifest import read_manifest
from pcavmae_cli.engine.data.preprocess import preprocess_file
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.model.classifier import Classifier, load_classifier_checkpoint
from pcavmae_cli.engine.prototypes import joint_embedding
from pcavmae_cli.engine.schema import Recipe
from pcavmae_cli.engine.train import checkpoint as ckpt
from pcavmae_cli.engine.viz import draw
from pcavmae_cli.engine.viz.cluster_metrics import cluster_members, label_makeup
from pcavmae_cli.engine.viz.contributions import (
    Decomposition, contribution_matrix, decompose_logit, direction_coefficients, posterior, prototype_head_decomposition,
    prototype_head_matrix,
)  # fmt: skip
from pcavmae_cli.engine.viz.faithfulness import Faithfulness, deletion_test, explained_share
from pcavmae_cli.engine.viz.exemplars import EmbeddingCache, nearest_members, sample_members
from pcavmae_cli.engine.viz.explain_media import display_log_mel, existing_source
from pcavmae_cli.engine.viz.modality_share import ModalityShare, logit_share, prototype_share
from pcavmae_cli.engine.viz.run import display, open_run, read_run_recipe, resolve_device

MEAN_SAMPLE = 256  # training clips averaged for mu of the decomposition


@dataclass
class Exemplar:
    clip_id: str
    label: str
    similarity: float | None
    index: int  # row of the training manifest


@dataclass
class Neighbour:
    """One of the prototypes nearest to the clip."""

    level: int
    prototype: int
    similarity: float  # cos(joint, p^m)
    posterior: float  # eq. 1's softmax(z . p / gamma)
    audio_similarity: float  # z_a . p_a
    video_similarity: float  # z_v . p_v
    gamma: float
    clips: int
    majority: str | None
    makeup: list[tuple[str, float]]
    exemplars: list[Exemplar]


@dataclass
class Prediction:
    """A fine-tuned model's view: class probabilities and the top logit's decomposition per granularity."""

    classes: list[tuple[str, float]]  # top classes, probability averaged over frames
    top_class: str
    mode: str  # the head's input stream(s): a, v, av or sum
    decompositions: list[Decomposition]  # one per granularity
    modality: ModalityShare | None = None  # audio share of the top logit (modality_share.logit_share)
    faithfulness: list[Faithfulness] = field(default_factory=list)  # per granularity (faithfulness.py)
    head: str = "linear"  # the fine-tuned head: linear or prototype


@dataclass
class Explanation:
    clip_id: str
    source: str  # manifest or video file
    labels: list[str]  # display names
    run_dir: str  # the pre-training run whose prototypes explain
    checkpoint: str
    epoch: int  # the prototypes' epoch, 1-based as in metrics.jsonl and on screen
    assigned: list[int | None]  # the clip's own prototype per granularity, if it is a training clip
    neighbours: list[list[Neighbour]]  # per granularity, nearest first
    prediction: Prediction | None = None
    # Per granularity, the audio share of the nearest prototype's margin (None with one prototype).
    modality: list[ModalityShare | None] = field(default_factory=list)
    media: str | None = None  # the source video or picture, where it still exists
    frame: np.ndarray | None = field(default=None, repr=False)  # (S, S, 3) middle frame, for the picture
    spectrogram: np.ndarray | None = field(default=None, repr=False)  # (F, T) un-normalised log-Mel
    wav: bytes | None = field(default=None, repr=False)  # the preprocessed WAV (its folder may be temporary)

    def to_json(self) -> dict:
        data = asdict(self)
        for name in ("frame", "spectrogram", "wav"):
            data.pop(name)
        return data


@dataclass
class ClassifierHead:
    """A fine-tuned ``Classifier`` seen as head input h and a Linear layer: h = LayerNorm(pooled)
    (D values) for the linear head, the prototype similarities (P values) for the prototype head."""

    model: Classifier
    class_names: list[str]
    label_mode: str

    @property
    def weight(self) -> torch.Tensor:  # (C, D) or (C, P)
        return self.model.head_linear.weight.detach().float().cpu()

    @property
    def bias(self) -> torch.Tensor:  # (C,)
        return self.model.head_linear.bias.detach().float().cpu()

    @torch.no_grad()
    def inputs(self, fbank: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """h of every frame: fbank ``(B, T, F)``, frames ``(B, K, 3, S, S)`` -> ``(B, K, D)``."""
        m = self.model
        B, K = frames.shape[:2]
        a = m.encode_audio(fbank).repeat_interleave(K, dim=0) if m.uses_audio else None
        v = m.encode_video(frames.flatten(0, 1)) if m.uses_video else None
        return m.head_input(a, v).view(B, K, -1).float().cpu()


def _is_finetune_checkpoint(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ckpt.FINETUNE_FILES) and not (folder / "momentum.safetensors").is_file()


def _finetune_folder(path: Path) -> Path | None:
    """The fine-tuning checkpoint ``path`` names (a run folder: ``averaged``, else ``last``), or ``None``."""
    if _is_finetune_checkpoint(path):
        return path
    if (path / "checkpoints").is_dir() and ckpt.find_checkpoint(path, "last") is None:
        for name in ("averaged", "last"):
            found = ckpt.find_checkpoint(path, name, ckpt.FINETUNE_FILES)
            if found is not None:
                return found
    return None


def load_classifier(folder: Path, device: torch.device, overrides: Sequence[str] = ()) -> tuple[ClassifierHead, Recipe]:
    """A fine-tuning checkpoint's classifier and its recipe (paths rebased, ``overrides`` on top)."""
    from pcavmae_cli.engine.data.manifest import read_label_csv

    cfg = read_run_recipe(folder / "config.yaml", overrides)
    if cfg.finetune is None or cfg.model is None:
        raise UserError(f"{folder / 'config.yaml'} has no 'finetune' section; is it a fine-tuning run?")
    if cfg.data.label_csv is None:
        raise UserError(f"{folder / 'config.yaml'}: the fine-tuning run names no data.label_csv")
    labels = read_label_csv(cfg.data.label_csv)
    model = load_classifier_checkpoint(folder / "model.safetensors", cfg.model, len(labels.mids), cfg.finetune, device)
    head = ClassifierHead(model.eval(), labels.names, cfg.data.label_mode)
    return head, cfg


class Explainer:
    """Everything ``explain`` needs, loaded once.

    Args:
        checkpoint: a pre-training or fine-tuning run folder or checkpoint folder.
        prototypes_run: the pre-training run whose prototypes explain (default: the checkpoint's
            own run, or the run a fine-tuned model started from).
        data: extra manifest to look clip ids up in (before the run's train and eval manifests).
        top: nearest prototypes shown per granularity; ``exemplars``: member clips per prototype;
        candidates: members embedded per prototype to find exemplars and centres;
        listed: prototypes listed separately in a decomposition (the rest is in the residual).
    """

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        prototypes_run: str | Path | None = None,
        data: str | Path | None = None,
        device: str = "auto",
        top: int = 3,
        exemplars: int = 3,
        candidates: int = 32,
        listed: int = 16,
        seed: int = 0,
        labels: str | Path | None = None,
        overrides: Sequence[str] = (),
    ):
        if top < 1 or exemplars < 0 or candidates < 1 or listed < 1:
            raise UserError("--top, --candidates and --listed must be >= 1, --exemplars >= 0")
        self.device = resolve_device(device)
        self.top, self.n_exemplars, self.candidates, self.listed, self.seed = top, exemplars, candidates, listed, seed
        path = Path(checkpoint)
        if not path.exists():
            raise UserError(f"not found: {path}")
        self.head: ClassifierHead | None = None
        # the overrides (and --labels) apply to the explained run and to the run whose prototypes explain
        overrides = [*overrides, *([f"data.label_csv={labels}"] if labels is not None else [])]
        finetuned = _finetune_folder(path)
        if finetuned is not None:
            self.head, head_cfg = load_classifier(finetuned, self.device, overrides)
            self.head_data = head_cfg.data
            self.checkpoint = finetuned
            source = prototypes_run or head_cfg.finetune.init_from
            if not source:
                raise UserError(f"{finetuned}: the model was fine-tuned from no pre-training run; pass --prototypes RUN")
            if not Path(source).exists():
                raise UserError(f"pre-training run {source} (finetune.init_from) not found; pass --prototypes RUN")
            self.run = open_run(source, overrides=overrides)
        else:
            self.run = open_run(prototypes_run or path, overrides=overrides)
            self.checkpoint = self.run.checkpoint if prototypes_run is None else open_run(path).checkpoint
        _, self.momentum = self.run.load_model(self.device)
        self.epoch, self.levels = self.run.latest_prototypes()
        self.train_manifest, self.train_records = self.run.train_clips()
        for p in self.levels:
            if p.assignments.numel() != len(self.train_records):
                raise UserError(f"the prototypes assign {p.assignments.numel()} clips but {self.train_manifest} "
                                f"lists {len(self.train_records)}: the manifest changed after training")  # fmt: skip
        spec = None if self.head is None else self.head.model.prototype_head
        if spec is not None and spec.sizes != tuple(len(p.counts) for p in self.levels):
            raise UserError(f"{self.checkpoint}: the prototype head holds {list(spec.sizes)} prototypes per granularity "
                            f"but {self.run.run_dir} has {[len(p.counts) for p in self.levels]} (epoch {self.epoch + 1}); "
                            "pass --prototypes with the run it was fine-tuned from")  # fmt: skip
        self.names = self.run.label_names()
        self.train_ids = {r.id: i for i, r in enumerate(self.train_records)}
        self.train_middle = AudioVisualDataset(self.train_manifest, self.run.cfg.data, frames="middle")
        self.cache = EmbeddingCache(self.momentum, self.train_middle, self.device)
        if self.head is not None:  # the fine-tuned model's own input settings for its head inputs
            self.head_train = AudioVisualDataset(self.train_manifest, self.head_data, frames="middle")
        self.members = [cluster_members(p.assignments.cpu().numpy()) for p in self.levels]
        self.manifests = [Path(m) for m in (data, self.run.cfg.data.train_manifest, self.run.cfg.data.eval_manifest) if m]
        self._head_inputs: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ clips

    def _open_clip(self, clip: str, tmp: Path) -> tuple[Path, int, str, bool]:
        """The manifest holding ``clip``, its row, where it came from, and whether it is a video file."""
        path = Path(clip)
        if path.is_file():  # any media file ffmpeg can read: preprocessing probes its content
            return preprocess_file(path, tmp, self.run.cfg.data), 0, str(path), True
        for manifest in self.manifests:
            if not manifest.is_file():
                continue
            for row, record in enumerate(read_manifest(manifest)):
                if record.id == clip:
                    return manifest, row, str(manifest), False
        where = ", ".join(str(m) for m in self.manifests) or "no manifest"
        raise UserError(f"clip '{clip}' is not in {where}; pass --data MANIFEST or a video file")

    def _head_input_of(self, indices: list[int]) -> torch.Tensor:
        """h (middle frame) of training clips, cached: (len(indices), D)."""
        missing = [i for i in dict.fromkeys(indices) if i not in self._head_inputs]
        for start in range(0, len(missing), 16):
            chunk = missing[start : start + 16]
            samples = [self.head_train[i] for i in chunk]
            fbank = torch.stack([s["fbank"] for s in samples]).to(self.device)
            frames = torch.stack([s["frames"] for s in samples])[:, None].to(self.device)
            self._head_inputs.update(zip(chunk, self.head.inputs(fbank, frames)[:, 0]))
        return torch.stack([self._head_inputs[i] for i in indices])

    # ------------------------------------------------------------------ explain

    @torch.no_grad()
    def explain(self, clip: str) -> Explanation:
        """Nearest prototypes of ``clip`` (an id or a video file) and, fine-tuned, its prediction."""
        data = self.run.cfg.data
        with tempfile.TemporaryDirectory(prefix="pcav-explain-") as tmp:
            manifest, row, source, from_video = self._open_clip(clip, Path(tmp))
            dataset = AudioVisualDataset(manifest, data, frames="middle")
            record = dataset.records[row]
            sample = dataset[row]
            emb = self.momentum.embed(sample["fbank"][None].to(self.device), sample["frames"][None].to(self.device))
            z_a, z_v = emb.z_a[0].float().cpu(), emb.z_v[0].float().cpu()
            joint = joint_embedding(z_a[None], z_v[None])[0]
            frame = draw.frame_image(sample["frames"], data)
            spectrogram = display_log_mel(dataset, row)
            wav_path = record.audio_path(dataset.root)
            wav = wav_path.read_bytes() if wav_path.is_file() else None  # a pack keeps no WAV
            media = str(Path(source).resolve()) if from_video else existing_source(record)
            h = every = None
            if self.head is not None:  # every frame, as pcav evaluate: (K, D)
                every = AudioVisualDataset(manifest, self.head_data, frames="all")[row]
                every = {k: every[k].to(self.device) for k in ("fbank", "frames")}
                h = self.head.inputs(every["fbank"][None], every["frames"][None])[0]
        own = None if from_video else self.train_ids.get(record.id)
        neighbours, assigned, decompositions = [], [], []
        for level, protos in enumerate(self.levels):
            sims = protos.centroids.float().cpu() @ joint
            post = posterior(joint, protos.centroids.cpu(), protos.gamma.cpu())
            order = sims.argsort(descending=True).tolist()
            assigned.append(int(protos.assignments[own]) if own is not None else None)
            neighbours.append([self._neighbour(level, k, sims, post, z_a, z_v, exclude=own) for k in order[: self.top]])
        modality = [prototype_share(z_a, z_v, protos.centroids.float().cpu()) for protos in self.levels]
        prediction = None
        if h is not None:
            logits = h @ self.head.weight.T + self.head.bias  # (K frames, C)
            probs = (torch.softmax(logits, -1) if self.head.label_mode == "single" else torch.sigmoid(logits)).mean(0)
            top = probs.argsort(descending=True)[:5].tolist()
            names = self.head.class_names
            faithfulness = []
            for level, protos in enumerate(self.levels):
                post = posterior(joint, protos.centroids.cpu(), protos.gamma.cpu())
                decomposition, faithful = self._decompose(level, h.mean(0), post, top[0])
                decompositions.append(decomposition)
                faithfulness.append(faithful)
            share = logit_share(self.head.model, every["fbank"], every["frames"], top[0])
            kind = "linear" if self.head.model.prototype_head is None else "prototype"
            prediction = Prediction([(names[c], float(probs[c])) for c in top], names[top[0]], self.head.model.mode,
                                    decompositions, modality=share, faithfulness=faithfulness, head=kind)  # fmt: skip
        return Explanation(
            clip_id=record.id, source=source, labels=[display(lab, self.names) for lab in record.labels],
            run_dir=str(self.run.run_dir), checkpoint=str(self.checkpoint), epoch=self.epoch + 1, assigned=assigned,
            neighbours=neighbours, prediction=prediction, modality=modality, media=media, frame=frame,
            spectrogram=spectrogram, wav=wav,
        )  # fmt: skip

    def _neighbour(self, level: int, k: int, sims: torch.Tensor, post: torch.Tensor, z_a: torch.Tensor,
                   z_v: torch.Tensor, exclude: int | None) -> Neighbour:  # fmt: skip
        protos = self.levels[level]
        members = self.members[level].get(k, [])
        labels = [[display(lab, self.names) for lab in self.train_records[i].labels] for i in members]
        makeup = label_makeup(labels)
        found = nearest_members(self.cache, members, protos.centroids[k], self.n_exemplars,
                                candidates=self.candidates, seed=self.seed + k,
                                exclude=() if exclude is None else (exclude,))  # fmt: skip
        exemplars = []
        for i, sim in found:
            rec = self.train_records[i]
            label = display(rec.labels[0], self.names) if rec.labels else ""
            exemplars.append(Exemplar(rec.id, label, sim, i))
        return Neighbour(
            level=level, prototype=k, similarity=float(sims[k]), posterior=float(post[k]),
            audio_similarity=float(protos.p_a[k].float().cpu() @ z_a),
            video_similarity=float(protos.p_v[k].float().cpu() @ z_v),
            gamma=float(protos.gamma[k]), clips=int(protos.counts[k]),
            majority=makeup[0][0] if makeup else None, makeup=makeup, exemplars=exemplars,
        )  # fmt: skip

    def _decompose(self, level: int, h: torch.Tensor, post: torch.Tensor, cls: int) -> tuple[Decomposition, Faithfulness]:
        """The top logit over this granularity's prototypes (contributions.py), and how faithful
        that is (faithfulness.py). The linear head: its ``listed`` most probable prototypes, fitted;
        the prototype head: exact, its ``listed`` largest contributions shown."""
        logits = h @ self.head.weight.T + self.head.bias  # (C,) of the frame-averaged head input
        if self.head.model.prototype_head is not None:
            cols = self.head.model.head.level_slices()[level]
            d = prototype_head_decomposition(h, self.head.weight[cls], float(self.head.bias[cls]), cols, self.listed,
                                             posterior=post)  # fmt: skip
            matrix, ids = prototype_head_matrix(h[cols], self.head.weight[:, cols]), None
        else:
            d, matrix, ids = self._linear_decomposition(level, h, post, cls)
        deletion = deletion_test(logits, matrix, cls, label_mode=self.head.label_mode, ids=ids, seed=self.seed)
        return d, Faithfulness(level, explained_share(d.explained, d.residual), deletion)

    def _linear_decomposition(self, level: int, h: torch.Tensor, post: torch.Tensor,
                              cls: int) -> tuple[Decomposition, torch.Tensor, list[int]]:  # fmt: skip
        """The linear head's top logit over this granularity's ``listed`` most probable prototypes,
        and every class's contributions of those prototypes ``(listed, C)``."""
        listed = post.argsort(descending=True)[: self.listed].tolist()
        centres = []
        for k in listed:
            members = sample_members(self.members[level].get(k, []), self.candidates, self.seed + k)
            centres.append(self._head_input_of(members).mean(0))
        pool = sample_members(list(range(len(self.train_records))), MEAN_SAMPLE, self.seed)
        mean = self._head_input_of(pool).mean(0)
        centres = torch.stack(centres)
        coef = direction_coefficients(h, centres, mean, post[listed])
        d = decompose_logit(h, self.head.weight[cls], float(self.head.bias[cls]), coef, centres, mean, listed,
                            posterior=post[listed])  # fmt: skip
        return d, contribution_matrix(self.head.weight, coef, centres, mean), listed
