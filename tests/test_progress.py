"""Progress from Python: engine calls without a reporter draw tqdm bars (``tqdm.auto``), the
convention of Python ML libraries in scripts and notebooks; the CLI draws Rich bars instead."""

from __future__ import annotations

from pcavmae_cli.engine.progress import SilentReporter, TqdmReporter, default_reporter
from pcavmae_cli.engine.train.pretrain import pretrain
from tests.test_pretrain import corpus, recipe  # noqa: F401  (corpus is a fixture)


def test_a_tqdm_bar_counts_to_its_total_and_shows_the_note(capfd):
    with TqdmReporter().progress("embed clips", 3) as advance:
        advance()
        advance(2, note="clip_7")
    err = capfd.readouterr().err
    assert "embed clips" in err and "3/3" in err and "clip_7" in err


def test_library_callers_get_tqdm_unless_they_pass_a_reporter():
    assert isinstance(default_reporter(None), TqdmReporter)
    silent = SilentReporter()
    assert default_reporter(silent) is silent


def test_pretrain_called_from_python_shows_its_epochs_with_tqdm(corpus, tmp_path, capfd):  # noqa: F811
    pretrain(recipe(corpus, tmp_path / "run", "stages.0.epochs=1", "stages.1.epochs=1"))
    err = capfd.readouterr().err
    assert "joint 1/2" in err and "encoders 2/2" in err  # one bar per epoch, named by its stage
    assert "| 3/3 [" in err  # a tqdm bar (count, then elapsed time), run to its end
