"""Packaging: every package folder is installed, recipes ship inside the package, CI calls the README."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "pcavmae_cli").rglob("__init__.py")
        if "__pycache__" not in p.parts
    } | {"pcavmae_cli.recipes"}
    assert found == listed


def test_engine_imports_without_typer_or_rich():
    import subprocess
    import sys

    code = (
        "import sys, importlib, pkgutil, pcavmae_cli.engine as e\n"
        "sys.modules['typer'] = None; sys.modules['rich'] = None\n"
        "for m in pkgutil.walk_packages(e.__path__, 'pcavmae_cli.engine.'): importlib.import_module(m.name)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, re.S)
    assert "make test" in blocks[0] and "make demo" in blocks[0]
    assert "exec make test" in (ROOT / ".ci/run").read_text()


def test_pinned_torch_stack():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {"torch==2.9.1", "torchvision==0.24.1", "torchaudio==2.9.1"} <= set(deps)


def test_cli_help_does_not_import_torch():
    """`pcav --help` must stay instant: torch is imported inside the commands that need it."""
    import subprocess
    import sys

    code = "import sys, pcavmae_cli.cli.app; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
