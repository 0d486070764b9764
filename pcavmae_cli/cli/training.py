"""What ``pcav pretrain`` and ``pcav finetune`` share once the recipe is loaded: run the loop as
this process's rank (rank 0 draws the bars) and turn a clean stop into one line and exit 130."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from pcavmae_cli.cli.console import RichReporter, console, err_console
from pcavmae_cli.engine.progress import SilentReporter


def run_as_rank(run: Callable[..., Any], cfg: Any) -> Any | None:
    """``run(cfg, reporter)`` in this process; the result on rank 0, ``None`` on the other ranks.
    The header names the threads a micro-batch is split over (``train.replicas``).

    Ctrl-C / SIGTERM: the loop has written ``checkpoints/last``; rank 0 says where and how to go on.
    """
    from pcavmae_cli.engine.train.distributed import shutdown, world_from_env  # imports torch: not for --help
    from pcavmae_cli.engine.train.stop import Interrupted

    from pcavmae_cli.engine.train.data import loader_workers
    from pcavmae_cli.engine.train.runtime import describe_runtime

    main = world_from_env().rank == 0
    if main and getattr(cfg, "train", None) is not None:
        line = describe_runtime(cfg.train, cfg.data.loader.batch_size, getattr(cfg, "model", None))
        console.print(f"runtime: {line}", highlight=False)
        asked, workers = cfg.data.loader.num_workers, loader_workers(cfg.data.loader.num_workers)
        if workers < asked:
            console.print(f"loader: {workers} worker process{'es' * (workers != 1)} per loader "
                          f"(data.loader.num_workers {asked}, at most the CPUs this process may use)",
                          highlight=False)  # fmt: skip
    try:
        result = run(cfg, RichReporter(bar_width=None) if main else SilentReporter())
    except Interrupted as stop:
        if not main:
            raise typer.Exit(130) from None
        where = f"wrote {stop.checkpoint} at step {stop.step}" if stop.checkpoint else "nothing written"
        err_console.print(
            f"[yellow]stopped[/] ({stop.reason}): {where}; continue with train.resume=true", highlight=False
        )
        raise typer.Exit(130) from None
    finally:
        shutdown()
    return result if main else None
