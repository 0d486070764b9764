"""Several processes (torchrun, DDP): the process group, batch shards, gathers and reductions.

One entry point serves every scale. ``torchrun`` (or ``pcav pretrain --nproc N``, which starts
it) sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; ``init_from_env`` then joins the process
group (NCCL on GPUs, gloo on CPUs) and picks ``cuda:LOCAL_RANK``. Without them, or with a world
of one, nothing here talks to anyone and the single-process code paths run unchanged.

The recipe describes the *global* run, whatever the world size: ``data.loader.batch_size`` is the
micro-batch of all ranks together and rank r takes a contiguous slice of it (``split``), so the
same recipe gives the same global batches, the same accumulation and the same contrastive
negatives at 1, 2 or 8 processes. ``BatchShard`` holds one micro-batch's split: ``gather`` puts
the ranks' embeddings back together *with gradient* (the loss sees the global batch, as in one
process), ``local_weight`` scales the per-rank losses so that DDP's gradient average equals the
gradient of the global-batch loss. The logged values are reduced to their global means at flush
points, many micro-batches in one all-reduce (``pending.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from pcavmae_cli.engine.errors import UserError

if TYPE_CHECKING:  # data.py imports this module
    from pcavmae_cli.engine.train.data import EpochBatchSampler

TIMEOUT = timedelta(minutes=30)  # a collective waiting longer than this is a hung rank: fail, not hang


@dataclass(frozen=True)
class WorldInfo:
    """This process's place in the run, from torchrun's environment variables."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def world_from_env() -> WorldInfo:
    """``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as torchrun sets them; a world of one without them."""
    if "WORLD_SIZE" not in os.environ:
        return WorldInfo()
    return WorldInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def init_from_env(use_cuda: bool) -> WorldInfo:
    """Join torchrun's process group (once); returns the world. NCCL with CUDA, gloo without."""
    world = world_from_env()
    if world.world_size > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    return world


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shutdown() -> None:
    """Leave the process group (end of a command), so the next run in this process starts clean."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    reset_groups()


def split(total: int, world_size: int) -> list[int]:
    """Sizes of ``world_size`` contiguous slices of ``total`` items, differing by at most one.

    Rank r's slice starts at ``sum(sizes[:r])``; the first ``total % world_size`` ranks take one
    more. Used for micro-batches and for the E-step's shards of the manifest (no padding, so no
    clip counts twice).
    """
    base, extra = divmod(total, world_size)
    return [base + (r < extra) for r in range(world_size)]


def bounds(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s slice in ``split(total, world_size)``."""
    sizes = split(total, world_size)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


_GATHER_GROUP: dist.ProcessGroup | None = None


def _gather_group() -> dist.ProcessGroup:
    """A second process group for the gathers inside the loss: their backward runs in the middle
    of DDP's gradient all-reduces, and a channel of their own keeps the two from interleaving."""
    global _GATHER_GROUP
    if _GATHER_GROUP is None:
        _GATHER_GROUP = dist.new_group(backend=dist.get_backend())
    return _GATHER_GROUP


def reset_groups() -> None:
    """Forget the gather group (it died with the process group)."""
    global _GATHER_GROUP
    _GATHER_GROUP = None


@dataclass(frozen=True)
class BatchShard:
    """This rank's slice of one global micro-batch.

    Args:
        sizes: clips of every rank in this micro-batch (``split`` of the global size).
        rank: this process.
    """

    sizes: tuple[int, ...]
    rank: int

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def start(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def local_weight(self) -> float:
        """Factor of a per-rank mean loss: ``n_r * W / B``. DDP averages gradients over the W
        ranks, so the update is then ``sum_r n_r / B * grad(L_r)``, the global-batch mean."""
        return self.sizes[self.rank] * len(self.sizes) / self.total

    def gather(self, t: Tensor) -> Tensor:
        """``(n_r, ...)`` on each rank -> ``(B, ...)`` in rank order, identical on every rank.

        Differentiable (``torch.distributed.nn.functional.all_gather``): the gradient of the
        gathered rows flows back to the rank that made them, summed over the ranks' copies of
        the loss; since every rank computes the same global loss that sum is W times its
        gradient, which DDP's average over W ranks cancels. Uneven slices are padded with zero
        rows for the collective and cut back after it.
        """
        from torch.distributed.nn.functional import all_gather  # imports torch.distributed.nn lazily

        width = max(self.sizes)
        padded = F.pad(t, (0, 0) * (t.dim() - 1) + (0, width - t.shape[0])) if t.shape[0] < width else t
        if not t.is_floating_point():  # indices: no gradient, a plain collective
            parts = [torch.empty_like(padded) for _ in self.sizes]
            dist.all_gather(parts, padded.contiguous(), group=_gather_group())
        else:
            parts = all_gather(padded, group=_gather_group())
        return torch.cat([p[:n] for p, n in zip(parts, self.sizes)])


def agree(flag: bool, device: torch.device) -> bool:
    """Whether any rank raised ``flag`` (an all-reduce on ``comm_device(device)``); just ``flag``
    in a world of one."""
    if not is_distributed():
        return flag
    t = torch.tensor([float(flag)], dtype=torch.float64, device=comm_device(device))
    dist.all_reduce(t)
    return bool(t.item() > 0)


def sum_across(t: Tensor) -> Tensor:
    """``t`` summed over ranks, in place (identity in a world of one)."""
    if is_distributed():
        dist.all_reduce(t)
    return t


def comm_device(device: torch.device) -> torch.device:
    """Where tensors for collectives live: the GPU for NCCL, the CPU for gloo."""
    return device if is_distributed() and dist.get_backend() == "nccl" else torch.device("cpu")


def check_batches_fit_world(sampler: EpochBatchSampler, world_size: int) -> None:
    """Every global batch of an ``EpochBatchSampler`` must give each rank at least one clip (a
    rank with an empty slice would have nothing to run while the others wait for it)."""
    if world_size > 1 and sampler.smallest_batch() < world_size:
        raise UserError(
            f"the last batch of an epoch holds {sampler.smallest_batch()} clips, fewer than the {world_size} "
            f"processes; choose a 'data.loader.batch_size' that leaves at least {world_size} clips for it "
            f"({sampler.n} clips in the manifest)"
        )
