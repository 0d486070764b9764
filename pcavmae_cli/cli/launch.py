"""``--nproc N``: start the same command under torchrun, one process per GPU (or N CPU processes).

``pcav pretrain --nproc 8 ...`` runs
``python -m torch.distributed.run --standalone --nproc-per-node 8 -m pcavmae_cli pretrain ...``
with the same recipe and overrides, waits for it and exits with its code. Each process then finds
torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and joins the process group
(``engine/train/distributed.py``). Several machines are torchrun's own business: run
``torchrun --nnodes M --nproc-per-node N --rdzv-endpoint HOST:PORT -m pcavmae_cli pretrain ...``
on each of them.

Ctrl-C: torchrun starts its workers in their own session and forwards the signal to them once,
so they stop together after writing ``checkpoints/last``; this process only waits for it.

The run folder's lock (``engine/folder_lock.py``) is taken here, before torchrun starts, so a
second run into the same folder fails with one line instead of a failed rank and torchrun's
report; the workers are told that their launcher holds it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.folder_lock import HELD_ENV, folder_lock

NPROC_HELP = (
    "Run on N processes (one per GPU; gloo processes on a CPU machine): starts torchrun for you. "
    "data.loader.batch_size stays the batch of all processes together."
)


def torchrun_command(nproc: int, command: list[str]) -> list[str]:
    """The torchrun command line that runs ``pcav COMMAND...`` on ``nproc`` local processes."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "-m", "pcavmae_cli", *command,
    ]  # fmt: skip


def run_under_torchrun(nproc: int, command: list[str], run_dir: str | Path | None = None) -> int:
    """Run ``pcav COMMAND...`` on ``nproc`` processes and return the exit code (130 after Ctrl-C).

    ``run_dir`` (the recipe's ``train.run_dir``), when given, is locked for the whole run.
    """
    if nproc < 1:
        raise UserError(f"option '--nproc' must be >= 1, got {nproc}")
    if "WORLD_SIZE" in os.environ:
        raise UserError("option '--nproc' is for starting torchrun; this process already runs under it")
    if run_dir is None:
        return _wait(subprocess.Popen(torchrun_command(nproc, command)))
    with folder_lock(run_dir):
        env = {**os.environ, HELD_ENV: str(Path(run_dir).absolute())}
        return _wait(subprocess.Popen(torchrun_command(nproc, command), env=env))


def _wait(proc: subprocess.Popen) -> int:
    """torchrun's exit code, 130 when a Ctrl-C stopped it."""
    interrupted = False
    previous = signal.getsignal(signal.SIGINT)

    def note(_signum, _frame) -> None:  # torchrun got the same Ctrl-C from the terminal
        nonlocal interrupted
        interrupted = True

    signal.signal(signal.SIGINT, note)
    try:
        code = proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted and code != 0:
        return 130
    return code
