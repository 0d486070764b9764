"""Fine-tuning's validation under torchrun: each rank scores a shard, every rank gets all the scores.

Scoring the eval manifest is a forward pass per clip and frame, independent across clips, so the
ranks need not each score all N clips: rank r scores its contiguous shard (``eval_shard``: rows
``distributed.bounds(N, world, r)``, uneven shards differing by one clip, nothing padded, as the
E-step's shards), writing its rows of full-size ``(N, C)`` score and target matrices whose other
rows stay zero. One all-reduce SUM of each (``shared_clip_scores``) then gives every rank the
whole matrices in manifest order -- each row has a single non-zero contributor and ``x + 0 == x``,
so the sums are exactly the rows their rank computed, bit for bit the same on every rank. Every
rank then computes the same metrics and agrees on ``best``; rank 0 writes them.

A rank whose shard is empty (an eval set with fewer clips than processes) runs no batch and
contributes only zeros: such a run works, it just leaves ranks idle during validation.

In a world of one the shard is the whole dataset and no collective runs: ``clip_scores`` as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from pcavmae_cli.engine.evaluate.metrics import LabelMode
from pcavmae_cli.engine.evaluate.predict import clip_scores
from pcavmae_cli.engine.schema import DataConfig
from pcavmae_cli.engine.train.distributed import bounds, comm_device, sum_across
from pcavmae_cli.engine.train.runtime import Runtime


def eval_shard(dataset: Dataset, rt: Runtime) -> Dataset:
    """This rank's contiguous shard of ``dataset`` (the dataset itself in a world of one).

    A ``Subset`` keeps the samples as they are -- compact, with ``index`` the manifest row -- so
    ``clip_scores`` places each clip's scores at its manifest row, not at its place in the shard.
    """
    if rt.world_size == 1:
        return dataset
    return Subset(dataset, range(*bounds(len(dataset), rt.world_size, rt.rank)))


def empty_scores(rows: int, num_classes: int, label_mode: LabelMode) -> tuple[Tensor, Tensor]:
    """Zero scores ``(rows, C)`` and targets as ``clip_scores`` returns them: ``(rows, C)`` float
    multi-hot or ``(rows,)`` long class indices."""
    targets = torch.zeros(rows, num_classes) if label_mode == "multi_hot" else torch.zeros(rows, dtype=torch.long)
    return torch.zeros(rows, num_classes), targets


def shared_clip_scores(
    model: nn.Module,
    loader: DataLoader,
    label_mode: LabelMode,
    num_classes: int,
    rt: Runtime,
    advance: Callable[..., None] = lambda n=1, note="": None,
    *,
    rows: int,
    data: DataConfig,
) -> tuple[Tensor, Tensor]:
    """``clip_scores`` of every manifest clip, on every rank, with each rank scoring only its shard.

    Args:
        loader: over this rank's ``eval_shard`` of the eval dataset (compact samples).
        rows: the eval manifest's N (the shards' sizes together).
        num_classes: C, to shape an empty shard's zeros.
    Returns:
        scores ``(N, C)`` float32 and targets (``(N, C)`` or ``(N,)``) on the CPU, in manifest
        order, identical on every rank.
    """
    start, stop = bounds(rows, rt.world_size, rt.rank)
    if len(loader.dataset) != stop - start:
        raise ValueError(f"the loader holds {len(loader.dataset)} clips, not rank {rt.rank}'s shard of {stop - start}")
    scores, targets = clip_scores(model, loader, label_mode, rt, advance, data=data, rows=rows)
    if scores is None:  # an empty shard (fewer clips than ranks)
        scores, targets = empty_scores(rows, num_classes, label_mode)
    if rt.world_size == 1:
        return scores, targets
    on = comm_device(rt.device)  # the GPU for NCCL, the CPU for gloo
    return sum_across(scores.to(on)).cpu(), sum_across(targets.to(on)).cpu()
