"""Packaging: every package folder is installed, recipes ship inside the package, CI calls the README."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

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


def declared() -> dict[str, str]:
    """``{distribution name: specifier}`` of pyproject's dependencies, its test and download extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    out = {}
    for line in project["dependencies"] + extras["test"] + extras["download"]:
        req = Requirement(line)
        out[canonicalize_name(req.name)] = str(req.specifier)
    return out


def pinned() -> dict[str, str]:
    """``{distribution name: exact version}`` of constraints.txt."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            out[canonicalize_name(name)] = version.strip()
    return out


# Without an upper bound on purpose (a reason each, as pyproject.toml says).
UNBOUNDED = {"yt-dlp": "YouTube changes weekly; only a current yt-dlp keeps up"}


def test_dependencies_are_ranges_with_an_upper_bound():
    """Ranges let pcav join an existing environment; the upper bound keeps a new release (as
    safetensors 0.8's owner-only files were) from arriving untested."""
    for name, spec in declared().items():
        specs = SpecifierSet(spec)
        assert name in UNBOUNDED or any(s.operator in ("<", "<=", "==", "~=") for s in specs), f"{name}{spec}"
    for name in ("torch", "torchvision", "torchaudio"):
        assert not any(s.operator == "==" for s in SpecifierSet(declared()[name])), f"{name} is pinned to one version"


def test_constraints_pin_every_dependency_inside_its_declared_range():
    """constraints.txt (what make test and CI install) is one point of pyproject's ranges."""
    pins = pinned()
    for name, spec in declared().items():
        assert name in pins, f"{name} is not in constraints.txt"
        assert Version(pins[name]) in SpecifierSet(spec), f"constraints.txt {name}=={pins[name]} is outside {spec}"


def test_every_extra_is_in_the_test_extra():
    """The tests run the code paths of every extra, so `make test` installs them all."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    test = {str(Requirement(line)) for line in extras["test"]}
    for name, lines in extras.items():
        assert {str(Requirement(line)) for line in lines} <= test, f"extra {name} is not all in test"


def test_the_download_extra_brings_what_youtube_needs():
    """yt-dlp's challenge solver (yt-dlp-ejs, in yt-dlp[default]) and deno, the runtime it runs in."""
    download = [Requirement(line) for line in
                tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["download"]]
    assert {(canonicalize_name(r.name), frozenset(r.extras)) for r in download} == {
        ("yt-dlp", frozenset({"default"})), ("deno", frozenset()),
    }
    assert "yt-dlp-ejs" in pinned() and "deno" in pinned()


def test_setup_and_container_install_the_constraints():
    for path in ("scripts/setup.sh", "Containerfile", "README.md"):
        text = (ROOT / path).read_text()
        assert re.search(r"pip install [^\n]*-c constraints\.txt -e \S*\.\[test\]", text), path


# Import name of each declared distribution, where it differs.
IMPORT_NAME = {"pyyaml": "yaml", "pillow": "PIL", "ffmpeg-python": "ffmpeg", "imageio-ffmpeg": "imageio_ffmpeg",
               "yt-dlp": "yt_dlp", "scikit-learn": "sklearn"}  # fmt: skip


def test_every_declared_runtime_dependency_is_imported_by_the_package():
    """A dependency nobody imports is weight for every user (tqdm was declared and unused)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    source = "\n".join(p.read_text() for p in (ROOT / "pcavmae_cli").rglob("*.py"))
    for line in project["dependencies"]:
        name = canonicalize_name(Requirement(line).name)
        module = IMPORT_NAME.get(name, name)
        assert re.search(rf"^\s*(import|from) {re.escape(module)}\b", source, re.M), f"{name} is declared but not imported"


def test_cli_help_does_not_import_torch():
    """`pcav --help` must stay instant: torch is imported inside the commands that need it."""
    import subprocess
    import sys

    code = "import sys, pcavmae_cli.cli.app; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
