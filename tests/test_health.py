"""Representation health: each figure on hand-computed cases, sharded runs equal to one process,
the collapse flag and warning on a constructed collapsed audio side, one warning per collapse
episode (a Python warning from Python, one console line and no Python warning from the CLI), the
measurement of epochs without an E-step on ``health.max_rows`` clips only, and a tiny pre-training
run that logs the figures for every epoch and draws them (``pcav visualize health``)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.data.model_inputs import model_inputs
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.evaluate.health import (
    CollapseEpisodes,
    collapse_message,
    effective_rank,
    embedding_health,
    gathered_rows,
    mean_pairwise_cosine,
    nearest_agreement,
    prototype_spread,
)
from pcavmae_cli.engine.prototypes import build_prototypes
from pcavmae_cli.engine.progress import SilentReporter
from pcavmae_cli.engine.train.metrics import read_metrics
from pcavmae_cli.engine.train.estep import health_clips, health_shard
from pcavmae_cli.engine.train.pretrain import RepresentationCollapse, Trainer, pretrain
from pcavmae_cli.engine.train.stop import Interrupted, StopRequests
from pcavmae_cli.engine.viz.curves import plotted_keys
from tests.test_pretrain import TINY, corpus, recipe, stop_at  # noqa: F401 - corpus is a fixture
from tests.test_prototypes import run_ranks
from tests.test_viz import cli, png_size

LIMITS = dict(max_rows=4096, collapse_cosine=0.9, collapse_rank=1.5)


def simplex(k: int) -> torch.Tensor:
    """k unit vectors of a regular simplex (in R^k, spanning k - 1 dimensions): pairwise cosine -1/(k-1)."""
    return F.normalize(torch.eye(k) - 1.0 / k, dim=1)


# ----------------------------------------------------------------------------- the figures by hand


def test_identical_rows_have_cosine_one_and_rank_one():
    x = torch.tensor([[3.0, 4.0, 0.0]]).repeat(5, 1)  # any length: rows are normalised
    assert mean_pairwise_cosine(x) == pytest.approx(1.0)
    assert effective_rank(x) == pytest.approx(1.0)


def test_an_orthonormal_basis_has_cosine_zero_and_full_rank():
    for k in (2, 5):
        x = torch.eye(k, 7)
        assert mean_pairwise_cosine(x) == pytest.approx(0.0, abs=1e-12)
        assert effective_rank(x) == pytest.approx(k)


def test_a_simplex_has_cosine_minus_one_over_k_minus_one_and_rank_k_minus_one():
    for k in (3, 4):
        x = simplex(k)
        assert mean_pairwise_cosine(x) == pytest.approx(-1.0 / (k - 1))
        assert effective_rank(x) == pytest.approx(k - 1)  # k - 1 equal singular values, one zero


def test_effective_rank_of_two_rows_at_cosine_0_6():
    # Gram [[1, .6], [.6, 1]]: singular values sqrt(1.6), sqrt(0.4), normalised p = (2/3, 1/3).
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    entropy = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert effective_rank(x) == pytest.approx(math.exp(entropy))  # 1.8899
    assert mean_pairwise_cosine(x) == pytest.approx(0.6)


def test_mean_cosine_equals_the_pairwise_mean_without_the_matrix():
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    unit = F.normalize(x, dim=1)
    gram = unit @ unit.T
    brute = (gram.sum() - gram.diagonal().sum()) / (9 * 8)
    assert mean_pairwise_cosine(x) == pytest.approx(float(brute))
    assert math.isnan(mean_pairwise_cosine(x[:1]))  # no pair


def test_prototype_spread_and_agreement_by_hand():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # cosines (1, 0, -1): spread 2; (0, 1, 0): spread 1
    assert prototype_spread(x, protos) == pytest.approx(1.5)
    assert prototype_spread(torch.tensor([[0.0, 1.0]]), protos[[0, 2]]) == pytest.approx(0.0)  # equidistant
    # nearest prototypes 0, 1, 2, 1; assigned 0, 1, 2, 2: three of four agree.
    clips = torch.tensor([[0.9, 0.1], [0.1, 0.9], [-0.9, 0.2], [0.2, 0.9]])
    assert nearest_agreement(clips, protos, torch.tensor([0, 1, 2, 2])) == pytest.approx(0.75)


def test_shards_give_the_figures_of_one_process():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 5, generator=g)
    protos = torch.randn(3, 5, generator=g)
    assign = torch.randint(0, 3, (11,), generator=g)
    parts = [slice(0, 6), slice(6, 11)]  # uneven shards, as distributed.bounds makes them

    def on_rank(comm):
        s = parts[comm.rank]
        return (mean_pairwise_cosine(x[s], comm), prototype_spread(x[s], protos, comm),
                nearest_agreement(x[s], protos, assign[s], comm), gathered_rows(x[s], 4, comm))  # fmt: skip

    ranks = run_ranks(2, on_rank)
    whole = (mean_pairwise_cosine(x), prototype_spread(x, protos), nearest_agreement(x, protos, assign))
    for got in ranks:
        assert got[:3] == pytest.approx(whole)
    # 4 rows at most: 2 per rank, evenly spaced in each shard (its first and last), the same on every rank
    expected = torch.cat([x[[0, 5]], x[[6, 10]]]).double()
    for got in ranks:
        assert torch.equal(got[3], expected)


# ----------------------------------------------------------------------------- collapse


def collapsed_audio(n=12, d=8, noise=0.01):
    """Audio embeddings all along one direction (plus a little noise), video along distinct ones."""
    g = torch.Generator().manual_seed(2)
    z_a = torch.ones(n, d) + noise * torch.randn(n, d, generator=g)
    z_v = torch.randn(n, d, generator=g)
    return z_a, z_v


def test_a_collapsed_audio_side_is_flagged_and_blind_to_the_prototypes():
    z_a, z_v = collapsed_audio()
    assign = torch.arange(12) % 3
    protos = [build_prototypes(z_a, z_v, assign, 3, beta=10.0, tau=0.1, percentiles=(10.0, 90.0))]
    h = embedding_health(z_a, z_v, protos, **LIMITS)
    assert h["health_cos_a"] > 0.99 and h["health_rank_a"] < 1.5
    assert (h["health_collapsed_a"], h["health_collapsed_v"], h["health_collapsed_joint"]) == (True, False, False)
    assert h["health_spread_a"][0] < 0.01 < 0.5 < h["health_spread_v"][0]
    assert len(h["health_agree_a"]) == 1 and 0 <= h["health_agree_a"][0] <= 1
    message = collapse_message(h, 3, collapse_cosine=0.9, collapse_rank=1.5)
    assert message.startswith("representation health, epoch 3: collapsed embeddings (audio mean pairwise cosine")
    assert "video" not in message and "cosine spread to prototypes" in message
    # Without prototypes (warm-up) only the embedding figures are there.
    warm = embedding_health(z_a, z_v, None, **LIMITS)
    assert warm["health_spread_a"] is None and warm["health_agree_v"] is None and warm["health_collapsed_a"]
    healthy = embedding_health(torch.randn(12, 8), z_v, None, **LIMITS)
    assert collapse_message(healthy, 0, collapse_cosine=0.9, collapse_rank=1.5) is None


def test_a_modality_is_warned_about_once_per_collapse_episode():
    episodes = CollapseEpisodes()
    # video flagged for 5 measurements, recovers, collapses again for 2; audio flagged at single
    # measurements twice, then at 3 in a row; joint never at two in a row.
    measurements = [{"v"}, {"v", "joint"}, {"v", "a"}, {"v"}, {"v", "a", "joint"}, set(), {"v"}, {"v", "a"},
                    {"a", "joint"}, {"a"}]  # fmt: skip
    warned = [episodes.update(m) for m in measurements]
    assert warned == [set(), {"v"}, set(), set(), set(), set(), set(), {"v"}, {"a"}, set()]


def test_health_settings_are_checked_naming_the_key(corpus, tmp_path):  # noqa: F811
    with pytest.raises(UserError, match="health: 'max_rows' must be >= 2"):
        recipe(corpus, tmp_path / "r", "health.max_rows=1")
    with pytest.raises(UserError, match="unknown key 'health.every_epoch'"):
        recipe(corpus, tmp_path / "r", "health.every_epoch=2")


# ----------------------------------------------------------------------------- in pre-training


def test_pretraining_logs_health_every_epoch_warns_on_collapse_and_draws_it(corpus, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    # collapse_cosine -1: every modality counts as collapsed, so every epoch must warn once.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pretrain(recipe(corpus, run, "health.collapse_cosine=-1.0"), SilentReporter())
    epochs = read_metrics(run / "metrics.jsonl", "epoch")
    assert [e["epoch"] for e in epochs] == [1, 2, 3]  # warm-up, then two epochs with prototypes
    for e in epochs:
        assert -1 <= e["health_cos_a"] <= 1 and 1 <= e["health_rank_v"] <= 8  # 8-d projections
        assert e["health_collapsed_a"] is e["health_collapsed_v"] is e["health_collapsed_joint"] is True
        with_protos = e["prototypes"]
        assert (e["health_spread_a"] is None) == (not with_protos)
        if with_protos:  # two granularities (num_clusters [2, 3])
            assert len(e["health_spread_joint"]) == len(e["health_agree_a"]) == len(e["health_agree_v"]) == 2
    assert not epochs[0]["prototypes"] and epochs[1]["prototypes"]
    warned = [str(w.message) for w in caught if w.category is RepresentationCollapse]
    # One flagged measurement is not a warning (a random encoder's embeddings start nearly
    # parallel); the second in a row is, and then nothing until the modality recovers: every
    # epoch is flagged, so one collapse episode per modality and one warning for the three.
    assert [m.split(":")[0] for m in warned] == ["representation health, epoch 1"]
    assert all("audio" in m and "video" in m and "joint" in m for m in warned)

    output = cli("visualize", "health", str(run))
    assert "audio collapsed at epochs 1, 2, 3" in output
    assert png_size(run / "plots" / "health.png")[0] > 0
    panels, _ = plotted_keys(read_metrics(run / "metrics.jsonl"))
    assert ["health_cos_a", "health_cos_v", "health_cos_joint"] in panels  # pcav visualize curves, too
    assert not any(k.startswith("health_collapsed") for p in panels for k in p)


def health_fields(rows):
    return [{k: v for k, v in r.items() if k.startswith("health_")} for r in rows]


def test_a_mid_epoch_resume_logs_the_health_measured_before_the_stop(corpus, tmp_path):  # noqa: F811
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    pretrain(recipe(corpus, whole), SilentReporter())
    with pytest.raises(Interrupted):  # 3 steps per epoch: step 5 is inside epoch 1, after its E-step
        pretrain(recipe(corpus, cut), SilentReporter(), on_step=stop_at(5))
    pretrain(recipe(corpus, cut, "train.resume=true"), SilentReporter())
    expected = health_fields(read_metrics(whole / "metrics.jsonl", "epoch"))
    assert health_fields(read_metrics(cut / "metrics.jsonl", "epoch")) == expected
    assert expected[1]["health_spread_a"] is not None


def test_epochs_without_an_estep_follow_every_epochs_and_health_can_be_off(corpus, tmp_path):  # noqa: F811
    run = tmp_path / "sparse"
    short = "train.max_steps_per_epoch=1"
    pretrain(recipe(corpus, run, "prototypes.warmup_epochs=2", "health.every_epochs=2", short), SilentReporter())
    measured = [e["health_cos_joint"] is not None for e in read_metrics(run / "metrics.jsonl", "epoch")]
    assert measured == [True, False, True]  # warm-up epochs 0 and 1: only 0 % 2 == 0; epoch 2 has its E-step

    cavmae = tmp_path / "cavmae"  # CAV-MAE's objective: no prototypes at all, the embedding figures still
    no_protos = ["prototypes=null", short,
                 *(f"stages.{i}.loss.{w}=0" for i in (0, 1) for w in ("w_pje", "w_pcpe"))]  # fmt: skip
    pretrain(recipe(corpus, cavmae, *no_protos), SilentReporter())
    epochs = read_metrics(cavmae / "metrics.jsonl", "epoch")
    assert all(e["health_rank_a"] >= 1 and e["health_spread_v"] is None for e in epochs) and len(epochs) == 3

    off = tmp_path / "off"
    pretrain(recipe(corpus, off, "health=null", short), SilentReporter())
    assert not any(k.startswith("health_") for row in read_metrics(off / "metrics.jsonl") for k in row)
    from typer.testing import CliRunner

    from pcavmae_cli.cli.app import app

    result = CliRunner().invoke(app, ["visualize", "health", str(off)])  # the console script prints it, exit 1
    assert isinstance(result.exception, UserError) and result.exit_code == 1
    assert str(result.exception) == (f"{off / 'metrics.jsonl'}: no epoch line with representation-health "
                                     "figures (the recipe's 'health' was null)")  # fmt: skip


def test_the_cli_shows_one_line_per_collapse_episode_and_no_python_warning(corpus, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output = cli("pretrain", "--recipe", "demo", *TINY, f"data.train_manifest={corpus}", f"train.run_dir={run}",
                     "health.collapse_cosine=-1.0")  # fmt: skip
    lines = [line for line in output.splitlines() if "representation health" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: representation health, epoch 1: collapsed embeddings (audio")
    assert not [w for w in caught if w.category is RepresentationCollapse]  # the line, not both


# ----------------------------------------------------------------------------- epochs without an E-step


def test_health_clips_are_max_rows_evenly_spaced_distinct_clips_in_equal_shares():
    assert health_clips(10, 4) == [0, 3, 6, 9]
    assert health_clips(10, 10) == health_clips(10, 4096) == list(range(10))  # the whole set, as the E-step's
    big = health_clips(10**6 + 1, 10**6)  # near-equal sizes: still distinct, first and last included
    assert len(set(big)) == 10**6 and big == sorted(big) and (big[0], big[-1]) == (0, 10**6)
    # 2 ranks, max_rows 5 of 11: 4 clips (a multiple of the world size), 2 per rank, one batch each
    shards = [health_shard(11, 5, batch_size=2, rank=r, world_size=2) for r in range(2)]
    assert shards[0].rows + shards[1].rows == health_clips(11, 4) == [0, 3, 7, 10]
    assert [s.rounds for s in shards] == [1, 1]
    assert health_shard(11, 5, batch_size=2).rows == health_clips(11, 5) and health_shard(11, 5, 2).rounds == 3


def test_health_without_an_estep_embeds_only_max_rows_clips_and_measures_them(corpus, tmp_path, monkeypatch):  # noqa: F811
    cfg = recipe(corpus, tmp_path / "run", "health.max_rows=4")  # 10 clips
    trainer = Trainer(cfg, SilentReporter(), None)
    loaded = []
    original = AudioVisualDataset.__getitem__

    def counted(self, key):
        if self.frames == "middle":
            loaded.append(int(key))
        return original(self, key)

    monkeypatch.setattr(AudioVisualDataset, "__getitem__", counted)
    with StopRequests() as stop:
        figures = trainer._health(0, stop)  # epoch 0: warm-up, no E-step
    assert loaded == health_clips(10, 4) == [0, 3, 6, 9]  # 4 clips, not the 10 of the set

    middle = AudioVisualDataset(corpus, cfg.data, frames="middle", compact=True)
    batch = model_inputs(default_collate([original(middle, i) for i in loaded]), cfg.data, torch.device("cpu"))
    with torch.no_grad(), trainer.rt.autocast():
        emb = trainer.momentum.embed(batch["fbank"], batch["frames"])
    want = embedding_health(emb.z_a.float(), emb.z_v.float(), None, **{**LIMITS, "max_rows": 4})
    assert figures.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, float):
            assert figures[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        else:
            assert figures[key] == value, key

    whole = Trainer(recipe(corpus, tmp_path / "whole"), SilentReporter(), None)  # max_rows 4096 >= 10 clips
    assert whole.health_loader is whole.embed_loader and whole.health_shard.rows == list(range(10))
