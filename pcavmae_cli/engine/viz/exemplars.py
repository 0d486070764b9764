"""Exemplar member clips of a prototype: the members whose embedding is nearest to it.

Embedding every member of a large prototype would cost a pass over the corpus, so at most
``candidates`` members (a seeded random sample) are embedded with the momentum encoder and the
nearest ``n`` of them by cosine similarity to the joint prototype are the exemplars. Embeddings
are cached, so a clip is embedded once per report.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.model import MomentumEncoder
from pcavmae_cli.engine.viz.run import embed_clips


class EmbeddingCache:
    """Joint embeddings of clips of ``dataset`` (middle frame), computed on first use."""

    def __init__(self, encoder: MomentumEncoder, dataset: AudioVisualDataset, device: torch.device):
        self.encoder, self.dataset, self.device = encoder, dataset, device
        self.joint: dict[int, torch.Tensor] = {}

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        """(len(indices), D) joint embeddings, in the order asked."""
        missing = [i for i in dict.fromkeys(indices) if i not in self.joint]
        if missing:
            emb = embed_clips(self.encoder, self.dataset, missing, self.device)
            self.joint.update(zip(missing, emb.joint))
        return torch.stack([self.joint[i] for i in indices])


def sample_members(members: Sequence[int], candidates: int, seed: int) -> list[int]:
    """At most ``candidates`` of ``members``, drawn without replacement with a seeded generator."""
    if len(members) <= candidates:
        return list(members)
    order = torch.randperm(len(members), generator=torch.Generator().manual_seed(seed))[:candidates]
    return sorted(members[i] for i in order.tolist())


def nearest_members(
    cache: EmbeddingCache | None,
    members: Sequence[int],
    centroid: torch.Tensor,
    n: int,
    *,
    candidates: int = 64,
    seed: int = 0,
    exclude: Sequence[int] = (),
) -> list[tuple[int, float | None]]:
    """Up to ``n`` ``(clip index, cosine similarity to the prototype)`` pairs, nearest first.

    Without a cache (no model), the first ``n`` of a seeded sample, with similarity ``None``.
    """
    pool = sample_members([m for m in members if m not in set(exclude)], candidates, seed)
    if not pool:
        return []
    if cache is None:
        return [(i, None) for i in pool[:n]]
    sims = cache.get(pool) @ centroid.float().cpu()
    top = sims.argsort(descending=True)[:n].tolist()
    return [(pool[j], float(sims[j])) for j in top]
