"""Running the real ``pcav`` console script, as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PCAV = Path(sys.executable).with_name("pcav")


def pcav(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``pcav ARGS`` and capture its output (a wide terminal, so lines are not wrapped)."""
    assert PCAV.is_file(), f"console script not installed next to {sys.executable}"
    return subprocess.run(
        [str(PCAV), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**__import__("os").environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )
