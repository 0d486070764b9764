"""The README's CPU commands run as written, and the help examples and the README agree.

A code block preceded by ``<!-- cpu-test -->`` claims to run on a CPU in minutes: all of them
run here, in order, in one temporary folder, through ``bash -euo pipefail`` with the
installed ``pcav`` on PATH. Blocks that need a GPU or the internet are left unmarked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pcavmae_cli.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARK = "<!-- cpu-test -->"
BLOCK = re.compile(r"<!-- cpu-test -->\s*\n```bash\n(.*?)\n```", re.S)


def cpu_blocks(text: str) -> list[str]:
    return BLOCK.findall(text)


def commands_of(app_, prefix=()) -> dict[tuple[str, ...], str]:
    """Every leaf command of the Typer app: ``("convert", "cavmae") -> its docstring``."""
    out = {}
    for cmd in app_.registered_commands:
        name = cmd.name or cmd.callback.__name__.replace("_", "-")
        out[(*prefix, name)] = cmd.callback.__doc__ or ""
    for group in app_.registered_groups:
        out.update(commands_of(group.typer_instance, (*prefix, group.name)))
    return out


def test_every_cpu_marker_heads_a_bash_block():
    text = README.read_text()
    assert text.count(MARK) == len(cpu_blocks(text)) >= 3


def test_the_cpu_blocks_cover_the_first_run():
    commands = " ".join(cpu_blocks(README.read_text()))
    for needed in ("pcav demo-data", "pcav preprocess", "pcav stats", "pcav recipes show", "pcav pretrain", "pcav embed"):
        assert needed in commands, needed


@pytest.mark.e2e
def test_readme_cpu_blocks_run(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "COLUMNS": "120", "NO_COLOR": "1"}  # fmt: skip
    for i, block in enumerate(cpu_blocks(README.read_text())):
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=900)  # fmt: skip
        assert result.returncode == 0, f"README cpu block {i} failed:\n{block}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert (tmp_path / "embeddings" / "joint.npy").is_file()
    assert (tmp_path / "runs" / "tiny" / "eval" / "retrieval-eval" / "metrics.json").is_file()


def test_help_examples_are_real_commands_the_readme_lists():
    text = README.read_text()
    table = [line for line in text.splitlines() if line.startswith("| `pcav ")]
    commands = commands_of(app)
    for path, doc in commands.items():
        example = re.search(r"Example:\s*(pcav [^\n]+)", doc)
        assert example, f"pcav {' '.join(path)} has no Example in its help"
        words = example.group(1).split()[1 : 1 + len(path)]
        assert tuple(words) == path, f"the example of pcav {' '.join(path)} runs pcav {' '.join(words)}"
        assert any(f"`pcav {path[0]}" in row for row in table), f"README's command table lacks pcav {path[0]}"
    for row in table:
        name = row.split("`pcav ")[1].split()[0].rstrip("`")
        assert any(path[0] == name for path in commands), f"README lists pcav {name}, which does not exist"
