"""A run folder's ``README.md``: what the run is and how to use it, so it can be shared as is.

Written by training after every checkpoint (so a stopped run has one too) from what the folder
holds: the recipe (``config.yaml``), the epochs and metrics (``metrics.jsonl``), the labels
(``labels.csv``), the checkpoints. Nothing in it is typed by hand, so it is never stale;
``pcav card RUN`` rewrites it (after ``pcav evaluate`` added results, or for an older run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pcavmae_cli import __version__
from pcavmae_cli.engine.data.manifest import read_label_csv, read_manifest
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.files import atomic_write_text
from pcavmae_cli.engine.run_folder import read_run_recipe
from pcavmae_cli.engine.schema import Recipe
from pcavmae_cli.engine.train.metrics import best_validated, read_metrics, training_hours

CARD = "README.md"
SHOWN_LABELS = 12


def _clips(manifest: str | None) -> str:
    if not manifest:
        return "none"
    try:
        return f"`{manifest}` ({len(read_manifest(manifest))} clips)"
    except (UserError, OSError, ValueError):
        return f"`{manifest}` (not found here)"


def _fmt(value: Any) -> str:
    if isinstance(value, list):  # one value per granularity
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _evaluations(run_dir: Path) -> list[str]:
    """Results ``pcav evaluate`` wrote inside the run folder (``RUN/eval/**/metrics.json``)."""
    lines = []
    for path in sorted(run_dir.glob("eval/**/metrics.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        numbers = {k: v for k, v in (record.get("metrics") or {}).items() if isinstance(v, (int, float))}
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in list(numbers.items())[:6])
        lines.append(f"- `{path.parent.relative_to(run_dir)}` ({record.get('task', '?')} on "
                     f"`{record.get('data', '?')}`): {shown}")  # fmt: skip
    return lines


def card_text(run_dir: Path, cfg: Recipe) -> str:
    """The model card of ``run_dir`` (module docstring)."""
    kind = "fine-tuned classifier" if cfg.finetune is not None else "pre-trained audio-visual encoder"
    epochs = read_metrics(run_dir / "metrics.jsonl", "epoch", strict=False)
    m = cfg.model
    lines = [f"# {run_dir.name}: PCAV-MAE {kind}", "",
             f"Written by pcav {__version__} from this folder's files; `pcav card {run_dir.name}` rewrites it.", ""]  # fmt: skip
    if cfg.description:
        lines += [f"Recipe: {cfg.description}", ""]
    lines += ["## What it is", ""]
    lines.append(f"- model: audio and video encoders of {m.depth_modality} layers + {m.depth_joint} joint layer, "
                 f"width {m.embed_dim}, {m.num_heads} heads, patches {m.patch_size}x{m.patch_size}; "
                 f"inputs {m.audio_frames} fbank frames x {m.mel_bins} Mel bins and {m.image_size} px frames")  # fmt: skip
    if cfg.finetune is not None:
        ft = cfg.finetune
        lines.append(f"- head: {ft.head or 'linear'} on `{ft.mode}` features, task `{cfg.data.label_mode}`; "
                     f"fine-tuned from `{ft.init_from or 'random initialisation'}`")  # fmt: skip
    else:
        protos = cfg.prototypes.num_clusters if cfg.prototypes is not None else None
        lines.append(f"- prototypes: {protos if protos else 'none (CAV-MAE objective)'}")
    lines.append(f"- data: training {_clips(cfg.data.train_manifest)}; validation {_clips(cfg.data.eval_manifest)}; "
                 f"{cfg.data.clip_seconds:g} s clips, fbank mean {cfg.data.audio.fbank.mean:g} / std "
                 f"{cfg.data.audio.fbank.std:g}")  # fmt: skip
    labels = run_dir / "labels.csv"
    if labels.is_file():
        names = read_label_csv(labels).names
        more = f", ... ({len(names)} in all)" if len(names) > SHOWN_LABELS else ""
        lines.append(f"- classes ({len(names)}, in `labels.csv`): {', '.join(names[:SHOWN_LABELS])}{more}")
    lines += ["", "## Training", ""]
    if epochs:
        last = epochs[-1]
        hours = training_hours(epochs)
        lines.append(f"- {len(epochs)} epochs logged (last: epoch {last['epoch']}, step {last['step']}, "
                     f"stage `{last.get('stage')}`), {hours:.2f} h of training time")  # fmt: skip
        parts = {k: v for k, v in last.items() if (k.startswith("loss") or k.startswith("val_")) and v is not None}
        lines.append("- last epoch: " + ", ".join(f"{k} {_fmt(v)}" for k, v in parts.items()))
        validated = best_validated(epochs)
        if validated is not None:
            metric, value, index = validated
            lines.append(f"- best validation {metric}: {_fmt(value)} (epoch {epochs[index]['epoch']}, "
                         "`checkpoints/best`)")  # fmt: skip
    else:
        lines.append("- no epoch finished yet")
    root = run_dir / "checkpoints"
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    lines.append(f"- checkpoints: {', '.join(found) or 'none'}")
    evals = _evaluations(run_dir)
    if evals:
        lines += ["", "## Evaluations", "", *evals]
    lines += ["", "## How to use it", "", "```bash"]
    if cfg.finetune is not None:
        lines += [f"pcav predict -c {run_dir.name} my_video.mp4 --out labels.csv     # top classes of your videos",
                  f"pcav explain my_video.mp4 -c {run_dir.name}                      # which prototypes decide"]  # fmt: skip
    else:
        lines += [f"pcav embed -c {run_dir.name} --videos my_videos/ --out emb/         # clip embeddings",
                  f"pcav finetune --recipe finetune_demo finetune.init_from={run_dir.name}"]  # fmt: skip
    lines += ["```", "", "```python", "import pcavmae_cli", f'model = pcavmae_cli.load("{run_dir.name}")']
    if cfg.finetune is not None:
        lines.append('model.predict("my_video.mp4").top     # [(label, score), ...]')
    lines += ['model.embed("my_video.mp4")["joint"]  # numpy vector', "```", "",
              "The folder is self-contained for prediction and embedding (recipe, weights, labels); a command that "
              "also needs the training data (evaluate's kNN, explain's exemplars) takes `key=value` overrides "
              "where it now lives, e.g. `data.train_manifest=/data/train/manifest.jsonl`.", ""]  # fmt: skip
    return "\n".join(lines)


def write_model_card(run_dir: str | Path, cfg: Recipe | None = None) -> Path:
    """Write ``RUN/README.md`` atomically; ``cfg`` defaults to the run's own ``config.yaml``."""
    run_dir = Path(run_dir)
    if cfg is None:
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"{run_dir} is not a run folder (no config.yaml)")
        cfg = read_run_recipe(run_dir / "config.yaml")
    return atomic_write_text(run_dir / CARD, card_text(run_dir, cfg))
