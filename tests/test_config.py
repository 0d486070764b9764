"""Recipe loading: strict validation naming the key, overrides, extends, shipped recipes."""

from __future__ import annotations

import pytest
import yaml

from pcavmae_cli.engine import config, recipes
from pcavmae_cli.engine.errors import UserError


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def base_dict():
    return config.load_raw("base")


@pytest.mark.parametrize("name", recipes.names())
def test_every_shipped_recipe_validates(name):
    recipe = config.load_recipe(name)
    assert recipe.description
    assert recipes.description(name)


def test_base_recipe_holds_the_method_notes_settings():
    data = config.load_recipe("base").data
    fbank = data.audio.fbank
    assert (fbank.num_mel_bins, fbank.target_frames) == (128, 1024)
    assert (fbank.frame_length_ms, fbank.frame_shift_ms, fbank.window_type) == (25.0, 10.0, "hanning")
    assert (fbank.dither, fbank.use_energy, fbank.htk_compat, fbank.subtract_waveform_mean) == (0.0, False, True, True)
    assert (fbank.mean, fbank.std) == (-5.081, 4.4849)
    assert data.audio.sample_rate == 16000
    assert (data.video.fps, data.video.n_frames, data.video.crop_size) == (1.0, 10, 224)


def test_unknown_key_is_named(tmp_path):
    raw = base_dict()
    raw["data"]["loader"]["batchsize"] = 4
    with pytest.raises(UserError, match=r"unknown key 'data\.loader\.batchsize'.*did you mean 'batch_size'"):
        config.load_recipe(write(tmp_path / "r.yaml", raw))


def test_wrong_type_is_named(tmp_path):
    raw = base_dict()
    raw["data"]["video"]["n_frames"] = "ten"
    with pytest.raises(UserError, match=r"key 'data\.video\.n_frames' expects int, got 'ten'"):
        config.load_recipe(write(tmp_path / "r.yaml", raw))


def test_bool_is_not_an_int_and_int_is_not_a_bool(tmp_path):
    with pytest.raises(UserError, match=r"data\.loader\.batch_size' expects int"):
        config.load_recipe("base", ["data.loader.batch_size=true"])
    with pytest.raises(UserError, match=r"data\.audio\.fbank\.htk_compat' expects bool"):
        config.load_recipe("base", ["data.audio.fbank.htk_compat=1"])


def test_missing_required_key_is_named(tmp_path):
    raw = base_dict()
    del raw["data"]["audio"]["fbank"]["std"]
    with pytest.raises(UserError, match=r"missing required key 'data\.audio\.fbank\.std' \(float\)"):
        config.load_recipe(write(tmp_path / "r.yaml", raw))


def test_literal_choices_are_listed():
    with pytest.raises(UserError, match=r"data\.loader\.train_frame' expects one of 'random', 'middle'"):
        config.load_recipe("base", ["data.loader.train_frame=first"])


def test_list_items_are_checked():
    with pytest.raises(UserError, match=r"key 'data\.video\.mean\.1' expects float"):
        config.load_recipe("base", ["data.video.mean=[0.5, x, 0.5]"])


def test_overrides_change_the_resolved_config():
    recipe = config.load_recipe(
        "demo",
        ["data.loader.batch_size=3", "data.audio.fbank.mean=1e-4", "data.video.mean.2=0.5", "seed=7"],
    )
    assert recipe.data.loader.batch_size == 3
    assert recipe.data.audio.fbank.mean == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as text
    assert recipe.data.video.mean == [0.485, 0.456, 0.5]
    assert recipe.seed == 7
    assert config.load_recipe("demo").data.loader.batch_size != 3


def test_optional_key_can_be_set_and_cleared():
    assert config.load_recipe("base", ["data.label_csv=labels.csv"]).data.label_csv == "labels.csv"
    assert config.load_recipe("demo", ["data.label_csv=null"]).data.label_csv is None


def test_unknown_override_key_is_named():
    with pytest.raises(UserError, match=r"unknown key 'data\.loader\.workers'"):
        config.load_recipe("base", ["data.loader.workers=2"])


@pytest.mark.parametrize("bad", ["batch_size", "=3", "data..x=1"])
def test_malformed_override_is_rejected(bad):
    with pytest.raises(UserError, match="not of the form"):
        config.load_recipe("base", [bad])


def test_override_into_a_value_is_rejected():
    with pytest.raises(UserError, match=r"'seed' is a value, not a section"):
        config.load_recipe("base", ["seed.x=1"])


def test_override_list_index_out_of_range():
    with pytest.raises(UserError, match=r"'data\.video\.mean\.7' is not an item of a 3-item list"):
        config.load_recipe("base", ["data.video.mean.7=0.1"])


def test_extends_merges_child_over_parent(tmp_path):
    child = write(tmp_path / "child.yaml", {"extends": "base", "description": "x", "data": {"loader": {"batch_size": 5}}})
    recipe = config.load_recipe(child)
    assert recipe.data.loader.batch_size == 5
    assert recipe.data.loader.num_workers == config.load_recipe("base").data.loader.num_workers


def test_extends_relative_path_and_cycle(tmp_path):
    write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(UserError, match="cycle"):
        config.load_recipe(str(tmp_path / "a.yaml"))


def test_unknown_recipe_name_lists_shipped_ones():
    with pytest.raises(UserError, match=r"no recipe named 'nope'; shipped recipes: .*demo"):
        config.load_recipe("nope")


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\ndata: [unclosed\n")
    with pytest.raises(UserError, match=r"bad\.yaml:\d+: invalid YAML"):
        config.load_recipe(str(path))


def test_dump_round_trips(tmp_path):
    recipe = config.load_recipe("demo", ["data.loader.batch_size=2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config.dump_yaml(recipe))
    assert config.load_recipe(str(path)) == recipe
