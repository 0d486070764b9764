"""PCAV-MAE vs CAV-MAE's objective on real media: frozen features per modality, over seeds.

Builds the real-media corpus (``real_media_corpus.py``: 6 classes, each a pair of one of 3
sound categories and one of 3 picture categories, paired in a cycle so that audio alone and
video alone each leave 2 candidates; from Debian packages and scikit-image / matplotlib sample
data; held-out clips from speakers, tracks and pictures training never saw), preprocesses it,
measures the fbank statistics, then pre-trains the demo's tiny model with ``demo`` (PCAV-MAE)
and ``demo_cavmae`` (CAV-MAE's objective) for each seed. Each pre-trained encoder and a
randomly initialised one of the same seed (the floor) is evaluated frozen on the held-out
clips: kNN top-1 and a linear probe on the joint, audio-only and video-only features,
audio<->video retrieval R@1, and kNN of each modality's features against its own factor
(audio -> sound category, video -> picture category: what each modality alone can know), as
they are and centred on the training clips' mean (``audio_diagnosis.py``'s measure), and a
linear probe on the same. Not a test: run it on a quiet machine.

    python benchmarks/real_media.py --out /tmp/real                       # 3 seeds, the recipes' 34 epochs
    python benchmarks/real_media.py --out /tmp/real --seeds 1 --epochs 8  # a quick look
    python benchmarks/real_media.py --out /tmp/real --build-only          # corpus + manifests only
    # the scale at which the audio side learns the sound category (docs/method.md, "More clips
    # and a longer schedule carry it over"): 150 clips per class, 68 epochs, audio augmentation,
    # coarse prototypes
    python benchmarks/real_media.py --out /tmp/real150 --train-per-class 150 --eval-per-class 45 \
        --epochs 68 --set augment.audio_roll=512 augment.freq_mask=48 augment.time_mask=192 \
        --pcavmae-set "prototypes.num_clusters=[3,6]"
    # seeds as parallel processes sharing --out (one compute thread each), PCAV-MAE alone with
    # its heads; then the same command without --only-seed prints the tables over the seeds
    OMP_NUM_THREADS=1 python benchmarks/real_media.py ... --models pcavmae --only-seed 0 &
    # the CAV-MAE objective with PCAV-MAE's instance term (weight 1 at temperature 0.1)
    python benchmarks/real_media.py ... --models cavmae \
        --cavmae-set stages.0.loss.w_infonce=1.0 stages.0.loss.infonce_temperature=0.1

Rerunning with the same --out reuses everything finished: downloads, clips, preprocessed
clips, statistics, pre-training runs (resumed from ``checkpoints/last``) and evaluations
(their ``metrics.json``). Runs are named by recipe, epochs, seed and (a digest of) the
``--set`` / ``--pcavmae-set`` / ``--cavmae-set`` overrides, so a run with other --epochs or
overrides starts its own. When the clips are (re)made (other corpus options, a new corpus
version), the preprocessed clips, runs and evaluations made from the old ones are removed
first.
Writes OUT/real_media.json and prints a Markdown table (percent).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import real_media_corpus as corpus_lib
import torch
from bench_runs import (
    HEADS,
    corpus_keys,
    epoch_overrides,
    head_markdown,
    head_row,
    knn_top1,
    markdown_table,
    pretrain_seconds,
)

from pcavmae_cli.engine import config
from pcavmae_cli.engine.data.manifest import LabelSet, atomic_write_text, read_label_csv, read_manifest, write_label_csv
from pcavmae_cli.engine.data.preprocess import preprocess
from pcavmae_cli.engine.data.stats import fbank_stats
from pcavmae_cli.engine.evaluate.probes import linear_probe
from pcavmae_cli.engine.evaluate.retrieval import retrieval_metrics
from pcavmae_cli.engine.evaluate.runner import checkpoint_recipe, frozen_backbone, manifest_features, open_checkpoint
from pcavmae_cli.engine.folder_lock import folder_lock
from pcavmae_cli.engine.train.runtime import resolve_runtime
from pcavmae_cli.engine.prototypes.step import load_prototypes
from pcavmae_cli.engine.train.checkpoint import find_checkpoint
from pcavmae_cli.engine.train.pretrain import pretrain
from pcavmae_cli.engine.viz.prototypes_report import level_stats
from pcavmae_cli.engine.viz.run import open_run

MODELS = {"pcavmae": "demo", "cavmae": "demo_cavmae"}  # model name -> recipe
TITLES = {"pcavmae": "PCAV-MAE (`demo`)", "cavmae": "CAV-MAE objective (`demo_cavmae`)", "random": "random init"}
FEATURES = ("joint", "audio", "video")
FACTORS = {"sound": "audio", "picture": "video"}  # factor -> the modality that alone can know it
COLUMNS = {
    **{f"knn_{f}": f"kNN {f}" for f in FEATURES},
    **{f"linear_{f}": f"linear {f}" for f in FEATURES},
    "a2v_r1": "a->v R@1", "v2a_r1": "v->a R@1",
    "knn_audio_sound": "kNN audio -> sound", "knn_video_picture": "kNN video -> picture",
    "knn_audio_sound_centred": "kNN audio -> sound, centred",
    "knn_video_picture_centred": "kNN video -> picture, centred",
    "linear_audio_sound": "linear audio -> sound", "linear_video_picture": "linear video -> picture",
}  # fmt: skip


def prepare(out: Path, args: argparse.Namespace) -> dict:
    """Corpus, preprocessed splits, factor manifests and fbank statistics (each step skipped
    when done); returns the paths and statistics the runs need."""
    # --only-seed processes started together share OUT: they take turns here (the preprocessing
    # inside refuses a second writer), and each later one finds the work done and reuses it.
    def say_waiting(holder: str) -> None:
        print(f"  waiting for {holder} to finish preparing {out}", file=sys.stderr)

    with folder_lock(out, on_busy=say_waiting):
        return _prepare(out, args)


def _prepare(out: Path, args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    built = corpus_lib.build_corpus(out / "corpus", out / "sources", train_per_class=args.train_per_class,
                                    eval_per_class=args.eval_per_class, seed=args.corpus_seed, jobs=args.jobs,
                                    progress=lambda clip_id: print(f"  wrote {clip_id}", file=sys.stderr))  # fmt: skip
    if built.n_written:  # new clips: what was made from the old ones (same clip ids) is stale
        for stale in (out / "data", out / "runs", out / "eval"):
            if stale.exists():
                print(f"  the corpus changed: removing {stale}", file=sys.stderr)
                shutil.rmtree(stale)
    cfg = config.load_recipe("demo")
    manifests = {}
    for split in ("train", "eval"):
        report = preprocess(built.segment_csvs[split], out / "data" / split, cfg.data, videos=built.videos,
                            jobs=args.jobs)  # fmt: skip
        expected = sum(c.split == split for c in built.clips)
        if report.n_ok != expected:
            raise SystemExit(f"preprocess {split}: {report.n_ok} of {expected} clips reached {report.manifest} "
                             f"(failures: {dict(report.failures)}; see {report.failures_path})")  # fmt: skip
        manifests[split] = report.manifest
    stats_path = out / "data" / "fbank_stats.json"
    if not stats_path.is_file():
        stats = fbank_stats(manifests["train"], cfg.data)
        atomic_write_text(stats_path, json.dumps({"mean": stats.mean, "std": stats.std, "n_clips": stats.n_clips}))
    stats = json.loads(stats_path.read_text())
    factors = {f: factor_manifests(built, manifests, f) for f in FACTORS}
    return {"corpus": built, "manifests": manifests, "stats": stats, "factors": factors,
            "prepare_seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def factor_manifests(built: corpus_lib.RealCorpus, manifests: dict[str, Path], factor: str) -> dict:
    """Copies of each split's manifest labelled by one factor (``sound`` or ``picture``
    category), next to it (manifest paths are relative to their folder), and their label CSV."""
    category = {c.clip_id: (c.sound if factor == "sound" else c.picture).category for c in built.clips}
    names = corpus_lib.SOUND_CATEGORIES if factor == "sound" else corpus_lib.PICTURE_CATEGORIES
    mids = {n: f"/pcav/real/{factor}/" + n.replace(" ", "_") for n in names}
    label_csv = built.out / f"{factor}_labels.csv"
    write_label_csv(label_csv, LabelSet([mids[n] for n in names], list(names)))
    out = {"label_csv": label_csv}
    for split, path in manifests.items():
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        lines = [json.dumps({**r, "labels": [mids[category[r["id"]]]]}) for r in records]
        out[split] = path.with_name(f"manifest_{factor}.jsonl")
        atomic_write_text(out[split], "\n".join(lines) + "\n")
    return out


def clip_features_of(run: Path, random_init: bool, manifests: dict[str, Path]) -> tuple[dict, dict]:
    """Frozen features ``{split: {name: (N, width)}}`` of each split's clips, embedded as
    ``pcav evaluate`` embeds them (``runner.frozen_backbone``, ``runner.manifest_features``,
    frames ``evaluate.frames``), and the run's ``evaluate`` settings."""
    cp = open_checkpoint(run)
    cfg = checkpoint_recipe(cp.folder)
    rt = resolve_runtime(cfg.train)
    backbone = frozen_backbone(cp, cfg, rt, random_init)
    feats = {split: manifest_features(manifest, backbone, cfg, rt, cfg.evaluate.frames)[0]
             for split, manifest in manifests.items()}  # fmt: skip
    return feats, cfg.evaluate


