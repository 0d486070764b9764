"""`pcav embed`: the same clip gives the same embeddings from a manifest or from its video file;
interrupted runs resume; both output formats; fine-tuning checkpoints too.

The checkpoints are tiny CAV-MAE models imported with `pcav convert` (no training needed).
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import safetensors.torch as st
import torch
import torch.nn.functional as F

from pcavmae_cli.engine import config
from pcavmae_cli.engine.convert import convert_cavmae
from pcavmae_cli.engine.data.preprocess import preprocess
from pcavmae_cli.engine.embed import embed, work_folder
from pcavmae_cli.engine.errors import UserError
from tests.cavmae_reference import checkpoint_state
from tests.cli_helpers import pcav
from tests.tiny_corpus import TINY_MODEL
from tests.test_cavmae_import import OVERRIDES, reference_finetune, reference_pretrain

RUN = [*OVERRIDES, "data.loader.batch_size=2", "data.loader.num_workers=0", "train.device=cpu", "data.preprocess.jobs=2"]
FEATURES = ("z_a", "z_v", "joint", "audio", "video")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, mp4_factory):
    root = tmp_path_factory.mktemp("embed")
    torch.save(checkpoint_state(reference_pretrain()), root / "pt.pth")
    run = convert_cavmae(root / "pt.pth", root / "run", overrides=RUN).out
    videos = root / "videos"
    for i, tone in enumerate(("0.5*sin(2*PI*300*t)", "0.5*sin(2*PI*900*t)", "0.3*sin(2*PI*2000*t)")):
        mp4_factory(videos / f"clip {i}.mp4", 2.0, size="64x48", tone=tone)
    cfg = config.load_recipe(str(run / "config.yaml"))
    manifest = preprocess(videos, root / "pre", cfg.data, jobs=2).manifest
    return root, run, videos, manifest


def npy(folder):
    return {name: np.load(folder / f"{name}.npy") for name in FEATURES}


def index_ids(path):
    with path.open() as fh:
        return [row["id"] for row in csv.DictReader(fh)]


def test_a_clip_embeds_the_same_from_a_manifest_or_its_video_file(setup, tmp_path):
    root, run, videos, manifest = setup
    by_manifest = embed(run, tmp_path / "m", data=manifest, frames="all")
    by_video = embed(run, tmp_path / "v.safetensors", videos=videos, frames="all")
    assert by_manifest.n_clips == by_video.n_clips == 3
    a, b = npy(tmp_path / "m"), st.load_file(str(tmp_path / "v.safetensors"))
    for name in FEATURES:
        assert a[name].shape == (3, 32)
        assert np.array_equal(a[name], b[name].numpy()), name
    assert index_ids(tmp_path / "m" / "index.csv") == index_ids(tmp_path / "v.csv") == ["clip_0", "clip_1", "clip_2"]
    assert not np.allclose(a["audio"][0], a["audio"][1])  # different sounds, different embeddings
    assert not work_folder(tmp_path / "v.safetensors").exists()
    sidecar = json.loads((tmp_path / "m" / "embed.json").read_text())
    assert sidecar["precision"] == "fp32" and sidecar["widths"]["joint"] == 32  # a 32-wide model: fp32 everywhere


def test_an_interrupted_run_resumes_from_its_chunks(setup, tmp_path):
    root, run, videos, manifest = setup

    def stop_after_second(number):
        if number == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed(run, tmp_path / "out", videos=videos, chunk=1, on_chunk=stop_after_second)
    assert len(list((work_folder(tmp_path / "out") / "chunks").glob("chunk-*.safetensors"))) == 2
    resumed = embed(run, tmp_path / "out", videos=videos, chunk=1)
    assert (resumed.chunks_skipped, resumed.chunks_done) == (2, 1)
    whole = embed(run, tmp_path / "whole", data=manifest, chunk=1)  # the same batches, so the same bits
    for name in FEATURES:
        assert np.array_equal(npy(tmp_path / "out")[name], npy(tmp_path / "whole")[name]), name
    assert whole.chunks_skipped == 0


def test_a_finetuning_checkpoint_gives_its_encoder_features(setup, tmp_path):
    root, _, _, manifest = setup
    torch.save(checkpoint_state(reference_finetune()), tmp_path / "ft.pth")
    run = convert_cavmae(tmp_path / "ft.pth", tmp_path / "ft", overrides=RUN).out
    feats = npy(embed(run, tmp_path / "e", data=manifest).out)
    torch.testing.assert_close(torch.from_numpy(feats["z_a"]), F.normalize(torch.from_numpy(feats["audio"]), dim=-1))


def test_embed_needs_exactly_one_source(setup, tmp_path):
    _, run, videos, manifest = setup
    with pytest.raises(UserError, match="exactly one of --data MANIFEST and --videos DIR"):
        embed(run, tmp_path / "x", data=manifest, videos=videos)
    result = pcav("embed", "--checkpoint", str(run), "--out", str(tmp_path / "x"))
    assert result.returncode == 1 and result.stderr.strip().startswith("error: give exactly one of")
    assert len(result.stderr.strip().splitlines()) == 1


def test_converted_checkpoints_work_with_finetune_and_evaluate(setup, tmp_path):
    from pcavmae_cli.engine.evaluate.runner import evaluate
    from pcavmae_cli.engine.train.finetune import finetune
    from tests.tiny_corpus import write_corpus

    _, run, _, manifest = setup
    retrieval = evaluate("retrieval", run, manifest, out=tmp_path / "r")
    assert retrieval.checkpoint.kind == "pretrain" and (tmp_path / "r" / "metrics.json").is_file()
    train = write_corpus(tmp_path / "corpus", classes=2, per_class=2)
    cfg = config.load_recipe("finetune_cavmae", [
        *RUN, f"finetune.init_from={run}", f"data.train_manifest={train}", "data.eval_manifest=null",
        f"data.label_csv={tmp_path / 'corpus' / 'labels.csv'}", "finetune.epochs=1", "finetune.average_from_epoch=null",
        "finetune.balanced_sampling=false", "finetune.freq_mask=8", "finetune.time_mask=16", "optim.effective_batch=2", f"train.run_dir={tmp_path / 'ft'}",
    ])  # fmt: skip
    result = finetune(cfg)
    assert cfg.model.pos_embed == "learned" and "encoder_a.pos_embed" in result.init.loaded  # CAV-MAE's tr_pos
    scored = evaluate("classification", tmp_path / "ft", train, out=tmp_path / "c")
    assert scored.checkpoint.kind == "finetune" and scored.record["n_clips"] == 4
    assert (tmp_path / "c" / "metrics.json").is_file()


def test_bf16_embedding_casts_each_weight_once_for_all_batches():
    """``clip_features`` (what ``pcav embed`` runs per chunk) runs its batches in one autocast
    context, so a weight is cast to bf16 on the first batch and taken from autocast's cache after
    it: the casts of three batches are those of one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pcavmae_cli.engine.evaluate.predict import clip_features
    from pcavmae_cli.engine.model import PCAVMAE
    from pcavmae_cli.engine.train.runtime import Runtime

    cfg = config.load_recipe("demo", TINY_MODEL)
    backbone = PCAVMAE(cfg.model).backbone.eval()
    weight_shapes = {tuple(p.shape) for p in backbone.parameters() if p.dim() == 2}

    class CountCasts(TorchDispatchMode):
        casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "_to_copy" and tuple(args[0].shape) in weight_shapes:
                CountCasts.casts += 1
            return func(*args, **(kwargs or {}))

    def batch(index: int) -> dict:
        g = torch.Generator().manual_seed(index)
        frames = torch.randint(0, 255, (2, 3, 16, 16), generator=g, dtype=torch.uint8)
        index_rows = torch.tensor([2 * index, 2 * index + 1])
        return {"fbank": torch.randn(2, 32, 8, generator=g), "frames": frames, "index": index_rows}

    rt = Runtime(torch.device("cpu"), torch.bfloat16)
    counts = []
    for batches in (1, 3):
        CountCasts.casts = 0
        with CountCasts():
            feats = clip_features(backbone, [batch(i) for i in range(batches)], rt, data=cfg.data, rows=2 * batches)
        counts.append(CountCasts.casts)
        assert feats["joint"].shape == (2 * batches, 16) and feats["joint"].abs().sum(1).min() > 0
    assert counts[0] > 0 and counts[1] == counts[0]
