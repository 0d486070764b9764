"""How well a clustering of clips agrees with their labels: purity, NMI, label make-up.

Every function takes ``assignments`` (N,) cluster ids and ``labels``: one list of label ids
per clip (the manifest's ``labels``; empty for an unlabelled clip). Clips without labels are
left out of purity and NMI.

- **Label make-up** of a cluster: for each label, the share of the cluster's (labelled) members
  that carry it. Multi-label clips count once for each of their labels, so shares may sum to
  more than 1.
- **Majority label** of a cluster: the label carried by the most members (ties: the label that
  comes first in sorted order).
- **Purity**: (1 / N) * sum over clusters of the members that carry the cluster's majority
  label, N the labelled clips. For single-label data this is the textbook purity
  (Manning et al., *Introduction to Information Retrieval*, sec. 16.3).
- **NMI**: scikit-learn's ``normalized_mutual_info_score`` (arithmetic mean of the two
  entropies) between the cluster ids and each clip's *first* label, the primary class of a
  multi-label clip.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import normalized_mutual_info_score


def _check(assignments: Sequence[int], labels: Sequence[Sequence[str]]) -> list[int]:
    ids = [int(a) for a in np.asarray(assignments).reshape(-1)]
    if len(ids) != len(labels):
        raise ValueError(f"{len(ids)} assignments for {len(labels)} label lists")
    return ids


def label_makeup(labels: Sequence[Sequence[str]]) -> list[tuple[str, float]]:
    """``[(label, share), ...]`` of one cluster's members, largest share first (ties by label).

    Share = members carrying the label / labelled members. Empty for a cluster with no labels.
    """
    labelled = [set(ls) for ls in labels if ls]
    if not labelled:
        return []
    counts = Counter(label for ls in labelled for label in ls)
    return sorted(((lab, n / len(labelled)) for lab, n in counts.items()), key=lambda t: (-t[1], t[0]))


def majority_label(labels: Sequence[Sequence[str]]) -> str | None:
    """The label most members carry (``None`` without labels)."""
    makeup = label_makeup(labels)
    return makeup[0][0] if makeup else None


def cluster_members(assignments: Sequence[int]) -> dict[int, list[int]]:
    """Cluster id -> the clip indices assigned to it, in clip order."""
    out: dict[int, list[int]] = {}
    for i, a in enumerate(np.asarray(assignments).reshape(-1).tolist()):
        out.setdefault(int(a), []).append(i)
    return out


def purity(assignments: Sequence[int], labels: Sequence[Sequence[str]]) -> float | None:
    """Share of labelled clips carrying their cluster's majority label; ``None`` without labels."""
    ids = _check(assignments, labels)
    labelled = [i for i, ls in enumerate(labels) if ls]
    if not labelled:
        return None
    hits = 0
    for members in cluster_members([ids[i] for i in labelled]).values():
        member_labels = [labels[labelled[j]] for j in members]
        top = majority_label(member_labels)
        hits += sum(1 for ls in member_labels if top in ls)
    return hits / len(labelled)


def nmi(assignments: Sequence[int], labels: Sequence[Sequence[str]]) -> float | None:
    """Normalised mutual information between clusters and first labels; ``None`` without labels."""
    ids = _check(assignments, labels)
    labelled = [i for i, ls in enumerate(labels) if ls]
    if not labelled:
        return None
    return float(normalized_mutual_info_score([labels[i][0] for i in labelled], [ids[i] for i in labelled]))
