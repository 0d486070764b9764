"""``pcav bench --append``: the results as a Markdown section of docs/benchmarks.md.

Each section names the date, the machine, the command and the machine load (``os.getloadavg``),
so that figures from different runs can be told apart and compared fairly.
"""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch


def machine() -> str:
    """One line: CPU (or GPU), cores, torch version and threads."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def load() -> str:
    """The 1-, 5- and 15-minute load averages, as ``uptime`` prints them."""
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def section(command: str, tables: list[tuple[str, list[str], list[list[str]]]]) -> str:
    """A ``### pcav bench`` section: date, machine, load, command, then one titled table each."""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        f"### pcav bench, {date}",
        "",
        f"Machine: {machine()}; load average {load()}.",
        "",
        f"`{command}`",
    ]
    for title, header, rows in tables:
        parts += ["", f"{title}:", "", markdown_table(header, rows)]
    return "\n".join(parts) + "\n"


def append_section(path: str | Path, text: str) -> Path:
    """Append ``text`` to ``path`` (created if missing), separated by a blank line."""
    path = Path(path)
    before = path.read_text() if path.exists() else "# Benchmarks\n"
    path.write_text(before.rstrip("\n") + "\n\n" + text)
    return path
