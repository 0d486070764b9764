"""Figures and explanations (docs/method.md, "Figures and explanations"; PNGs with matplotlib's Agg).

- ``tsne``: t-SNE of clip embeddings by class, prototypes overlaid (the paper's Figure 2).
- ``reconstruct``: masked inputs and reconstructions (eq. 4).
- ``curves``: every quantity of ``metrics.jsonl``.
- ``prototypes_report``: prototype galleries, purity / NMI (``cluster_metrics``), evolution, HTML.
- ``explain`` / ``explain_report`` / ``contributions``: ``pcav explain``.
- ``report.demo_figures``: all of them for ``pcav demo``.
- ``run``, ``draw``, ``exemplars``: loading a run, drawing helpers, exemplar members.
"""
