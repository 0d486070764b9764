"""All figures of a run at once: what ``pcav demo`` writes at its end.

``demo_figures`` draws, for a pre-training run (and optionally the fine-tuning run made from
it): the training curves, the t-SNE of ``manifest``, the reconstructions, the prototype report
and the explanation of one held-out clip, and returns every file it wrote.
"""

from __future__ import annotations

from pathlib import Path

from pcavmae_cli.engine.data.manifest import read_manifest
from pcavmae_cli.engine.viz.curves import curves_for_run
from pcavmae_cli.engine.viz.explain import Explainer
from pcavmae_cli.engine.viz.explain_report import default_folder, render
from pcavmae_cli.engine.viz.prototypes_report import prototypes_report
from pcavmae_cli.engine.viz.reconstruct import reconstruct_for_run
from pcavmae_cli.engine.viz.run import open_run
from pcavmae_cli.engine.viz.tsne import tsne_for_run


def demo_figures(
    run_dir: str | Path,
    manifest: str | Path,
    *,
    finetune_dir: str | Path | None = None,
    clip: str | None = None,
    device: str = "auto",
) -> list[Path]:
    """Every figure of pre-training run ``run_dir``; returns the files written, pictures first.

    Args:
        manifest: the clips of the t-SNE (the run's train manifest shows the clips the prototypes
            were computed on; an eval manifest shows held-out clips).
        finetune_dir: a fine-tuning run made from ``run_dir``: its curves too, and ``explain``
            then shows its prediction and the logit's decomposition over prototypes.
        clip: the clip to explain (default: the first clip of the run's eval manifest, else of
            ``manifest``).
    Written under ``RUN/plots/``: curves.png, tsne.png, reconstruct.png,
    prototypes/{index.html, gallery-granularity*.png, evolution.png},
    explain/CLIP/{explain.png, explain.html, explain.json}; and ``FINETUNE/plots/curves.png``.
    """
    run = open_run(run_dir)
    files = [curves_for_run(run.run_dir)]
    if finetune_dir is not None:
        files.append(curves_for_run(finetune_dir))
    files.append(tsne_for_run(run, manifest, device=device).path)
    files.append(reconstruct_for_run(run, device=device))
    report = prototypes_report(run, device=device)
    files += report.pngs
    eval_manifest = run.cfg.data.eval_manifest
    if clip is None:
        source = eval_manifest if eval_manifest and Path(eval_manifest).is_file() else manifest
        clip = read_manifest(source)[0].id
    explainer = Explainer(finetune_dir or run.run_dir, prototypes_run=run.run_dir, data=manifest, device=device)
    explanation = explainer.explain(clip)
    png, html, data = render(explanation, explainer.train_middle, default_folder(run.plots, explanation.clip_id),
                             list(explainer.names.values()))
    return [*files, png, report.html, html, data]
