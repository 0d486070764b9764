"""MAE-style random masking: each sample keeps its own random subset of tokens.

Under DDP a rank holds a slice of the global batch. Inside ``global_batch_rows(start, total)``
the mask noise is drawn for all ``total`` rows of the global batch and this rank keeps its rows,
so every rank's global RNG advances as one process's would and a clip gets the mask it would get
in a single-process run of the same recipe (``engine/train/distributed.py``). Threads of one
process that each run a slice of the batch (``engine/train/replicas.py``) share one
``SharedNoise`` inside ``shared_noise``: the n-th noise tensor of a forward pass is drawn once, by
whichever thread asks first, so the global RNG advances as one forward pass of the whole batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from threading import Lock

import torch

_GLOBAL_ROWS: ContextVar[tuple[int, int] | None] = ContextVar("global_batch_rows", default=None)


@contextmanager
def global_batch_rows(start: int, total: int) -> Iterator[None]:
    """Masks drawn inside are rows ``start : start + B`` of a ``total``-row global batch's."""
    token = _GLOBAL_ROWS.set((start, total))
    try:
        yield
    finally:
        _GLOBAL_ROWS.reset(token)


class SharedNoise:
    """The noise tensors of one forward pass of the whole batch, drawn once each and shared by
    the threads that run its slices (each thread asks for them in the same order)."""

    def __init__(self) -> None:
        self._drawn: list[torch.Tensor] = []
        self._lock = Lock()

    def draw(self, i: int, total: int, N: int, device: torch.device) -> torch.Tensor:
        """The ``i``-th noise tensor ``(total, N)``; drawn now if no thread has asked for it yet."""
        with self._lock:
            if i == len(self._drawn):
                self._drawn.append(torch.rand(total, N, device=device))
            return self._drawn[i]


_SHARED: ContextVar[tuple[SharedNoise, list[int]] | None] = ContextVar("shared_noise", default=None)


@contextmanager
def shared_noise(source: SharedNoise) -> Iterator[None]:
    """Masks drawn inside (in this thread) take their noise from ``source``, in call order."""
    token = _SHARED.set((source, [0]))
    try:
        yield
    finally:
        _SHARED.reset(token)


def _noise(B: int, N: int, device: torch.device) -> torch.Tensor:
    """Uniform ``(B, N)`` noise: this batch's, or this rank's (thread's) rows of the global batch's."""
    rows = _GLOBAL_ROWS.get()
    shared = _SHARED.get()
    if rows is None and shared is None:
        return torch.rand(B, N, device=device)
    start, total = rows if rows is not None else (0, B)
    if shared is None:
        return torch.rand(total, N, device=device)[start : start + B]
    source, calls = shared
    calls[0] += 1
    return source.draw(calls[0] - 1, total, N, device)[start : start + B]


def random_masking(x: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep ``int(N * (1 - ratio))`` tokens of each sample, chosen uniformly at random.

    Sorting per-sample uniform noise gives an independent random permutation per sample; its
    first ``len_keep`` entries are kept, and the inverse permutation (``ids_restore``) puts the
    decoder's sequence back in patch order.

    Args:
        x: ``(B, N, D)`` tokens.
        ratio: fraction masked, in ``[0, 1)``.

    Returns:
        kept ``(B, len_keep, D)``; mask ``(B, N)``, 1 where masked, in patch order;
        ids_restore ``(B, N)``, with ``unshuffle(kept ++ masked, ids_restore)`` the patch order.
    """
    B, N, D = x.shape
    len_keep = int(N * (1 - ratio))
    ids_shuffle = _noise(B, N, x.device).argsort(dim=1)  # ascending: first are kept
    ids_restore = ids_shuffle.argsort(dim=1)
    kept = x.gather(1, ids_shuffle[:, :len_keep, None].expand(-1, -1, D))
    mask = torch.ones(B, N, device=x.device)
    mask[:, :len_keep] = 0
    return kept, mask.gather(1, ids_restore), ids_restore


def unshuffle(kept: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """Append mask tokens to the kept ones and restore patch order.

    Args:
        kept: ``(B, K, D)`` tokens in the shuffled order ``random_masking`` returned.
        mask_token: ``(1, 1, D)`` the learnt placeholder of every masked patch.
        ids_restore: ``(B, N)`` from ``random_masking``.

    Returns:
        ``(B, N, D)`` in patch order.
    """
    B, K, D = kept.shape
    x = torch.cat([kept, mask_token.expand(B, ids_restore.shape[1] - K, D)], dim=1)
    return x.gather(1, ids_restore[..., None].expand(-1, -1, D))
