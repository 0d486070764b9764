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
from pathlib import Path

from bench_runs import HEADS, head_markdown, head_row

from pcavmae_cli.engine import config
from pcavmae_cli.engine.demo import run_demo
from pcavmae_cli.engine.train.checkpoint import find_checkpoint

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
    rows = [head_row(name, out / "runs" / folder, out / "runs" / "pretrain", [*corpus, *o], Path(data["eval_manifest"]))
            for name, (folder, o) in HEADS.items()]  # fmt: skip
    (out / "prototype_head.json").write_text(json.dumps({"seed": args.seed, "rows": rows}, indent=2) + "\n")
    print(head_markdown([rows]))


if __name__ == "__main__":
    main()
