"""Progress from Python: engine calls without a reporter draw tqdm bars (``tqdm.auto``), the
convention of Python ML libraries in scripts and notebooks; the CLI draws Rich bars instead.
Warnings: Python warnings from the library reporters (and from a reporter written without a
``warning`` method), one console line from the CLI's."""

from __future__ import annotations

import contextlib
import warnings

import pytest

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


class BarsOnly:
    """A caller's reporter from before ``warning`` existed: ``progress`` only."""

    def __init__(self):
        self.bars = []

    @contextlib.contextmanager
    def progress(self, description, total):
        self.bars.append((description, total))
        yield lambda n=1, note="": None


def test_library_reporters_warn_with_python_warnings_and_a_bars_only_reporter_still_works():
    for reporter in (SilentReporter(), TqdmReporter()):
        with pytest.warns(RuntimeWarning, match="^collapsed$"):
            reporter.warning("collapsed", RuntimeWarning)
    mine = BarsOnly()
    wrapped = default_reporter(mine)
    with wrapped.progress("health 1/3", 2) as advance:
        advance()
    assert mine.bars == [("health 1/3", 2)]
    with pytest.warns(RuntimeWarning, match="^collapsed$"):
        wrapped.warning("collapsed", RuntimeWarning)


def test_the_cli_reporter_prints_one_line_and_no_python_warning(capsys):
    from pcavmae_cli.cli.console import RichReporter

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RichReporter().warning("video collapsed [limits: 0.9]", RuntimeWarning)
    assert capsys.readouterr().out == "warning: video collapsed [limits: 0.9]\n"  # markup-like text kept
    assert caught == []