def targets(manifest: Path, label_csv: Path) -> torch.Tensor:
    """Each clip's class index (single-label manifests), in manifest order."""
    mids = read_label_csv(label_csv).mids
    return torch.tensor([mids.index(r.labels[0]) for r in read_manifest(manifest)])


def frozen_row(run: Path, prepared: dict, out: Path, random_init: bool) -> dict:
    """Every frozen-feature number of one encoder (the run's weights, or a random init), from
    one embedding pass over each split (``out/frozen.json`` keeps them for a rerun). The
    probes are ``pcav evaluate``'s (``probes.knn``, ``probes.linear_probe``,
    ``retrieval.retrieval_metrics``) with the run's ``evaluate`` settings."""
    done = out / "frozen.json"
    if done.is_file():
        kept = json.loads(done.read_text())
        if set(COLUMNS) <= set(kept):  # else written before a column was added: measure again
            return kept
    manifests = prepared["manifests"]
    feats, ev = clip_features_of(run, random_init, manifests)
    tr, te = feats["train"], feats["eval"]
    label_csv = prepared["corpus"].label_csv
    ytr, yte = targets(manifests["train"], label_csv), targets(manifests["eval"], label_csv)

    n = len(read_label_csv(label_csv).mids)

    def linear_top1(x_tr, y_tr, x_te, y_te, classes: int) -> float:
        return linear_probe(x_tr, y_tr, x_te, y_te, "single", num_classes=classes, weight_decay=ev.linear_weight_decay,
                            max_iter=ev.linear_max_iter).metrics["top1"]  # fmt: skip

    row: dict = {}
    for feature in FEATURES:
        row[f"knn_{feature}"] = knn_top1(tr[feature], ytr, te[feature], yte, n, ev)
        row[f"linear_{feature}"] = linear_top1(tr[feature], ytr, te[feature], yte, n)
    for factor, feature in FACTORS.items():
        labelled = prepared["factors"][factor]
        f_tr, f_te = targets(labelled["train"], labelled["label_csv"]), targets(labelled["eval"], labelled["label_csv"])
        n_factor = len(read_label_csv(labelled["label_csv"]).mids)
        row[f"knn_{feature}_{factor}"] = knn_top1(tr[feature], f_tr, te[feature], f_te, n_factor, ev)
        # The same with both splits centred on the training clips' mean (audio_diagnosis.py's
        # measure): a nearly collapsed side's common direction otherwise dominates the cosines.
        mean = tr[feature].mean(0, keepdim=True)
        row[f"knn_{feature}_{factor}_centred"] = knn_top1(tr[feature] - mean, f_tr, te[feature] - mean, f_te,
                                                          n_factor, ev)  # fmt: skip
        # A linear probe (standardised features, a bias) does not depend on where the origin is.
        row[f"linear_{feature}_{factor}"] = linear_top1(tr[feature], f_tr, te[feature], f_te, n_factor)
    retrieval = retrieval_metrics(te["z_a"], te["z_v"], ks=ev.retrieval_ks)
    row.update({k: retrieval[k] for k in ("a2v_r1", "v2a_r1")})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(done, json.dumps(row, indent=2) + "\n")
    return row


