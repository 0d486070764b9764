"""The E-step as the loop runs it: embed the training set with the momentum encoder, cluster.

Each post-warm-up epoch starts with it (``prototypes_active``). The momentum encoder embeds
every clip of the training manifest with no masking (``MomentumEncoder.embed``, the "full-set"
path) from its *middle* frame (frame ``n_frames // 2``, the dataset's ``"middle"`` policy):
deterministic, so the prototypes of an epoch depend on the weights only, and the frame most
likely to show the clip's content. Row i of the embeddings is manifest row i, which is what the
losses look up through the batch's ``index``. ``estep`` then clusters and the prototypes are
written to ``run_dir/prototypes/prototypes-epochNNNN.safetensors`` (rank 0).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from pcavmae_cli.engine.model import MomentumEncoder
from pcavmae_cli.engine.prototypes import Prototypes, estep, save_prototypes
from pcavmae_cli.engine.schema import PrototypeConfig
from pcavmae_cli.engine.train.runtime import Runtime


@torch.no_grad()
def embed_training_set(
    momentum: MomentumEncoder,
    loader: DataLoader,
    rt: Runtime,
    advance: Callable[..., None] = lambda n=1, note="": None,
    check_stop: Callable[[], None] = lambda: None,
) -> tuple[Tensor, Tensor]:
    """z_a, z_v ``(N, proj_dim)`` float32 of every clip of ``loader``'s dataset, row = manifest index."""
    n = len(loader.dataset)
    z_a = z_v = None
    for batch in loader:
        check_stop()
        with rt.autocast():
            emb = momentum.embed(batch["fbank"].to(rt.device, non_blocking=True),
                                 batch["frames"].to(rt.device, non_blocking=True))
        if z_a is None:
            z_a = torch.empty(n, emb.z_a.shape[1], device=rt.device)
            z_v = torch.empty(n, emb.z_v.shape[1], device=rt.device)
        index = batch["index"].to(rt.device)
        z_a[index], z_v[index] = emb.z_a.float(), emb.z_v.float()
        advance(1)
    return z_a, z_v


def run_estep(
    momentum: MomentumEncoder,
    loader: DataLoader,
    cfg: PrototypeConfig,
    epoch: int,
    rt: Runtime,
    folder: Path,
    advance: Callable[..., None] = lambda n=1, note="": None,
    check_stop: Callable[[], None] = lambda: None,
) -> list[Prototypes]:
    """Prototypes of epoch ``epoch`` at every granularity; written under ``folder`` by rank 0."""
    z_a, z_v = embed_training_set(momentum, loader, rt, advance, check_stop)
    protos = estep(z_a, z_v, cfg, epoch=epoch)
    if rt.is_main:
        save_prototypes(protos, folder, epoch)
    return protos
