"""The one collective the E-step needs: a sum all-reduce across ranks.

Every E-step function takes a ``Comm``. On one process it is ``Comm()`` (rank 0 of 1, the
reduce is the identity); under ``torch.distributed`` it is ``TorchComm`` (``all_reduce`` with
SUM). The single-process path runs the very same code with the identity reduce, so the two
cannot drift apart. Tests simulate several ranks with threads (``tests/test_prototypes.py``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Comm:
    """A single process: rank 0 of a world of 1, and ``all_reduce`` returns its input."""

    rank: int = 0
    world_size: int = 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over all ranks, in place; returns ``t``."""
        return t


class TorchComm(Comm):
    """``torch.distributed`` with the process group already initialised."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def default_comm() -> Comm:
    """``TorchComm`` when a process group is initialised, the single-process ``Comm`` otherwise."""
    if dist.is_available() and dist.is_initialized():
        return TorchComm()
    return Comm()


def global_count(n_local: int, comm: Comm, device: torch.device) -> torch.Tensor:
    """Rows held by each rank, ``(world_size,)`` int64, identical on every rank."""
    sizes = torch.zeros(comm.world_size, dtype=torch.long, device=device)
    sizes[comm.rank] = n_local
    return comm.all_reduce(sizes)
