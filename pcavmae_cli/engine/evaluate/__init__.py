"""Evaluation as pure functions on scores and embeddings (docs/method.md, "Evaluation").

- ``metrics``: mAP / mean AUC / d' (multi-label), top-1 / top-5 (single-label), per-class rows.
- ``retrieval``: CAV-MAE's audio<->video retrieval, R@1/5/10 and median rank.
- ``probes``: frozen-feature linear probe (L-BFGS logistic regression) and cosine kNN.
"""

from pcavmae_cli.engine.evaluate.metrics import (
    ClassRow,
    classification_metrics,
    d_prime,
    multilabel_metrics,
    per_class_ap_auc,
    singlelabel_metrics,
    topk_hits,
)
from pcavmae_cli.engine.evaluate.probes import ProbeResult, knn, linear_probe, standardise
from pcavmae_cli.engine.evaluate.retrieval import (
    pair_ranks,
    rank_metrics,
    retrieval_metrics,
    similarity_matrix,
)

__all__ = [
    "ClassRow",
    "ProbeResult",
    "classification_metrics",
    "d_prime",
    "knn",
    "linear_probe",
    "multilabel_metrics",
    "pair_ranks",
    "per_class_ap_auc",
    "rank_metrics",
    "retrieval_metrics",
    "similarity_matrix",
    "singlelabel_metrics",
    "standardise",
    "topk_hits",
]
