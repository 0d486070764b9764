"""The E-step as the loop runs it: embed the training set with the momentum encoder, cluster.

Each post-warm-up epoch starts with it (``prototypes_active``). The momentum encoder embeds
every clip of the training manifest with no masking (``MomentumEncoder.embed``, the "full-set"
path) from its *middle* frame (frame ``n_frames // 2``, the dataset's ``"middle"`` policy):
deterministic, so the prototypes of an epoch depend on the weights only, and the frame most
likely to show the clip's content. Row i of the embeddings is manifest row i, which is what the
losses look up through the batch's ``index``. ``estep`` then clusters and the prototypes are
written to ``run_dir/prototypes/prototypes-epochNNNN.safetensors`` (rank 0).

Several processes: rank r embeds its contiguous shard of the manifest (``distributed.bounds``;
uneven shards differ by one clip and nothing is padded, so no clip counts twice in the clustering),
``estep`` clusters the shards with all-reduced sums and counts (``prototypes.comm.TorchComm``;
no feature leaves its rank), and the N int assignments are summed into one (N,) tensor so that
every rank can look up the prototype of any clip it trains on. Every rank ends with identical
prototypes; the file written is the same as a single process would write.

The same features give the epoch's representation health (``evaluate.health``, recipe key
``health``): ``run_estep`` measures it with the prototypes (each shard's assignments, before they
are summed into the global ones). Epochs with no E-step (warm-up, runs without prototypes) embed
for it alone, and only the ``health.max_rows`` clips spread evenly over the set that its figures
use (``health_clips``; each rank its contiguous share, ``health_shard``), not the whole set:
``measure_health``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from pcavmae_cli.engine.data.model_inputs import model_inputs
from pcavmae_cli.engine.evaluate.health import embedding_health
from pcavmae_cli.engine.model import MomentumEncoder
from pcavmae_cli.engine.prototypes import Prototypes, estep, save_prototypes
from pcavmae_cli.engine.schema import DataConfig, HealthConfig, PrototypeConfig
from pcavmae_cli.engine.train.distributed import bounds, comm_device, split, sum_across
from pcavmae_cli.engine.train.runtime import Runtime


@torch.no_grad()
def embed_training_set(
    momentum: MomentumEncoder,
    loader: DataLoader,
    rt: Runtime,
    advance: Callable[..., None] = lambda n=1, note="": None,
    check_stop: Callable[[], None] = lambda: None,
    first_row: int = 0,
    rounds: int = 0,
    *,
    data: DataConfig,
    rows: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """z_a, z_v ``(n, proj_dim)`` float32 of the n clips of ``loader``'s dataset, row =
    manifest index - ``first_row`` (the loader holds manifest rows ``first_row ..`` of a shard),
    or, for a loader of other clips, row i = the clip of manifest index ``rows[i]`` (``rows``
    ascending). Its batches are compact samples, normalised on the device with ``data``'s
    statistics (``model_inputs``).

    ``check_stop`` runs once per batch and then again up to ``rounds`` calls in all: under DDP it
    is a collective, and shards with fewer batches must call it as often as the others.
    """
    n = len(loader.dataset)
    manifest_rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long)
    z_a = z_v = None
    calls = 0
    for batch in loader:
        check_stop()
        calls += 1
        batch = model_inputs(batch, data, rt.device)
        with rt.autocast():
            emb = momentum.embed(batch["fbank"], batch["frames"])
        if z_a is None:
            z_a = torch.empty(n, emb.z_a.shape[1], device=rt.device)
            z_v = torch.empty(n, emb.z_v.shape[1], device=rt.device)
        if manifest_rows is None:
            index = batch["index"] - first_row
        else:
            index = torch.searchsorted(manifest_rows.to(batch["index"].device), batch["index"])
        z_a[index], z_v[index] = emb.z_a.float(), emb.z_v.float()
        advance(1)
    for _ in range(calls, rounds):
        check_stop()
    return z_a, z_v


def global_assignments(protos: Prototypes, first_row: int, n_total: int, device: torch.device) -> Prototypes:
    """``protos`` with the assignment of every manifest row ``(N,)``: this shard's rows placed at
    ``first_row ..``, zeros elsewhere, summed over ranks (ints only; features stay put)."""
    full = torch.zeros(n_total, dtype=torch.long, device=comm_device(device))
    local = protos.assignments
    full[first_row : first_row + local.shape[0]] = local.to(full.device)
    sum_across(full)
    return dataclasses.replace(protos, assignments=full.to(local.device))


def health_of(
    z_a: Tensor, z_v: Tensor, protos: list[Prototypes] | None, cfg: HealthConfig
) -> dict[str, Any]:
    """``embedding_health`` of this shard's features with the recipe's ``health`` settings (the
    E-step's collective: several processes reduce their shards' sums)."""
    return embedding_health(z_a, z_v, protos, max_rows=cfg.max_rows, collapse_cosine=cfg.collapse_cosine,
                            collapse_rank=cfg.collapse_rank)  # fmt: skip


@dataclasses.dataclass
class EStepOutput:
    prototypes: list[Prototypes]  # one per granularity, assignments of every manifest row
    health: dict[str, Any] | None  # the health fields (``None`` without a ``health`` config)


def run_estep(
    momentum: MomentumEncoder,
    loader: DataLoader,
    cfg: PrototypeConfig,
    epoch: int,
    rt: Runtime,
    folder: Path,
    advance: Callable[..., None] = lambda n=1, note="": None,
    check_stop: Callable[[], None] = lambda: None,
    *,
    n_total: int | None = None,
    rounds: int = 0,
    data: DataConfig,
    health: HealthConfig | None = None,
) -> EStepOutput:
    """Prototypes of epoch ``epoch`` at every granularity, written under ``folder`` by rank 0, and
    (with ``health``) the representation health of the same features.

    ``loader`` holds this rank's shard of the manifest: rows ``bounds(N, world, rank)`` (all of
    them in one process), ``n_total`` the manifest's N (default: the loader's, one process),
    ``rounds`` the most batches of any shard; ``data`` normalises its compact batches.
    """
    n_total = len(loader.dataset) if n_total is None else n_total
    first_row, _ = bounds(n_total, rt.world_size, rt.rank)
    z_a, z_v = embed_training_set(momentum, loader, rt, advance, check_stop, first_row, rounds, data=data)
    protos = estep(z_a, z_v, cfg, epoch=epoch)
    figures = None if health is None else health_of(z_a, z_v, protos, health)  # shard assignments
    if rt.world_size > 1:
        protos = [global_assignments(p, first_row, n_total, rt.device) for p in protos]
    if rt.is_main:
        save_prototypes(protos, folder, epoch)
    return EStepOutput(protos, figures)


def health_clips(n: int, max_rows: int, world_size: int = 1) -> list[int]:
    """The manifest rows an epoch without an E-step embeds for its health, ascending: all ``n``
    when they are at most ``max_rows`` (the set the E-step measures), else ``max_rows`` rounded
    down to a multiple of ``world_size`` (at least one per rank) spread evenly over ``0 .. n - 1``,
    first and last included. Equal shares let the effective rank use every one of them
    (``gathered_rows`` takes the same count from every rank), so several processes measure what
    one process does on the same clips. Integer arithmetic: distinct rows at any ``n``."""
    if n <= max_rows:
        return list(range(n))
    m = min(n, max(world_size, max_rows - max_rows % world_size))
    if m < 2:
        return list(range(m))
    return [(2 * i * (n - 1) + m - 1) // (2 * (m - 1)) for i in range(m)]  # i (n-1)/(m-1), rounded


@dataclasses.dataclass
class HealthShard:
    """This rank's part of the health clips: manifest ``rows`` (its contiguous share of
    ``health_clips``), and ``rounds``, the most loader batches of any rank's share."""

    rows: list[int]
    rounds: int


