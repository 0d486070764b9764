"""Pre-training's validation: does the representation improve on clips it never trains on?

The training loss cannot say: its meaning changes when the prototypes switch on and when a
stage changes the weights, and a falling instance InfoNCE can be memorised pairs (docs/method.md,
"When one modality learns nothing"). So every ``validation.every_epochs`` epochs (and after the
last) the model as trained so far embeds ``data.eval_manifest`` frozen, as ``pcav evaluate``
would, and the epoch line gets (all ``val_``-prefixed, higher is better):

- ``knn_joint`` / ``knn_audio`` / ``knn_video``: cosine kNN of the eval clips on the pooled
  joint, audio and video features, the neighbours taken among ``validation.gallery_clips``
  evenly spaced training clips embedded by the same model (all of them when fewer; with 0,
  among the other eval clips, leave-one-out), with the ``evaluate`` section's k, weighting and
  temperature: what ``pcav evaluate --task knn`` measures, top-1 for single labels and mAP for
  multi-hot ones; null without ``data.label_csv``. The capped gallery keeps the cost at two
  small embedding passes whatever the training set's size;
- ``a2v_r1``, ``a2v_r5``, ``v2a_r1``, ``v2a_r5``: retrieval of a clip's partner among the eval
  clips through z_a and z_v (null when k >= N, as in ``pcav evaluate``);
- ``purity`` and ``nmi``: one value per granularity of this epoch's prototypes, each eval clip
  assigned to its nearest joint prototype, against its (first) label; null before the
  prototypes start or without labels.

``validation.metric`` names the one that picks ``checkpoints/best``. Under torchrun each rank
embeds its shard of the eval clips (``validation.eval_shard``) and one all-reduce SUM gives every
rank all the features, so all compute the same figures and agree on ``best``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.data.manifest import read_label_csv
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.evaluate.predict import clip_features
from pcavmae_cli.engine.evaluate.probes import knn
from pcavmae_cli.engine.evaluate.retrieval import retrieval_metrics
from pcavmae_cli.engine.prototypes.step import Prototypes, joint_embedding
from pcavmae_cli.engine.schema import Recipe, ValidationConfig
from pcavmae_cli.engine.train.data import close_loader, embed_loader
from pcavmae_cli.engine.train.distributed import comm_device, sum_across
from pcavmae_cli.engine.train.estep import health_clips
from pcavmae_cli.engine.train.runtime import Runtime
from pcavmae_cli.engine.train.validation import eval_shard
from pcavmae_cli.engine.viz.cluster_metrics import nmi, purity

KNN_FEATURES = ("joint", "audio", "video")
RETRIEVAL = ("a2v_r1", "a2v_r5", "v2a_r1", "v2a_r5")
LABELLED = {f"knn_{f}" for f in KNN_FEATURES}  # metrics that need labels
KNN_DEFAULTS = {"k": 20, "weighting": "similarity", "temperature": 0.07}  # base.yaml's evaluate section
FALLBACK_METRIC = "a2v_r1"  # what picks best when the recipe's metric needs labels the data has none of


def label_lists(targets: Tensor, label_mode: str) -> list[list[str]]:
    """Targets as the label lists ``cluster_metrics`` reads: ``[["2"]]`` per clip (single), or the
    indices of its positive classes (multi-hot; its first label is the lowest index)."""
    if label_mode == "single":
        return [[str(int(y))] for y in targets]
    return [[str(int(c)) for c in row.nonzero().flatten()] for row in targets]


def validation_metrics(
    feats: dict[str, Tensor],
    targets: Tensor | None,
    label_mode: str,
    prototypes: list[Prototypes] | None,
    knn_args: dict[str, Any] | None = None,
    gallery: tuple[dict[str, Tensor], Tensor] | None = None,
) -> dict[str, Any]:
    """The module docstring's figures from the eval clips' features (``clip_features`` names).

    Args:
        feats: ``{"joint", "audio", "video", "z_a", "z_v": (N, width)}``.
        targets: ``(N,)`` class indices or ``(N, C)`` multi-hot, or ``None`` (no labels).
        prototypes: this epoch's joint prototypes per granularity, or ``None``.
        knn_args: ``knn``'s k, weighting and temperature (default ``KNN_DEFAULTS``).
        gallery: the kNN's labelled reference clips (features, targets); ``None``: leave-one-out
            among the eval clips.
    Returns:
        ``{name: value}`` without the ``val_`` prefix; a figure that cannot be computed is ``None``.
    """
    n = len(feats["z_a"])
    out: dict[str, Any] = {}
    labelled = targets is not None and n >= 1 and (gallery is not None or n >= 2)
    measure = "mAP" if label_mode == "multi_hot" else "top1"
    for f in KNN_FEATURES:
        if labelled:
            ref, ref_y = (feats[f], targets) if gallery is None else (gallery[0][f], gallery[1])
            result = knn(ref, ref_y, feats[f], targets, label_mode, leave_one_out=gallery is None,
                         **(knn_args or KNN_DEFAULTS))  # fmt: skip
            out[f"knn_{f}"] = _finite(result.metrics[measure])
        else:
            out[f"knn_{f}"] = None
    ranks = retrieval_metrics(feats["z_a"], feats["z_v"], ks=(1, 5))
    out |= {key: ranks[key] for key in RETRIEVAL}
    if prototypes is not None and targets is not None:
        labels = label_lists(targets, label_mode)
        x = joint_embedding(feats["z_a"], feats["z_v"])
        assigned = [(x @ p.centroids.float().cpu().T).argmax(dim=1).tolist() for p in prototypes]
        out["purity"] = [_finite(purity(a, labels)) for a in assigned]
        out["nmi"] = [_finite(nmi(a, labels)) for a in assigned]
    else:
        out["purity"] = out["nmi"] = None
    return out


def _finite(value: float | None) -> float | None:
    """JSON has no NaN: a figure without meaning (mAP with no positives) is null."""
    return None if value is None or value != value else round(float(value), 6)


class Positions(Dataset):
    """Rows of a dataset whose samples' ``index`` is their position here, not the manifest row:
    ``clip_features`` then fills a matrix of this subset's height (the kNN gallery), not the
    whole training manifest's."""

    def __init__(self, dataset: AudioVisualDataset, rows: list[int]):
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[self.rows[i]], "index": i}