HEALTH = {"health_cos_a": "audio mean cos", "health_rank_a": "audio eff. rank", "health_cos_v": "video mean cos",
          "health_rank_v": "video eff. rank", "health_cos_joint": "joint mean cos"}  # fmt: skip


def training_row(run: Path) -> dict:
    """What pre-training itself logged: the last measured representation health (mean pairwise
    cosine, effective rank) and, for a run with prototypes, the purity and NMI of each
    granularity's clusters against the class labels at the first and the last E-step."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    measured = [r for r in lines if r["kind"] == "epoch" and r.get("health_cos_a") is not None]
    row = {k: measured[-1][k] for k in HEALTH} if measured else {}
    view = open_run(run, need_checkpoint=False)
    epochs = view.prototype_epochs()
    if epochs:
        labels = [list(r.labels) for r in view.train_clips()[1]]
        for when, epoch in (("first", epochs[0]), ("last", epochs[-1])):
            for level, protos in enumerate(load_prototypes(run / "prototypes", epoch)):
                stats = level_stats(protos, labels, level, epoch)
                row[f"nmi{level}_{when}"], row[f"purity{level}_{when}"] = stats.nmi, stats.purity
                row[f"k{level}"] = stats.k
    return row


def overrides_suffix(extra: list[str]) -> str:
    """``""`` without recipe overrides, else ``_`` and 8 hex digits of their digest: part of the
    run and evaluation folder names, so runs with other settings never resume (or reuse the
    evaluation of) each other."""
    return f"_{hashlib.sha1(chr(10).join(extra).encode()).hexdigest()[:8]}" if extra else ""


def model_overrides(model: str, both: list[str], own: dict[str, list[str]]) -> list[str]:
    """The recipe overrides of ``model``'s pre-training: those for both objectives, then its own
    (applied later, so they win)."""
    return [*both, *own.get(model, [])]


def model_title(model: str, own: list[str]) -> str:
    """The table title of ``model``, naming the overrides only it got: two variants of one
    objective never print under the same name."""
    title = TITLES[model]
    return f"{title[:-1]}, {' '.join(own)})" if own and title.endswith(")") else title


def run_name(model: str, n_epochs: int, seed: int, extra: list[str]) -> str:
    """``MODEL_eEPOCHS_sSEED`` and the overrides' suffix."""
    return f"{model}_e{n_epochs}_s{seed}{overrides_suffix(extra)}"


