"""The prototype head against the linear head on the demo corpus: accuracy and faithfulness.

`pcav demo`'s pre-training run (reused when OUT already holds it) is fine-tuned three times with
`finetune_demo`: the linear head, the prototype head with frozen prototypes, and with trainable
ones. Each is evaluated on the held-out clips (top-1, 10-frame averaging) and explained clip by
clip (`pcav explain`'s numbers, docs/method.md "Faithfulness"): the mean prototype share of the
top logit, and the mean logit drop when the 3 top-contributing prototypes are removed vs 3 random
others, per granularity. Not a test: run it on a quiet machine.

    python benchmarks/prototype_head_demo.py --out /tmp/bench_heads

Writes OUT/prototype_head.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from pcavmae_cli.engine import config
from pcavmae_cli.engine.data.manifest import read_manifest
from pcavmae_cli.engine.demo import run_demo
from pcavmae_cli.engine.evaluate.runner import evaluate
from pcavmae_cli.engine.train.checkpoint import FINETUNE_FILES, find_checkpoint
from pcavmae_cli.engine.train.finetune import finetune
from pcavmae_cli.engine.viz.explain import Explainer

HEADS = {  # name: (run folder, overrides)
    "linear": ("finetune_linear", ["finetune.head=linear"]),
    "prototype (frozen)": ("finetune_prototype", ["finetune.head=prototype",
                                                  "finetune.prototype_head.trainable_prototypes=false"]),
    "prototype (trainable)": ("finetune_prototype_trainable", ["finetune.head=prototype",
                                                               "finetune.prototype_head.trainable_prototypes=true"]),
}  # fmt: skip


def mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.fmean(values), 3) if values else None


def head_row(name: str, folder: str, overrides: list[str], out: Path, corpus: list[str], held_out: Path) -> dict:
    run = out / "runs" / folder
    cfg = config.load_recipe("finetune_demo", [f"train.run_dir={run}", f"finetune.init_from={out / 'runs' / 'pretrain'}",
                                               *corpus, *overrides])  # fmt: skip
    cfg.train.resume = find_checkpoint(run, "last", FINETUNE_FILES) is not None
    finetune(cfg)
    top1 = evaluate("classification", run, held_out, out=run / "eval").metrics["top1"]
    explainer = Explainer(run, data=held_out, device="cpu", top=1, exemplars=0)
    per_level: dict[int, dict[str, list]] = {}
    for record in read_manifest(held_out):
        for f in explainer.explain(record.id).prediction.faithfulness:
            level = per_level.setdefault(f.level, {"share": [], "top": [], "random": []})
            level["share"].append(f.share)
            level["top"].append(f.deletion.top_logit_drop)
            level["random"].append(f.deletion.random_logit_drop)
    return {"head": name, "top1": round(top1, 3),
            "levels": {lvl: {k: mean(v) for k, v in d.items()} for lvl, d in per_level.items()}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out
    if find_checkpoint(out / "runs" / "pretrain", "last") is None:
        run_demo(out, seed=args.seed, finetune_overrides=["finetune.epochs=1"])
    recipe = config.read_yaml(out / "recipe.yaml")
    data = recipe["data"]
    corpus = [f"data.train_manifest={data['train_manifest']}", f"data.eval_manifest={data['eval_manifest']}",
              f"data.label_csv={data['label_csv']}", f"data.audio.fbank.mean={data['audio']['fbank']['mean']}",
              f"data.audio.fbank.std={data['audio']['fbank']['std']}"]  # fmt: skip
    rows = [head_row(name, folder, o, out, corpus, Path(data["eval_manifest"])) for name, (folder, o) in HEADS.items()]
    (out / "prototype_head.json").write_text(json.dumps({"seed": args.seed, "rows": rows}, indent=2) + "\n")
    print("| head | top-1 | granularity | prototype share | logit drop, top 3 removed | logit drop, 3 random removed |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        for level, m in row["levels"].items():
            print(f"| {row['head']} | {row['top1']:.3f} | {level} | {m['share']} | {m['top']} | {m['random']} |")


if __name__ == "__main__":
    main()
