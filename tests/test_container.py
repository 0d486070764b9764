"""The Containerfile: its instructions, the install command it shares with the README and
scripts/setup.sh, and hadolint where it is installed (``hadolint`` on PATH)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        current += " " + line.rstrip("\\").strip() if current else line.rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    out = []
    for line in lines:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def pip_install_args(command: str) -> list[str]:
    """The arguments of ``python -m pip install ...`` that are not pip's own output/cache flags."""
    words = shlex.split(command)
    i = words.index("install")
    assert words[i - 2 : i] == ["-m", "pip"], command
    quiet = {"--quiet", "-q", "--no-cache-dir", "--disable-pip-version-check"}
    return [w for w in words[i + 1 :] if w not in quiet]


def install_lines(text: str) -> list[str]:
    return [m.group(0) for m in re.finditer(r"\S*python -m pip install [^\n&]*-e [^\n&]+", text)]


def test_containerfile_instructions():
    ins = instructions((ROOT / "Containerfile").read_text())
    names = [name for name, _ in ins]
    args = dict(ins)
    base = next(a for n, a in ins if n == "ARG" and a.startswith("BASE_IMAGE=")).split("=", 1)[1]
    assert args["FROM"] == "${BASE_IMAGE}"
    torch_pin = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert re.fullmatch(rf"pytorch/pytorch:{re.escape(torch_pin)}-cuda[\d.]+-cudnn\d+-runtime", base), base
    apt = next(a for n, a in ins if n == "RUN" and "apt-get install" in a)
    assert "ffmpeg" in apt.split() and "rm -rf /var/lib/apt/lists" in apt
    user = [a for n, a in ins if n == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert names.index("USER") > max(i for i, (n, a) in enumerate(ins) if n == "RUN")  # installs run before it
    assert args["ENTRYPOINT"] == '["pcav"]'
    ignored = (ROOT / ".containerignore").read_text().split()
    for path in (".git", ".venv", "runs", "data"):
        assert path in ignored


def test_containerfile_installs_as_the_readme_and_setup_script_do():
    container = [a for n, a in instructions((ROOT / "Containerfile").read_text()) if n == "RUN" and "pip install" in a]
    readme = install_lines((ROOT / "README.md").read_text())
    setup = [line for line in install_lines((ROOT / "scripts" / "setup.sh").read_text()) if "-e" in line]
    assert len(container) == 1 and readme and setup
    want = pip_install_args(readme[0])
    assert want == ["-c", "constraints.txt", "-e", ".[test]"]
    assert pip_install_args(container[0]) == want
    assert pip_install_args(setup[0]) == want


def test_hadolint_where_installed():
    """hadolint's verdict when it is on PATH; the instruction checks above hold regardless."""
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        assert instructions("FROM x\nRUN a \\\n  b\n") == [("FROM", "x"), ("RUN", "a b")]  # the parser the checks rely on
        return
    result = subprocess.run([hadolint, str(ROOT / "Containerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