def run_seed(model: str, seed: int, prepared: dict, out: Path, epochs: int | None, extra: list[str]) -> Path:
    """Pre-train ``model`` with ``seed`` and the recipe overrides ``extra`` (applied last), resumed,
    or left alone when finished; its run folder."""
    recipe = MODELS[model]
    base = config.load_recipe(recipe)
    n_epochs = epochs or sum(s.epochs for s in base.stages)
    run = out / "runs" / run_name(model, n_epochs, seed, extra)
    stats, manifests = prepared["stats"], prepared["manifests"]
    keys = corpus_keys(manifests["train"], manifests["eval"], prepared["corpus"].label_csv, stats["mean"], stats["std"])
    overrides = [f"train.run_dir={run}", f"seed={seed}", *keys]
    if base.prototypes is not None:
        overrides.append(f"prototypes.seed={seed}")
    if epochs is not None:
        overrides += epoch_overrides(base, epochs)
    cfg = config.load_recipe(recipe, [*overrides, *extra])
    cfg.train.resume = find_checkpoint(run, "last") is not None
    pretrain(cfg)
    return run


def head_rows(run: Path, prepared: dict, out: Path) -> list[dict]:
    """The pre-trained ``run`` fine-tuned with each head of ``bench_runs.HEADS`` on the 6
    classes: held-out top-1 and faithfulness (``bench_runs.head_row``)."""
    stats, manifests = prepared["stats"], prepared["manifests"]
    keys = corpus_keys(manifests["train"], manifests["eval"], prepared["corpus"].label_csv, stats["mean"], stats["std"])
    return [head_row(name, out / "runs" / f"{run.name}_{folder}", run, [*keys, *o], manifests["eval"])
            for name, (folder, o) in HEADS.items()]  # fmt: skip


