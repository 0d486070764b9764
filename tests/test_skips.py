"""The suite's rule on skips (conftest.py): a missing GPU is the one reason a test may skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_suite(folder: Path, body: str) -> subprocess.CompletedProcess:
    """pytest on one test file under ``folder``, with this suite's conftest hooks."""
    (folder / "conftest.py").write_text(
        "from tests.conftest import pytest_runtest_logreport, pytest_sessionfinish, pytest_terminal_summary\n"
    )
    (folder / "test_one.py").write_text("import pytest\n\n\n" + body)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize(
    "body",
    [
        'def test_a():\n    pytest.skip("flaky on Tuesdays")\n',
        '@pytest.mark.skipif(True, reason="slow")\ndef test_a():\n    pass\n',
        '@pytest.mark.xfail(reason="known bug")\ndef test_a():\n    assert False\n',
    ],
    ids=["skip", "skipif", "xfail"],
)
def test_a_skip_for_any_other_reason_fails_the_run_naming_the_test(tmp_path, body):
    done = run_suite(tmp_path, body)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "fails the run" in done.stdout and "test_one.py::test_a" in done.stdout


def test_a_skip_for_a_missing_gpu_passes(tmp_path):
    done = run_suite(tmp_path, 'def test_a():\n    pytest.skip("needs a CUDA GPU")\n\n\ndef test_b():\n    pass\n')
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed, 1 skipped" in done.stdout
