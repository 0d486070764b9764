"""The real-media benchmark's design (``benchmarks/real_media_corpus.py``, ``real_media.py``,
``bench_runs.py``): the parts that need no download.

Why these: the benchmark is only meaningful if neither modality alone can name every class,
if held-out clips come from recordings and pictures training never saw, and if its files are
what ``pcav preprocess`` and ``pcav evaluate`` read. None of this may touch the network.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_runs  # noqa: E402
import real_media  # noqa: E402
import real_media_corpus as rm  # noqa: E402

from pcavmae_cli.engine import config  # noqa: E402
from pcavmae_cli.engine.data.segments import read_segments  # noqa: E402


def test_classes_pair_the_categories_in_a_cycle_that_shares_information():
    classes = rm.real_classes()
    assert len(classes) >= 6
    assert len({c.mid for c in classes}) == len({c.name for c in classes}) == len(classes)
    pairs = {(c.sound, c.picture) for c in classes}
    assert len(pairs) == len(classes)
    # Neither modality alone separates the classes: each category is shared by several classes.
    assert min(Counter(c.sound for c in classes).values()) >= 2
    assert min(Counter(c.picture for c in classes).values()) >= 2
    # ... and the modalities share information: not every (sound, picture) pair is a class, and
    # each sound category goes with its own set of picture categories (so the pictures a sound
    # goes with identify the sound: what cross-modal learning can teach the audio side).
    assert len(pairs) < len(rm.SOUND_CATEGORIES) * len(rm.PICTURE_CATEGORIES)
    pictures_of = {s: frozenset(p for q, p in pairs if q == s) for s in rm.SOUND_CATEGORIES}
    assert len(set(pictures_of.values())) == len(rm.SOUND_CATEGORIES)
    sounds_of = {p: frozenset(s for s, q in pairs if q == p) for p in rm.PICTURE_CATEGORIES}
    assert len(set(sounds_of.values())) == len(rm.PICTURE_CATEGORIES)


def test_units_of_a_class_come_in_every_pair_so_no_speaker_predicts_a_picture():
    clips = rm.plan_clips(train_per_class=60, eval_per_class=15)
    for cls in rm.real_classes():
        for split in ("train", "eval"):
            mine = [c for c in clips if c.cls == cls and c.split == split]
            sounds = rm.units_of("sound", cls.sound, split)
            pictures = rm.units_of("picture", cls.picture, split)
            pairs = Counter((c.sound, c.picture) for c in mine)
            n_pairs = len(sounds) * len(pictures)
            # Every pair appears before any repeats; a pair's count differs from another's by at most 1.
            assert len(pairs) == min(len(mine), n_pairs)
            assert max(pairs.values()) - min(pairs.values()) <= 1 or len(pairs) < n_pairs
            if len(mine) >= n_pairs:  # a full cycle: the picture tells nothing about the speaker
                for picture in pictures:
                    with_it = Counter(c.sound for c in mine[:n_pairs] if c.picture == picture)
                    assert set(with_it) == set(sounds) and len(set(with_it.values())) == 1


def test_no_source_recording_or_picture_is_in_both_splits():
    keys = Counter((u.package, u.pattern) for u in rm.UNITS)
    assert max(keys.values()) == 1  # each unit listed once, so it has one split
    for modality, categories in (("sound", rm.SOUND_CATEGORIES), ("picture", rm.PICTURE_CATEGORIES)):
        for category in categories:
            assert rm.units_of(modality, category, "train") and rm.units_of(modality, category, "eval"), category


def test_plan_draws_each_split_from_its_own_units_and_cycles_through_them():
    clips = rm.plan_clips(train_per_class=15, eval_per_class=5)
    assert len(clips) == 20 * len(rm.real_classes())
    assert len({c.clip_id for c in clips}) == len(clips)
    assert [c.index for c in clips] == list(range(len(clips)))
    for c in clips:
        assert c.sound.split == c.picture.split == c.split
        assert (c.sound.modality, c.sound.category) == ("sound", c.cls.sound)
        assert (c.picture.modality, c.picture.category) == ("picture", c.cls.picture)
        assert c.background.split == c.split
        assert (c.background.modality, c.background.category) != ("sound", c.cls.sound)
        assert c.background.modality == "sound"
    train_units = {u for c in clips if c.split == "train" for u in (c.sound, c.picture, c.background)}
    eval_units = {u for c in clips if c.split == "eval" for u in (c.sound, c.picture, c.background)}
    assert not train_units & eval_units
    for cls in rm.real_classes():
        for split, n in (("train", 15), ("eval", 5)):
            mine = [c for c in clips if c.cls == cls and c.split == split]
            assert len(mine) == n
            # Cycling through the unit pairs spreads the clips over the units.
            for unit_of, modality, category in ((lambda c: c.sound, "sound", cls.sound),
                                                (lambda c: c.picture, "picture", cls.picture)):  # fmt: skip
                available = len(rm.units_of(modality, category, split))
                assert len({unit_of(c) for c in mine}) >= min(n, available) // 2


def test_plan_rejects_an_empty_split():
    with pytest.raises(ValueError, match="at least one clip"):
        rm.plan_clips(train_per_class=3, eval_per_class=0)


def test_segments_csv_reads_back_with_the_corpus_labels(tmp_path):
    clips = rm.plan_clips(train_per_class=1, eval_per_class=1)
    path = tmp_path / "train_segments.csv"
    path.write_text(rm.segments_csv(clips, 10.0))
    segments = read_segments(path)
    assert [s.clip_id for s in segments] == [c.clip_id for c in clips]
    assert [list(s.labels) for s in segments] == [[c.cls.mid] for c in clips]
    rows = rm.clips_table(clips).splitlines()
    assert rows[1].split(",")[:4] == [clips[0].clip_id, "train", clips[0].cls.name, clips[0].cls.sound]


def test_factor_manifests_relabel_each_clip_by_its_category(tmp_path):
    clips = rm.plan_clips(train_per_class=1, eval_per_class=1)
    built = rm.RealCorpus(tmp_path, tmp_path / "videos", tmp_path / "labels.csv", {}, clips, 0)
    manifests = {}
    for split in ("train", "eval"):
        folder = tmp_path / "data" / split
        folder.mkdir(parents=True)
        mine = [c for c in clips if c.split == split]
        records = [{"id": c.clip_id, "video": f"clips/{c.clip_id}", "labels": [c.cls.mid]} for c in mine]
        manifests[split] = folder / "manifest.jsonl"
        manifests[split].write_text("".join(json.dumps(r) + "\n" for r in records))
    got = real_media.factor_manifests(built, manifests, "picture")
    assert got["train"].parent == manifests["train"].parent  # relative clip paths still resolve
    mids = {row.split(",")[2]: row.split(",")[1] for row in got["label_csv"].read_text().splitlines()[1:]}
    assert set(mids) == set(rm.PICTURE_CATEGORIES)
    by_id = {c.clip_id: c for c in clips}
    for split in ("train", "eval"):
        for line in got[split].read_text().splitlines():
            record = json.loads(line)
            assert record["labels"] == [mids[by_id[record["id"]].picture.category]]
            assert record["video"] == f"clips/{record['id']}"


def test_epoch_overrides_keep_the_schedule_shape():
    demo = config.load_recipe("demo")  # stages 28 + 6, lr warm-up 2, prototype warm-up 4 (of 34)
    assert [s.epochs for s in demo.stages] == [28, 6]
    got = bench_runs.epoch_overrides(demo, 8)
    # 28 * 8 / 34 = 6.6 -> 7, the rest 1; 2 * 8 / 34 = 0.470588; 4 * 8 / 34 = 0.94 -> 1
    assert got == ["stages.0.epochs=7", "stages.1.epochs=1", "optim.warmup_epochs=0.470588",
                   "prototypes.warmup_epochs=1"]  # fmt: skip
    shrunk = config.load_recipe("demo", got)
    assert sum(s.epochs for s in shrunk.stages) == 8
    baseline = config.load_recipe("demo_cavmae")
    assert bench_runs.epoch_overrides(baseline, 5)[0] == "stages.0.epochs=5"
    with pytest.raises(ValueError, match="fewer than"):
        bench_runs.epoch_overrides(demo, 1)


def test_markdown_table_gives_mean_and_sample_std_over_seeds():
    assert bench_runs.mean_std([0.5, 0.7]) == pytest.approx((0.6, 0.1414213))
    table = bench_runs.markdown_table({"a": [{"x": 0.5}, {"x": 0.7}], "b": [{"x": 0.25}]}, {"x": "X"})
    assert table.splitlines() == ["| model | seeds | X |", "|---|---|---|", "| a | 2 | 60.0 +- 14.1 |",
                                  "| b | 1 | 25.0 |"]


def test_shared_run_helpers_read_a_recipe_and_a_metrics_log(tmp_path):
    recipe = {"data": {"train_manifest": "t.jsonl", "eval_manifest": "e.jsonl", "label_csv": "l.csv",
                       "audio": {"fbank": {"mean": -4.5, "std": 3.25}}}}  # fmt: skip
    assert bench_runs.corpus_overrides(recipe) == [
        "data.train_manifest=t.jsonl", "data.eval_manifest=e.jsonl", "data.label_csv=l.csv",
        "data.audio.fbank.mean=-4.500000", "data.audio.fbank.std=3.250000",
    ]  # fmt: skip
    log = [{"kind": "epoch", "seconds": 1.5, "estep_seconds": 0.25}, {"kind": "step", "seconds": 9.0},
           {"kind": "epoch", "seconds": 2.0}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    assert bench_runs.pretrain_seconds(tmp_path) == 3.8  # 1.5 + 0.25 + 2.0, rounded to 0.1


def test_tables_of_figures_that_are_not_rates_keep_two_decimals_and_heads_list_every_level():
    table = bench_runs.markdown_table({"a": [{"cos": 0.714}, {"cos": 0.706}]}, {"cos": "cos"}, percent=False)
    assert table.splitlines()[-1] == "| a | 2 | 0.71 +- 0.01 |"
    rows = [{"head": "linear", "top1": 0.644, "levels": {"0": {"share": 0.55, "top": 1.2, "random": -0.1},
                                                         "1": {"share": 0.58, "top": 1.3, "random": 0.0}}}]  # fmt: skip
    lines = bench_runs.head_markdown([rows]).splitlines()
    assert lines[2:] == ["| linear | 1 | 64.4 | 0 | 0.55 | 1.20 | -0.10 |", "| linear | 1 | 64.4 | 1 | 0.58 | 1.30 | 0.00 |"]
    # Over seeds: mean +- sample std per cell, levels matched whether their keys are ints (just
    # measured) or strings (read back from JSON), and named when names are given.
    again = [{"head": "linear", "top1": 0.656, "levels": {0: {"share": 0.65, "top": 1.4, "random": 0.1},
                                                          1: {"share": 0.62, "top": 1.5, "random": 0.0}}}]  # fmt: skip
    lines = bench_runs.head_markdown([rows, again], {"0": "K=3", "1": "K=6"}).splitlines()
    assert lines[2] == "| linear | 2 | 65.0 +- 0.8 | K=3 | 0.60 +- 0.07 | 1.30 +- 0.14 | 0.00 +- 0.14 |"
    assert lines[3] == "| linear | 2 | 65.0 +- 0.8 | K=6 | 0.60 +- 0.03 | 1.40 +- 0.14 | 0.00 +- 0.00 |"


def test_runs_with_recipe_overrides_get_their_own_folders_and_the_documented_ones_load():
    # Without overrides a run keeps the name earlier outputs have (so they are reused) ...
    assert real_media.run_name("pcavmae", 34, 0, []) == "pcavmae_e34_s0"
    # ... and other settings never resume or reuse another run's folder.
    a = real_media.run_name("pcavmae", 34, 0, ["augment.audio_roll=512"])
    b = real_media.run_name("pcavmae", 34, 0, ["augment.audio_roll=256"])
    assert len({a, b, "pcavmae_e34_s0"}) == 3 and a.startswith("pcavmae_e34_s0_")
    # The larger-scale command in real_media.py's docstring: its overrides load on both recipes.
    both = ["augment.audio_roll=512", "augment.freq_mask=48", "augment.time_mask=192"]
    pcav = config.load_recipe(real_media.MODELS["pcavmae"], [*both, "prototypes.num_clusters=[3,6]"])
    cav = config.load_recipe(real_media.MODELS["cavmae"], both)
    assert pcav.prototypes.num_clusters == [3, 6] and cav.prototypes is None
    assert pcav.augment.audio_roll == cav.augment.audio_roll == 512
    # Each objective gets the shared overrides, then only its own, which win over the shared.
    own = {"pcavmae": ["prototypes.num_clusters=[3,6]"],
           "cavmae": ["stages.0.loss.w_infonce=1.0", "stages.0.loss.infonce_temperature=0.1"]}
    shared = [*both, "stages.0.loss.infonce_temperature=0.3"]
    cav_extra = real_media.model_overrides("cavmae", shared, own)
    assert "prototypes.num_clusters=[3,6]" not in cav_extra
    assert real_media.model_overrides("pcavmae", shared, own) == [*shared, "prototypes.num_clusters=[3,6]"]
    loss = config.load_recipe(real_media.MODELS["cavmae"], cav_extra).stages[0].loss
    assert (loss.w_infonce, loss.infonce_temperature) == (1.0, 0.1)
    # ... and the tables name the variant.
    assert real_media.model_title("cavmae", []) == "CAV-MAE objective (`demo_cavmae`)"
    assert real_media.model_title("cavmae", own["cavmae"]) == (
        "CAV-MAE objective (`demo_cavmae`, stages.0.loss.w_infonce=1.0 stages.0.loss.infonce_temperature=0.1)")


def test_processes_started_together_take_turns_at_preparing_the_corpus(tmp_path, monkeypatch):
    # --only-seed processes share an --out; the preprocessing they all start with refuses a
    # second writer, so the second must wait for the first instead of failing.
    import threading

    order: list[str] = []
    first_inside, second_waiting = threading.Event(), threading.Event()

    def fake_prepare(out, args):  # the corpus and preprocessing, replaced by a record of turns
        if args == "first":
            order.append("first in")
            first_inside.set()
            second_waiting.wait(5)
            time.sleep(0.2)  # the second is blocked now, not inside
            order.append("first out")
        else:
            order.append("second in")
        return {}

    monkeypatch.setattr(real_media, "_prepare", fake_prepare)
    monkeypatch.setattr(real_media, "folder_lock", _telling(real_media.folder_lock, second_waiting))

    def second():
        first_inside.wait(5)
        real_media.prepare(tmp_path, "second")

    threads = [threading.Thread(target=real_media.prepare, args=(tmp_path, "first")), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert order == ["first in", "first out", "second in"]


def _telling(lock, waiting):
    """``lock`` whose ``on_busy`` also sets ``waiting``: the test knows the second is blocked."""

    def wrapped(folder, on_busy=None):
        def told(holder):
            waiting.set()
            if on_busy:
                on_busy(holder)

        return lock(folder, on_busy=told)

    return wrapped
