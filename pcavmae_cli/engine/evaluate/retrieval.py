"""Cross-modal retrieval on clip embeddings: CAV-MAE's protocol (R@1/5/10, median rank).

Clip i's audio and video embeddings are a pair. Both are L2-normalised, so the similarity
S = a_hat v_hat^T (N, N) is the cosine. Audio->video: audio clip i queries the N videos by
row i of S, and its true video is column i; video->audio uses the columns of S.

Rank of the true item (1-based): ``rank_i = #{j : S_ij >= S_ii}``, i.e. 1 + the number of
*other* items scoring at least as high. Ties count against the model, so collapsed
embeddings (all similarities equal) give rank N, not rank 1. R@k is the fraction of queries
with rank <= k, a number in [0, 1] (papers print it in percent); with k >= N it is 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _as_tensor(x: np.ndarray | Tensor) -> Tensor:
    return x.detach() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


def similarity_matrix(audio: np.ndarray | Tensor, video: np.ndarray | Tensor) -> Tensor:
    """Cosine similarity (N_a, N_v) of audio rows against video rows, in fp32.

    Args:
        audio: (N_a, D). video: (N_v, D). Rows need not be normalised; zero rows give 0.
    """
    a = F.normalize(_as_tensor(audio).float(), dim=-1)
    v = F.normalize(_as_tensor(video).float(), dim=-1)
    return a @ v.T


def pair_ranks(queries: np.ndarray | Tensor, gallery: np.ndarray | Tensor, chunk_size: int = 1024) -> Tensor:
    """1-based rank of each query's own pair (gallery row i for query row i), ties against.

    The (N, N) similarity matrix is built ``chunk_size`` query rows at a time, so memory stays
    at chunk_size x N.

    Args:
        queries: (N, D). gallery: (N, D), row i the pair of query row i.
    Returns:
        (N,) long ranks in [1, N].
    """
    q = F.normalize(_as_tensor(queries).float(), dim=-1)
    g = F.normalize(_as_tensor(gallery).float(), dim=-1).to(q.device)
    if q.ndim != 2 or q.shape != g.shape:
        raise ValueError(f"paired embeddings must both be (N, D), got {tuple(q.shape)} and {tuple(g.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    ranks = []
    for start in range(0, q.shape[0], chunk_size):
        sim = q[start : start + chunk_size] @ g.T  # (chunk, N)
        rows = torch.arange(sim.shape[0], device=sim.device)
        own = sim[rows, rows + start].unsqueeze(1)  # (chunk, 1)
        ranks.append((sim >= own).sum(dim=1))  # the pair itself counts once: rank >= 1
    return torch.cat(ranks).cpu()


def rank_metrics(ranks: Tensor, ks: Sequence[int] = (1, 5, 10), prefix: str = "") -> dict[str, float | None]:
    """R@k for each k, median and mean rank, from 1-based ranks (N,).

    Keys: ``{prefix}r{k}`` for each k, ``{prefix}median_rank``, ``{prefix}mean_rank``. The
    median of an even count is the mean of the two middle ranks (numpy's median). R@k is
    ``None`` (null in metrics.json, ``-`` on screen) when k >= N: every clip then ranks within
    the first k, and the 1.0 would say nothing.
    """
    r = ranks.double()
    n = r.shape[0]
    out: dict[str, float | None] = {f"{prefix}r{k}": float((r <= k).double().mean()) if k < n else None for k in ks}
    out[f"{prefix}median_rank"] = float(np.median(r.numpy()))
    out[f"{prefix}mean_rank"] = float(r.mean())
    return out


def retrieval_metrics(
    audio: np.ndarray | Tensor,
    video: np.ndarray | Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Audio->video and video->audio retrieval on N paired clip embeddings.

    Args:
        audio: (N, D) audio clip embeddings. video: (N, D) video clip embeddings, row i the
            same clip as audio row i.
        ks: the recall cut-offs.
        chunk_size: query rows per similarity block (memory chunk_size x N).
    Returns:
        ``a2v_r1, a2v_r5, a2v_r10, a2v_median_rank, a2v_mean_rank`` and the same ``v2a_``
        keys (R@k in [0, 1], ranks 1-based), plus ``n`` (the number of pairs).
    """
    a2v = rank_metrics(pair_ranks(audio, video, chunk_size), ks, prefix="a2v_")
    v2a = rank_metrics(pair_ranks(video, audio, chunk_size), ks, prefix="v2a_")
    return {**a2v, **v2a, "n": int(_as_tensor(audio).shape[0])}
