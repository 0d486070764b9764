"""``pcav convert cavmae CKPT OUT``: import a foreign checkpoint into a pcav run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pcavmae_cli.cli import options
from pcavmae_cli.cli.console import console

app = typer.Typer(help="Import checkpoints of other code bases into pcav run folders.", no_args_is_help=True)


@app.command("cavmae")
def cavmae(
    source: Path = typer.Argument(..., help="CAV-MAE .pth (CAVMAE pre-training or CAVMAEFT fine-tuning).", metavar="CKPT"),
    out: Path = typer.Argument(..., help="New run folder to write.", metavar="OUT"),
    recipe: Optional[str] = typer.Option(
        None, "--recipe", "-r", help="Recipe of the model (default: cavmae_base, or finetune_cavmae for CAVMAEFT).",
        metavar="NAME|PATH", show_default=False,
    ),
    mode: str = typer.Option("av", "--mode", help="Fine-tuning checkpoints: the stream(s) the head reads, a/v/av/sum "
                             "(CAV-MAE's audioonly/videoonly/multimodal)."),  # fmt: skip
    overrides: Optional[list[str]] = options.Overrides,
) -> None:
    """Import a CAV-MAE checkpoint (YuanGongND/cav-mae) into a run folder, strictly.

    The checkpoint is read as plain tensors (no code in it runs). Every source key is
    renamed by an explicit rule or dropped for a stated reason (conversion.json lists both);
    every weight of the recipe's model must be filled with the right shape, else the command
    stops naming the key. Position tables that trained (tr_pos) are kept as learned ones. The
    run's config.yaml records CAV-MAE's input normalisation, (fbank + 5.081) / 4.4849 with
    std_scale 1 (override data.audio.fbank.* for a model trained on other statistics). The run
    folder works with pcav finetune --init-from, pcav evaluate and pcav embed.

    Example: pcav convert cavmae cav-mae-scale++.pth runs/cavmae_scalepp
    """
    from pcavmae_cli.engine.convert import convert_cavmae  # imports torch: not for --help
    from pcavmae_cli.engine.errors import UserError

    if mode not in ("a", "v", "av", "sum"):
        raise UserError(f"--mode: expected a, v, av or sum, got '{mode}'")
    result = convert_cavmae(source, out, recipe=recipe, mode=mode, overrides=overrides or [])
    conv = result.conversion
    what = "pre-training (CAVMAE)" if result.kind == "pretrain" else f"fine-tuning (CAVMAEFT, {result.num_classes} classes)"
    positions = conv.pos_embed + (f", decoder {conv.decoder_pos_embed}" if result.kind == "pretrain" else "")
    console.print(
        f"{source}: {what}; {len(conv.mapped)} keys mapped, {len(conv.dropped)} dropped on purpose; "
        f"positions {positions}; recipe {result.recipe}", highlight=False, soft_wrap=True,
    )  # fmt: skip
    console.print(f"wrote {result.checkpoint} and {result.out / 'conversion.json'}", highlight=False, soft_wrap=True)
