"""Pre-training's audio augmentations (the ``augment`` recipe section, ``train/augment.py``)."""

from __future__ import annotations

import pytest
import torch

from pcavmae_cli.engine import config
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.train import augment
from pcavmae_cli.engine.train.pretrain import pretrain
from pcavmae_cli.engine.train.stop import Interrupted
from tests.test_pretrain import corpus, recipe, stop_at, tensors_of  # noqa: F401  (corpus: a fixture)

AUGMENTED = ["augment.audio_roll=8", "augment.freq_mask=3", "augment.time_mask=6"]


def test_roll_in_time_moves_each_clip_by_its_own_shift():
    x = torch.arange(2 * 5 * 2, dtype=torch.float32).view(2, 5, 2)
    rolled = augment.roll_in_time(x, torch.tensor([1, -2]))
    # rolled[b, t] = x[b, (t - shift) mod 5]: clip 0 by +1 (its last frame first), clip 1 by -2
    assert rolled[0, :, 0].tolist() == [8.0, 0.0, 2.0, 4.0, 6.0]
    assert rolled[1, :, 0].tolist() == [14.0, 16.0, 18.0, 10.0, 12.0]
    assert torch.equal(rolled[:, :, 1], rolled[:, :, 0] + 1)  # whole frames move, bins stay


def test_the_view_is_the_input_when_off_and_a_permutation_plus_masks_when_on():
    torch.manual_seed(0)
    x = torch.randn(4, 32, 8)
    assert augment.pretrain_audio_view(x, 0, 0, 0) is x
    rolled = augment.pretrain_audio_view(x, 16, 0, 0)
    for b in range(4):  # each clip is a circular shift of itself, by at most 16 frames
        shifts = [s for s in range(-16, 17) if torch.equal(rolled[b], torch.roll(x[b], s, dims=0))]
        assert shifts, b
    torch.manual_seed(1)
    masked = augment.pretrain_audio_view(x, 0, 3, 6)
    zero = masked == 0
    assert zero.any() and torch.equal(masked[~zero], x[~zero])
    # a frequency mask is narrower than 3 bins, a time mask narrower than 6 frames
    assert (zero.all(dim=1).sum(dim=1) <= 2).all() and (zero.all(dim=2).sum(dim=1) <= 5).all()


def test_negative_widths_are_refused_with_the_key():
    with pytest.raises(UserError, match="augment: 'audio_roll' must be >= 0"):
        config.load_recipe("demo", ["augment.audio_roll=-1"])
    assert not config.load_recipe("demo").augment.active  # off unless a recipe asks


def test_an_augmented_run_changes_the_losses_and_resumes_bit_exact(corpus, tmp_path):  # noqa: F811
    """The draws come from the global RNG saved at optimiser-step boundaries: a run stopped at
    step 5 and resumed ends with the uninterrupted augmented run's weights."""
    plain = pretrain(recipe(corpus, tmp_path / "plain"))
    whole_dir, stopped_dir = tmp_path / "whole", tmp_path / "stopped"
    whole = pretrain(recipe(corpus, whole_dir, *AUGMENTED))
    assert whole.epochs[0]["loss_r"] != plain.epochs[0]["loss_r"]
    with pytest.raises(Interrupted):
        pretrain(recipe(corpus, stopped_dir, *AUGMENTED), on_step=stop_at(5))
    resumed = pretrain(recipe(corpus, stopped_dir, *AUGMENTED, "train.resume=true"))
    mine, theirs = tensors_of(stopped_dir / "checkpoints" / "last"), tensors_of(whole_dir / "checkpoints" / "last")
    assert [k for k in theirs if not torch.equal(mine[k], theirs[k])] == []
    assert [e["loss_total"] for e in resumed.epochs] == [e["loss_total"] for e in whole.epochs]