def check_corpus(prepared: dict) -> dict:
    """Counts per split and class, and clip durations from the manifests: the corpus as built."""
    counts: dict = {}
    for clip in prepared["corpus"].clips:
        counts.setdefault(clip.split, {}).setdefault(clip.cls.name, 0)
        counts[clip.split][clip.cls.name] += 1
    durations = []
    for path in prepared["manifests"].values():
        durations += [json.loads(x)["duration"] for x in path.read_text().splitlines() if x.strip()]
    units = {split: sorted({u.name for c in prepared["corpus"].clips if c.split == split
                            for u in (c.sound, c.picture, c.background)})
             for split in ("train", "eval")}  # fmt: skip
    return {"clips": counts, "duration_min": min(durations), "duration_max": max(durations),
            "n_units": {s: len(u) for s, u in units.items()},
            "shared_units": sorted(set(units["train"]) & set(units["eval"]))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=3, help="pre-training seeds 0..N-1 per model")
    parser.add_argument("--only-seed", type=int, default=None,
                        help="run this one seed (several processes can share an --out, one seed each); "
                             "a later run with --seeds N reuses their results")
    parser.add_argument("--epochs", type=int, default=None, help="epochs in all (default: the recipes' own)")
    parser.add_argument("--train-per-class", type=int, default=15)
    parser.add_argument("--eval-per-class", type=int, default=5)
    parser.add_argument("--corpus-seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="clips encoded / preprocessed at once")
    parser.add_argument("--build-only", action="store_true", help="stop after the corpus and its manifests")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                        help="objectives to pre-train (default both; e.g. pcavmae alone for its heads); the random "
                             "encoders come with pcavmae")
    parser.add_argument("--no-heads", dest="heads", action="store_false",
                        help="skip fine-tuning each PCAV-MAE run with the linear and prototype heads")
    parser.add_argument("--set", dest="set_all", nargs="+", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for both models' pre-training (e.g. augment.audio_roll=512)")
    parser.add_argument("--pcavmae-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for PCAV-MAE only (e.g. prototypes.num_clusters=[3,6])")
    parser.add_argument("--cavmae-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for the CAV-MAE objective only (e.g. "
                             "stages.0.loss.infonce_temperature=0.1)")
    args = parser.parse_args()
    if args.seeds < 1 or (args.epochs is not None and args.epochs < 2):  # demo has 2 stages
        parser.error("--seeds must be >= 1 and --epochs >= 2")
    if args.train_per_class < 1 or args.eval_per_class < 1:
        parser.error("--train-per-class and --eval-per-class must be >= 1")
    out = args.out

    prepared = prepare(out, args)
    check = check_corpus(prepared)
    print(json.dumps({"corpus": check, "fbank": prepared["stats"]}, indent=2))
    if args.build_only:
        return
    rows: dict[str, list[dict]] = {"pcavmae": [], "cavmae": [], "random": []}
    heads: dict[int, list[dict]] = {}
    own = {"pcavmae": args.pcavmae_set, "cavmae": args.cavmae_set}  # each objective's own overrides
    for seed in [args.only_seed] if args.only_seed is not None else range(args.seeds):
        for model in args.models:
            extra = model_overrides(model, args.set_all, own)
            run = run_seed(model, seed, prepared, out, args.epochs, extra)
            row = frozen_row(run, prepared, out / "eval" / run.name, random_init=False)
            rows[model].append({"seed": seed, "run": str(run), "pretrain_seconds": pretrain_seconds(run), **row,
                                **training_row(run)})  # fmt: skip
            if model == "pcavmae" and args.heads:
                heads[seed] = head_rows(run, prepared, out)
            if model == "pcavmae":  # the floor: a random encoder initialised with the same seed
                floor = frozen_row(run, prepared, out / "eval" / f"random_s{seed}{overrides_suffix(extra)}",
                                   random_init=True)  # fmt: skip
                rows["random"].append({"seed": seed, "run": None, "pretrain_seconds": 0.0, **floor})
    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "corpus": check, "fbank": prepared["stats"], "columns": COLUMNS, "rows": rows, "heads": heads}  # fmt: skip
    atomic_write_text(out / "real_media.json", json.dumps(report, indent=2) + "\n")
    titles = {m: model_title(m, own.get(m, [])) for m in TITLES}
    by_model = {titles[m]: r for m, r in rows.items() if r}
    per_class = {k: v for k, v in COLUMNS.items() if "->" not in v}  # the 6 classes
    per_factor = {k: v for k, v in COLUMNS.items() if "->" in v}  # retrieval, each modality's factor
    print(markdown_table(by_model, per_class) + "\n" + markdown_table(by_model, per_factor))
    trained = {titles[m]: rows[m] for m in args.models}
    print(markdown_table(trained, HEALTH, percent=False))
    levels = sorted({k[3:-5] for r in rows["pcavmae"] for k in r if k.startswith("nmi") and k.endswith("_last")})
    if not levels:  # no PCAV-MAE runs (--models cavmae): no prototypes to score
        return
    first = rows["pcavmae"][0]  # each level named by its K (rows written before K was kept: by level)
    sizes = {lvl: f"K={first[f'k{lvl}']}" if f"k{lvl}" in first else f"level {lvl}" for lvl in levels}
    quality = {f"{m}{lvl}_{w}": f"{m.upper() if m == 'nmi' else m} {sizes[lvl]} {w}" for lvl in levels
               for m in ("nmi", "purity") for w in ("first", "last")}  # fmt: skip
    print(markdown_table({titles["pcavmae"]: rows["pcavmae"]}, quality, percent=False))
    if heads:  # fine-tuned from each PCAV-MAE run: mean +- std over the seeds
        print(head_markdown(list(heads.values()), sizes))


if __name__ == "__main__":
    main()
