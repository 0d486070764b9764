"""MAE-style random masking: each sample keeps its own random subset of tokens."""

from __future__ import annotations

import torch


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
    ids_shuffle = torch.rand(B, N, device=x.device).argsort(dim=1)  # ascending: first are kept
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
