"""The E-step: prototypes of the joint clip embedding at every granularity, and their files.

At the start of each post-warm-up epoch the trainer embeds the training set with the momentum
encoder (each rank its own shard) and calls ``estep(z_a, z_v, cfg)``. Clusters are found on
the joint embedding ``normalise(normalise(z_a) + normalise(z_v))`` (METHOD_NOTES), or with
``cluster_on: balanced`` on each modality's centred, equally scaled variation
(``balanced_embedding``); empty clusters are dropped, and each remaining cluster becomes one
``Prototypes`` row: the joint prototype p^m, the audio and video member means p_a, p_v
(eq. 3), and gamma (eq. 2).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.files import atomic_write
from pcavmae_cli.engine.prototypes.comm import Comm, default_comm
from pcavmae_cli.engine.prototypes.concentration import (
    cluster_means,
    normalise_concentration,
    raw_concentration,
)
from pcavmae_cli.engine.prototypes.density_peaks import density_peaks
from pcavmae_cli.engine.prototypes.kmeans import spherical_kmeans
from pcavmae_cli.engine.schema import PrototypeConfig
from pcavmae_cli.engine.tensor_io import load_tensors_only

try:
    import safetensors.torch as _safetensors
except ImportError:  # optional: plain torch.save files, read back with weights_only=True
    _safetensors = None


@dataclass
class Prototypes:
    """One granularity's prototypes; K rows, each a non-empty cluster of clips."""

    centroids: Tensor  # (K, D) joint prototypes p^m, unit-norm
    p_a: Tensor  # (K, D) normalised mean of the members' audio embeddings (eq. 3)
    p_v: Tensor  # (K, D) normalised mean of the members' video embeddings (eq. 3)
    gamma: Tensor  # (K,) concentration of eq. 2, clamped and rescaled to mean tau
    assignments: Tensor  # (N,) int64 prototype of each clip of this rank's shard
    counts: Tensor  # (K,) int64 member clips over all ranks

    def to(self, device: torch.device | str) -> Prototypes:
        return Prototypes(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def joint_embedding(z_a: Tensor, z_v: Tensor) -> Tensor:
    """The clip embedding clustering works on: ``normalise(normalise(z_a) + normalise(z_v))``."""
    return F.normalize(F.normalize(z_a.float(), dim=1) + F.normalize(z_v.float(), dim=1), dim=1)


def balanced_embedding(z_a: Tensor, z_v: Tensor, comm: Comm | None = None) -> Tensor:
    """What ``cluster_on: balanced`` clusters: each modality's unit embeddings centred on their
    mean over all clips and scaled to unit mean squared norm, summed, normalised.

    Why: when one modality's embeddings all point nearly one way (the collapse
    ``engine/evaluate/health.py`` flags), their variation is a small part of the joint
    embedding's, so clusters of ``joint_embedding`` are the other modality's clusters. Its
    prototype term then asks it to predict clusters it has no say in, stays at chance and gives
    it nothing to learn from (docs/method.md, "When one modality learns nothing"). Centring
    removes the shared direction and the scaling gives each modality's variation equal weight,
    so the clusters follow what both modalities vary in. For two healthy, centred modalities it
    is the joint embedding up to a common scale. Measured on the real-media benchmark, it ends
    the collapse but not the limit behind it: the clusters then follow the audio's own
    variation, not the categories, and held-out audio does not gain (docs/method.md).
    """
    comm = comm or default_comm()
    count = comm.all_reduce(torch.tensor([float(z_a.shape[0])], device=z_a.device))  # clips, both modalities
    parts = []
    for z in (z_a, z_v):
        z = F.normalize(z.float(), dim=1)
        centred = z - comm.all_reduce(z.sum(0, keepdim=True)) / count
        mean_square = comm.all_reduce(centred.square().sum().reshape(1)) / count
        parts.append(centred / mean_square.clamp_min(1e-12).sqrt())
    return F.normalize(parts[0] + parts[1], dim=1)


def build_prototypes(
    z_a: Tensor,
    z_v: Tensor,
    assignment: Tensor,
    k: int,
    *,
    beta: float,
    tau: float,
    percentiles: tuple[float, float],
    comm: Comm | None = None,
) -> Prototypes:
    """Prototypes of the clusters ``assignment`` (N,) in [0, k); empty clusters are dropped."""
    comm = comm or default_comm()
    z_a, z_v = F.normalize(z_a.float(), dim=1), F.normalize(z_v.float(), dim=1)
    counts = comm.all_reduce(torch.bincount(assignment, minlength=k))
    keep = counts > 0
    relabel = torch.cumsum(keep.long(), 0) - 1  # old cluster id -> id among the kept ones
    assignment = relabel[assignment]
    k = int(keep.sum())
    centroids = cluster_means(joint_embedding(z_a, z_v), assignment, k, comm)
    gamma, counts = raw_concentration(centroids, z_a, z_v, assignment, beta=beta, comm=comm)
    return Prototypes(
        centroids=centroids,
        p_a=cluster_means(z_a, assignment, k, comm),
        p_v=cluster_means(z_v, assignment, k, comm),
        gamma=normalise_concentration(gamma, tau=tau, percentiles=percentiles),
        assignments=assignment,
        counts=counts,
    )


def prototypes_active(epoch: int, cfg: PrototypeConfig) -> bool:
    """Whether epoch ``epoch`` (0-based) runs an E-step and the prototype losses (PCL's warm-up)."""
    return epoch >= cfg.warmup_epochs


@torch.no_grad()
def estep(
    z_a: Tensor, z_v: Tensor, cfg: PrototypeConfig, *, epoch: int = 0, comm: Comm | None = None
) -> list[Prototypes]:
    """Prototypes at every granularity of ``cfg`` from this rank's momentum embeddings.

    Args:
        z_a, z_v: (N, D) audio and video clip embeddings of this rank's shard (momentum encoder,
            no masking); the row order defines the clip index the losses look up.
        epoch: mixed into the seed, so each epoch's clustering draws afresh but reproducibly.
    Returns:
        one ``Prototypes`` per entry of ``cfg.num_clusters`` (kmeans) or ``cfg.granularities``.
    """
    comm = comm or default_comm()
    x = balanced_embedding(z_a, z_v, comm) if cfg.cluster_on == "balanced" else joint_embedding(z_a, z_v)
    levels = cfg.num_clusters if cfg.method == "kmeans" else cfg.granularities
    out = []
    for level, value in enumerate(levels or []):
        seed = cfg.seed + 10_000 * epoch + level
        if cfg.method == "kmeans":
            k = int(value)
            _, assignment = spherical_kmeans(x, k, iters=cfg.kmeans_iters, seed=seed, comm=comm,
                                             precision=cfg.assign_precision)  # fmt: skip
        else:
            peaks, assignment = density_peaks(
                x,
                float(value),
                max_points_exact=int(cfg.max_points_exact or 0),
                overcluster_k=int(cfg.overcluster_k or 0),
                iters=cfg.kmeans_iters,
                seed=seed,
                comm=comm,
                precision=cfg.assign_precision,
            )
            k = peaks.shape[0]
        low, high = cfg.gamma_percentiles
        protos = build_prototypes(
            z_a, z_v, assignment, k, beta=cfg.beta, tau=cfg.tau, percentiles=(low, high), comm=comm
        )
        out.append(protos)
    return out


def prototype_file(folder: Path, epoch: int, suffix: str | None = None) -> Path:
    """``folder/prototypes-epochNNNN.safetensors`` (``.pt`` without safetensors) for epoch index
    ``epoch`` (0-based, as the trainer counts): NNNN is the epoch's number, ``epoch + 1``, as in
    metrics.jsonl and on screen."""
    suffix = suffix or ("safetensors" if _safetensors is not None else "pt")
    return Path(folder) / f"prototypes-epoch{epoch + 1:04d}.{suffix}"


def save_prototypes(protos: list[Prototypes], folder: Path, epoch: int) -> Path:
    """Write every granularity's tensors (keys ``{level}.{field}``) for ``epoch``; returns the file.

    safetensors when the package is installed, else ``torch.save`` of a dict of plain tensors.
    Assignments are this rank's shard: a multi-rank trainer gathers them (N int64) first.
    """
    tensors = {
        f"{level}.{f.name}": getattr(p, f.name).detach().cpu().contiguous()
        for level, p in enumerate(protos)
        for f in fields(p)
    }
    path = prototype_file(folder, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"epoch": str(epoch + 1), "levels": str(len(protos))}  # 1-based, as the file name
    if _safetensors is not None:  # atomic, with the umask's mode (safetensors alone makes 0600)
        from pcavmae_cli.engine.tensor_io import save_safetensors

        save_safetensors(tensors, path, metadata=meta)
    else:
        atomic_write(path, lambda tmp: torch.save({"meta": meta, "tensors": tensors}, tmp))
    return path


def load_prototypes(
    folder: Path, epoch: int, device: torch.device | str = "cpu"
) -> list[Prototypes]:
    """The prototypes ``save_prototypes`` wrote for epoch index ``epoch`` (either file format)."""
    candidates = [prototype_file(folder, epoch, s) for s in ("safetensors", "pt")]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise UserError(f"no prototypes for epoch {epoch + 1} in {folder}")
    if path.suffix == ".safetensors":
        if _safetensors is None:
            raise UserError(f"{path}: reading it needs the 'safetensors' package")
        from pcavmae_cli.engine.tensor_io import read_safetensors  # a truncated file: one line

        tensors = read_safetensors(path, device)
    else:
        tensors = load_tensors_only(path, map_location=device)["tensors"]
    levels = sorted({int(key.split(".", 1)[0]) for key in tensors})
    names = [f.name for f in fields(Prototypes)]
    try:
        return [Prototypes(**{n: tensors[f"{level}.{n}"] for n in names}) for level in levels]
    except KeyError as exc:
        raise UserError(f"{path}: missing tensor {exc.args[0]}") from None
