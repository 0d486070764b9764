"""Where along each modality's path the information about its own category is, and what else it encodes.

The measurement behind docs/method.md ("When one modality learns nothing"). For pre-trained runs
of the real-media benchmark (``real_media.py``'s OUT folder) and a randomly initialised encoder
of the same seed, each stage of the audio path (fbank statistics, patch embedding, audio
encoder, the joint layer's audio stream, the contrastive projection z_a) and of the video path
is probed with kNN (``probes.knn``, the recipe's ``evaluate`` settings, features centred on the
training mean):

- **held-out**: training clips -> held-out clips (speakers, tracks and pictures never seen),
  against the modality's own factor (audio: sound category, video: picture category);
- **seen units**: half of the training clips -> the other half (every class and unit in both
  halves), against the sound category, the picture category and the source units: what the
  features encode on the data pre-training saw;
- the mean pairwise cosine of the held-out features before centring (near 1: they all point
  one way, what `pcav visualize health` flags).

``--supervised`` adds the ceiling of the encoder itself: the same tiny audio (or video) encoder
trained from scratch *with labels* on the training clips' factor (``finetune_demo``, one
modality, no augmentation), scored on the held-out clips. An objective cannot be expected to
beat it; if it is near the random encoder's kNN, the corpus is too small or too hard for the
model, whatever the objective.

    python benchmarks/audio_diagnosis.py --out /tmp/real runs/pcavmae_e34_s0 runs/cavmae_e34_s0
    python benchmarks/audio_diagnosis.py --out /tmp/real runs/pcavmae_e34_s0 --supervised
    python benchmarks/audio_diagnosis.py --out /tmp/real runs/pcavmae_e34_s0 --cross-modal-ceiling

``--cross-modal-ceiling`` trains the tiny audio encoder from scratch with the *picture* category
as its label (``finetune_demo``, audio only, SpecAugment and fbank noise against memorising
recordings) and diagnoses its features like a run's. That label is what the cross-modal
objectives can tell the audio side at best: the picture category the sound goes with, which on
this corpus rules out one picture category in three. If that encoder's audio features know the
*sound* category well above a random encoder's, the corpus carries enough audio-visual signal
for the audio side to learn, and an objective that does not is not using it.

Run paths are relative to OUT. Prints one table per run and writes OUT/audio_diagnosis.json.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from bench_runs import corpus_keys, knn_top1

from pcavmae_cli.engine import config
from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.data.manifest import atomic_write_text, read_label_csv, read_manifest
from pcavmae_cli.engine.data.model_inputs import model_inputs
from pcavmae_cli.engine.evaluate.runner import checkpoint_recipe, evaluate, frozen_backbone, open_checkpoint
from pcavmae_cli.engine.model.backbone import Backbone
from pcavmae_cli.engine.model.embed import audio_image
from pcavmae_cli.engine.schema import Recipe
from pcavmae_cli.engine.train.finetune import finetune
from pcavmae_cli.engine.train.runtime import Runtime, resolve_runtime

FACTS = ("sound_category", "picture_category", "sound_unit", "picture_unit")


@torch.no_grad()
def stage_features(bb: Backbone, manifest: Path, cfg: Recipe, rt: Runtime) -> dict[str, torch.Tensor]:
    """Clip-level features at each stage of both paths (token means), middle frame, no masking."""
    ds = AudioVisualDataset(manifest, cfg.data, frames="middle", compact=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)
    rows: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        x = model_inputs(batch, cfg.data, rt.device)
        fbank, frames = x["fbank"], x["frames"]
        frames = frames.unsqueeze(1) if frames.dim() == 4 else frames
        out = {"audio: fbank mean+std": torch.cat([fbank.mean(1), fbank.std(1)], 1)}
        patches = bb.encoder_a.embed(audio_image(fbank))
        out["audio: patch embedding"] = patches.mean(1)
        tokens = bb.encoder_a(patches)
        out["audio: encoder"] = tokens.mean(1)
        pooled = bb.joint(tokens, "a").mean(1)
        out["audio: joint layer (a)"] = pooled
        out["audio: z_a"] = F.normalize(bb.proj_a(pooled), dim=-1)
        tokens = bb.encoder_v(bb.encoder_v.embed(frames.flatten(0, 1)))
        out["video: encoder"] = tokens.mean(1)
        pooled = bb.joint(tokens, "v").mean(1)
        out["video: joint layer (v)"] = pooled
        out["video: z_v"] = F.normalize(bb.proj_v(pooled), dim=-1)
        for name, value in out.items():
            rows.setdefault(name, []).append(value.float().cpu())
    return {name: torch.cat(parts) for name, parts in rows.items()}


def codes(values: list[str], names: list[str]) -> torch.Tensor:
    """Each value's index in ``names`` (the training split's values, so both splits agree)."""
    return torch.tensor([names.index(v) for v in values])


def percent_knn(xtr, ytr, xte, yte, n: int, ev) -> float:
    return round(100 * knn_top1(xtr, ytr, xte, yte, n, ev), 1)


def diagnose(out: Path, run: Path, random_init: bool) -> dict:
    cp = open_checkpoint(run)
    cfg = checkpoint_recipe(cp.folder)
    rt = resolve_runtime(cfg.train)
    load = fine_tuned_backbone if cp.kind == "finetune" else frozen_backbone
    backbone = load(cp, cfg, rt, random_init).eval()
    clips = {r["clip_id"]: r for r in csv.DictReader(io.StringIO((out / "corpus" / "clips.csv").read_text()))}
    feats, facts = {}, {}
    for split in ("train", "eval"):
        manifest = out / "data" / split / "manifest.jsonl"
        ids = [r.id for r in read_manifest(manifest)]
        feats[split] = stage_features(backbone, manifest, cfg, rt)
        facts[split] = {f: [clips[i][f] for i in ids] for f in FACTS}
        facts[split]["cycle"] = [int(i[4:8]) for i in ids]  # clip number: classes take turns
    ev, n_classes = cfg.evaluate, len(corpus_classes(out))
    # Seen units: whole turns of the classes (6 consecutive clips) alternate between the halves,
    # so both halves hold every class and, over the turns, every unit pair.
    first = torch.tensor([(c // n_classes) % 2 == 0 for c in facts["train"]["cycle"]])
    table = {}
    for name, xtr in feats["train"].items():
        xte = feats["eval"][name]
        unit = F.normalize(xte, dim=1)  # the raw features' directions
        mean = xtr.mean(0, keepdim=True)
        xtr, xte = xtr - mean, xte - mean
        own = "sound_category" if name.startswith("audio") else "picture_category"
        names = sorted(set(facts["train"][own]))
        ytr, yte = codes(facts["train"][own], names), codes(facts["eval"][own], names)
        row = {"held-out": percent_knn(xtr, ytr, xte, yte, len(names), ev),
               "mean cos": round(float((unit @ unit.T).mean()), 2)}  # fmt: skip
        for fact in FACTS:
            names = sorted(set(facts["train"][fact]))
            y = codes(facts["train"][fact], names)
            row[f"seen: {fact}"] = percent_knn(xtr[first], y[first], xtr[~first], y[~first], len(names), ev)
        table[name] = row
    return table


def corpus_classes(out: Path) -> list[str]:
    return read_label_csv(out / "corpus" / "class_labels_indices.csv").mids


def supervised(out: Path, modality: str, factor: str | None = None, augment: bool = False) -> float:
    """Held-out top-1 of the tiny encoder of one modality trained from scratch with labels on
    ``factor`` (default: its own, the ceiling an objective could reach with this model and these
    clips); ``augment``: SpecAugment and fbank noise. The run is OUT/supervised/FACTOR[-MODALITY-aug]."""
    factor = factor or ("sound" if modality == "a" else "picture")
    stats = json.loads((out / "data" / "fbank_stats.json").read_text())
    train, held_out = (out / "data" / s / f"manifest_{factor}.jsonl" for s in ("train", "eval"))
    labels = out / "corpus" / f"{factor}_labels.csv"
    run = supervised_run(out, modality, factor, augment)
    masks = ["finetune.freq_mask=48", "finetune.time_mask=192", "finetune.audio_noise=true"] if augment else [
             "finetune.freq_mask=0", "finetune.time_mask=0", "finetune.audio_noise=false"]  # fmt: skip
    overrides = [*corpus_keys(train, held_out, labels, stats["mean"], stats["std"]), f"train.run_dir={run}",
                 "finetune.init_from=null", f"finetune.mode={modality}", "finetune.epochs=30",
                 "finetune.eval_every_epochs=30", "finetune.mixup=0", *masks, "finetune.label_smoothing=0"]  # fmt: skip
    if not (run / "eval" / "metrics.json").is_file():
        resume = (run / "checkpoints" / "last").is_dir()  # trained, not yet scored, or killed: go on
        finetune(config.load_recipe("finetune_demo", [*overrides, f"train.resume={str(resume).lower()}"]))
        evaluate("classification", run, held_out, labels_csv=labels, out=run / "eval")
    return round(100 * json.loads((run / "eval" / "metrics.json").read_text())["metrics"]["top1"], 1)


def supervised_run(out: Path, modality: str, factor: str, augment: bool) -> Path:
    own = factor == ("sound" if modality == "a" else "picture")
    return out / "supervised" / (factor if own and not augment else f"{factor}-{modality}{'-aug' if augment else ''}")


def fine_tuned_backbone(cp, cfg: Recipe, rt: Runtime, random_init: bool) -> Backbone:
    """A fine-tuning checkpoint's encoders and joint layer (its head dropped; the contrastive
    projections, which fine-tuning does not have, stay at their initialisation)."""
    backbone = frozen_backbone(cp, cfg, rt, random_init=True)
    if not random_init:
        weights = safetensors.torch.load_file(str(cp.folder / "model.safetensors"))
        backbone.load_state_dict({k: v for k, v in weights.items() if not k.startswith("head.")}, strict=False)
    return backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="real_media.py's output folder")
    parser.add_argument("runs", nargs="+", help="pre-training run folders, relative to --out")
    parser.add_argument("--supervised", action="store_true", help="also train each modality's encoder with labels")
    parser.add_argument("--cross-modal-ceiling", action="store_true",
                        help="also train the audio encoder on the picture category and diagnose it")  # fmt: skip
    args = parser.parse_args()
    report = {}
    if args.cross_modal_ceiling:
        top1 = report["audio encoder trained on the picture category: held-out top-1"] = supervised(args.out, "a", "picture", True)
        print(f"audio encoder trained on the picture category: held-out top-1 on it {top1} %")
        args.runs.append(str(supervised_run(args.out, "a", "picture", True).relative_to(args.out)))
    for i, name in enumerate(args.runs):
        todo = [(name, False)] + ([(f"random init (seed of {name})", True)] if i == 0 else [])
        for title, random_init in todo:
            table = diagnose(args.out, args.out / name, random_init)
            report[title] = table
            columns = list(next(iter(table.values())))
            print(f"\n{title}\n| stage | " + " | ".join(columns) + " |\n" + "|---" * (len(columns) + 1) + "|")
            for stage, row in table.items():
                print(f"| {stage} | " + " | ".join(str(row[c]) for c in columns) + " |")
    if args.supervised:
        report["supervised from scratch"] = {m: supervised(args.out, m) for m in ("a", "v")}
        print("\nsupervised from scratch, held-out top-1 on the own factor:", report["supervised from scratch"])
    atomic_write_text(args.out / "audio_diagnosis.json", json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