class PretrainValidation:
    """The eval clips and the kNN gallery with their loaders (this rank's shards), and when
    and how to validate."""

    def __init__(self, cfg: Recipe, rt: Runtime, warn: Callable[[str], None]):
        data = cfg.data
        self.cfg: ValidationConfig = cfg.validation
        for key, path in (("data.eval_manifest", data.eval_manifest), ("data.label_csv", data.label_csv)):
            if path is not None and not Path(path).is_file():
                raise UserError(f"key '{key}': {path} not found; pre-training validates on data.eval_manifest "
                                "(set data.eval_manifest=null or validation.every_epochs=0 to pre-train without)")
        ev = cfg.evaluate  # the kNN of `pcav evaluate --task knn`, where the recipe has one
        self.knn_args = KNN_DEFAULTS if ev is None else {
            "k": ev.knn_k, "weighting": ev.knn_weighting, "temperature": ev.knn_temperature}  # fmt: skip
        self.rt, self.label_mode = rt, data.label_mode
        labels = read_label_csv(data.label_csv) if data.label_csv is not None else None
        self.names = dict(zip(labels.mids, labels.names)) if labels is not None else {}
        self.features: dict[str, Tensor] | None = None
        self.dataset = AudioVisualDataset(data.eval_manifest, data, frames=self.cfg.frames, labels=labels,
                                          compact=True)  # fmt: skip
        self.targets = self.dataset.targets() if labels is not None else None
        self.metric = self.cfg.metric
        if self.metric in LABELLED and self.targets is None:
            warn(f"validation.metric {self.metric} needs labels (data.label_csv); {FALLBACK_METRIC} picks "
                 f"checkpoints/best instead")  # fmt: skip
            self.metric = FALLBACK_METRIC
        self.widths = {"joint": cfg.model.embed_dim, "audio": cfg.model.embed_dim, "video": cfg.model.embed_dim,
                       "z_a": cfg.model.proj_dim, "z_v": cfg.model.proj_dim}  # fmt: skip
        self.loader = embed_loader(eval_shard(self.dataset, rt), data.loader, rt)
        self.gallery: Positions | None = None
        self.gallery_loader = None
        if self.targets is not None and self.cfg.gallery_clips > 0:
            train = AudioVisualDataset(data.train_manifest, data, frames=self.cfg.frames, labels=labels, compact=True)
            self.gallery = Positions(train, health_clips(len(train), self.cfg.gallery_clips))
            self.gallery_targets = train.targets()[self.gallery.rows]
            self.gallery_loader = embed_loader(eval_shard(self.gallery, rt), data.loader, rt)
        self.data = data

    def batches(self) -> int:
        """This rank's batches per validation (the progress bar's length)."""
        return len(self.loader) + (0 if self.gallery_loader is None else len(self.gallery_loader))

    @staticmethod
    def active(cfg: Recipe) -> bool:
        """A ``validation`` section, ``every_epochs`` > 0 and an eval manifest to validate on."""
        v = cfg.validation
        return v is not None and v.every_epochs > 0 and cfg.data.eval_manifest is not None

    def due(self, epoch: int, final: bool) -> bool:
        """After every ``every_epochs``-th epoch (0-based ``epoch``: epochs n, 2n, ...), the last,
        and the epochs that draw figures (they are drawn from the validation's features)."""
        return final or (epoch + 1) % self.cfg.every_epochs == 0 or self.figures_due(epoch)

    def figures_due(self, epoch: int) -> bool:
        """Figures after every ``figures_every_epochs``-th epoch (validated for them)."""
        n = self.cfg.figures_every_epochs
        return n > 0 and (epoch + 1) % n == 0

    def measure(
        self, backbone: torch.nn.Module, prototypes: list[Prototypes] | None,
        advance: Callable[..., None] = lambda n=1, note="": None,
    ) -> dict[str, Any]:  # fmt: skip
        """The figures of ``backbone`` as it is now (left in the train/eval mode it was in)."""
        was_training = backbone.training
        try:
            feats = self._features(backbone, self.loader, len(self.dataset), advance)
            gallery = None
            if self.gallery_loader is not None:
                gallery = (self._features(backbone, self.gallery_loader, len(self.gallery), advance), self.gallery_targets)
        finally:
            backbone.train(was_training)
        self.features = feats  # the eval clips' features, for this epoch's figures (validation_figures.py)
        return validation_metrics(feats, self.targets, self.label_mode, prototypes, self.knn_args, gallery)

    def _features(self, backbone: torch.nn.Module, loader, n: int, advance: Callable[..., None]) -> dict[str, Tensor]:
        """``clip_features`` of all ``n`` clips, every rank's shard summed into the whole
        matrices (each row has one contributor). A rank with an empty shard contributes zeros
        of the widths the model config gives."""
        feats = clip_features(backbone, loader, self.rt, advance, data=self.data, rows=n)
        if self.rt.world_size == 1:
            return feats
        names = list(self.widths)
        parts = [feats.get(k, torch.zeros(n, self.widths[k])) for k in names]
        whole = sum_across(torch.cat(parts, dim=1).to(comm_device(self.rt.device))).cpu()
        return dict(zip(names, whole.split([self.widths[k] for k in names], dim=1)))

    def close(self) -> None:
        close_loader(self.loader)
        close_loader(self.gallery_loader)
