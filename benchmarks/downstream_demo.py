"""Downstream numbers on the demo corpus: PCAV-MAE (`demo`) vs CAV-MAE's objective (`demo_cavmae`).

Both pre-train the demo's tiny model for the same 34 epochs on the same corpus; each is then
evaluated on the held-out clips by fine-tuning (`finetune_demo`, 10-frame averaging), a linear
probe on all training clips and on one clip per class, kNN, and audio<->video retrieval. A
randomly initialised model of the same size is the floor. Not a test: run it on a quiet machine.

    python benchmarks/downstream_demo.py --out /tmp/bench                     # the default demo corpus
    python benchmarks/downstream_demo.py --out /tmp/bench12 --classes 12 --clips-per-class 10

Writes OUT/downstream.json and prints a Markdown table (rates in percent).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_runs import corpus_overrides, pretrain_seconds

from pcavmae_cli.engine import config
from pcavmae_cli.engine.demo import run_demo
from pcavmae_cli.engine.evaluate.runner import evaluate
from pcavmae_cli.engine.train.checkpoint import FINETUNE_FILES, find_checkpoint
from pcavmae_cli.engine.train.finetune import finetune
from pcavmae_cli.engine.train.pretrain import pretrain


def one_per_class(train: Path) -> Path:
    """The first training clip of each class, as a manifest next to the training manifest."""
    lines, seen = [], set()
    for line in train.read_text().splitlines():
        label = json.loads(line)["labels"][0]
        if label not in seen:
            seen.add(label)
            lines.append(line)
    path = train.with_name("one_per_class.jsonl")
    path.write_text("\n".join(lines) + "\n")
    return path


def downstream(name: str, pre_run: Path | None, out: Path, corpus: list[str], train: Path, held_out: Path) -> dict:
    """Fine-tune + evaluate, probes, retrieval of one pre-trained run (None: random init)."""
    row: dict = {"model": name}
    ft_dir = out / "runs" / f"finetune_{name}"
    init = [f"finetune.init_from={pre_run}"] if pre_run else ["finetune.init_from=null"]
    cfg = config.load_recipe("finetune_demo", [f"train.run_dir={ft_dir}", *init, *corpus])
    cfg.train.resume = find_checkpoint(ft_dir, "last", FINETUNE_FILES) is not None
    started = time.perf_counter()
    finetune(cfg)
    row["finetune_seconds"] = round(time.perf_counter() - started, 1)
    classified = evaluate("classification", ft_dir, held_out)
    row["finetune_top1"] = classified.metrics["top1"]
    classified = evaluate("classification", ft_dir, held_out, frames="middle", out=ft_dir / "eval" / "middle")
    row["finetune_top1_middle_frame"] = classified.metrics["top1"]
    probe_run = pre_run if pre_run else out / "runs" / "pretrain"  # random init: any run of the same size
    random_init = pre_run is None
    for task, key, extra in (
        ("linear-probe", "linear_probe_top1", {"train_data": train}),
        ("linear-probe", "linear_probe_1shot_top1", {"train_data": one_per_class(train)}),
        ("knn", "knn_top1", {"train_data": train}),
    ):
        result = evaluate(task, probe_run, held_out, random_init=random_init,
                          out=out / "eval" / name / key, **extra)  # fmt: skip
        row[key] = result.metrics["top1"]
    retrieval = evaluate("retrieval", probe_run, held_out, random_init=random_init, out=out / "eval" / name / "retrieval")
    for key in ("a2v_r1", "a2v_r5", "v2a_r1", "v2a_r5", "a2v_median_rank", "v2a_median_rank"):
        row[key] = retrieval.metrics[key]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--clips-per-class", type=int, default=10)
    parser.add_argument("--eval-per-class", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out

    started = time.perf_counter()
    run_demo(out, seed=args.seed, classes=args.classes, clips_per_class=args.clips_per_class,
             eval_per_class=args.eval_per_class)  # fmt: skip
    demo_seconds = time.perf_counter() - started
    recipe = config.read_yaml(out / "recipe.yaml")
    corpus = corpus_overrides(recipe)
    train, held_out = Path(recipe["data"]["train_manifest"]), Path(recipe["data"]["eval_manifest"])

    base_dir = out / "runs" / "pretrain_cavmae"
    base_cfg = config.load_recipe("demo_cavmae", [f"train.run_dir={base_dir}", *corpus])
    base_cfg.train.resume = find_checkpoint(base_dir, "last") is not None
    started = time.perf_counter()
    pretrain(base_cfg)
    base_seconds = time.perf_counter() - started

    rows = [
        {**downstream("pcavmae", out / "runs" / "pretrain", out, corpus, train, held_out),
         "pretrain_seconds": pretrain_seconds(out / "runs" / "pretrain")},
        {**downstream("cavmae", base_dir, out, corpus, train, held_out), "pretrain_seconds": pretrain_seconds(base_dir)},
        {**downstream("random", None, out, corpus, train, held_out), "pretrain_seconds": 0.0},
    ]  # fmt: skip
    report = {"classes": args.classes, "clips_per_class": args.clips_per_class, "eval_per_class": args.eval_per_class,
              "seed": args.seed, "demo_seconds": round(demo_seconds, 1), "baseline_seconds": round(base_seconds, 1),
              "rows": rows}  # fmt: skip
    (out / "downstream.json").write_text(json.dumps(report, indent=2) + "\n")

    cols = ["finetune_top1", "finetune_top1_middle_frame", "linear_probe_top1", "linear_probe_1shot_top1", "knn_top1",
            "a2v_r1", "a2v_r5", "v2a_r1", "v2a_r5", "a2v_median_rank", "v2a_median_rank", "pretrain_seconds"]  # fmt: skip
    print("| model | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for row in rows:
        cells = [f"{100 * row[c]:.1f}" if c.endswith(("top1", "r1", "r5", "frame")) else f"{row[c]:g}" for c in cols]
        print(f"| {row['model']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
