"""Every file pcav writes has the mode the user's umask gives, like ``config.yaml`` always had.

safetensors (0.8 and later) and ``tempfile.mkstemp`` make owner-only files on their own, which
would hide a run's weights, prototypes and embeddings from colleagues on a shared cluster.
One walk over a finished tiny run folder and preprocess, pack and embed outputs, under two umasks.
"""

from __future__ import annotations

import os
import stat

import pytest

from pcavmae_cli.engine import config, files
from pcavmae_cli.engine.data.pack import pack_manifest
from pcavmae_cli.engine.data.preprocess import preprocess
from pcavmae_cli.engine.embed import embed
from pcavmae_cli.engine.train.pretrain import pretrain
from tests.test_pretrain import corpus, recipe  # noqa: F401  (the tiny corpus fixture)


def modes(root):
    """``{relative path: permission bits}`` of everything under ``root``."""
    out = {}
    for folder, dirs, names in os.walk(root):
        for name in (*dirs, *names):
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_output_honours_the_umask(corpus, tmp_path, mp4_factory, umask):  # noqa: F811
    videos = tmp_path / "videos"
    for name in ("a", "b"):
        mp4_factory(videos / f"{name}.mp4", 1.5, size="64x48")
    previous = os.umask(umask)
    try:
        assert files.current_umask() == umask
        run_dir = tmp_path / "out" / "run"
        pretrain(recipe(corpus, run_dir))
        data = config.load_recipe("base").data
        pre = preprocess(videos, tmp_path / "out" / "pre", data, jobs=1)
        pack_manifest(pre.manifest, tmp_path / "out" / "pack", data, jobs=1)
        embed(run_dir, tmp_path / "out" / "emb", data=corpus)
        embed(run_dir, tmp_path / "out" / "emb.safetensors", data=corpus)
    finally:
        os.umask(previous)
    found = modes(tmp_path / "out")
    wanted = {"model.safetensors", "momentum.safetensors", "state.pt", "metrics.jsonl", "manifest.jsonl",
              "index.json", "audio.wav", "joint.npy", "emb.safetensors", "index.csv"}  # fmt: skip
    assert wanted <= {os.path.basename(p) for p in found}
    assert any(p.startswith("run/prototypes/") for p in found)
    assert not [p for p in found if files.TEMP_MARK in p], "temporaries left behind"
    is_dir = {p: os.path.isdir(tmp_path / "out" / p) for p in found}
    wrong = {p: oct(m) for p, m in found.items() if m != (0o777 if is_dir[p] else 0o666) & ~umask}
    assert not wrong, wrong