def health_shard(n: int, max_rows: int, batch_size: int, rank: int = 0, world_size: int = 1) -> HealthShard:
    """Rank ``rank``'s share of ``health_clips(n, max_rows)``, cut as the E-step cuts the manifest."""
    clips = health_clips(n, max_rows, world_size)
    first, last = bounds(len(clips), world_size, rank)
    rounds = max(-(-size // batch_size) for size in split(len(clips), world_size))
    return HealthShard(clips[first:last], rounds)


def measure_health(
    momentum: MomentumEncoder,
    loader: DataLoader,
    cfg: HealthConfig,
    rt: Runtime,
    advance: Callable[..., None] = lambda n=1, note="": None,
    check_stop: Callable[[], None] = lambda: None,
    *,
    rows: Sequence[int] | None = None,
    rounds: int = 0,
    data: DataConfig,
) -> dict[str, Any]:
    """The health fields of an epoch without an E-step, measured without prototypes (their
    fields stay ``None``) on the clips of ``loader``: this rank's ``health_shard``, manifest
    ``rows`` (default: every clip of the loader's dataset, in order). Every rank gets the same
    figures (the sums are all-reduced, ``embedding_health``)."""
    z_a, z_v = embed_training_set(momentum, loader, rt, advance, check_stop, rounds=rounds, data=data, rows=rows)
    return health_of(z_a, z_v, None, cfg)
