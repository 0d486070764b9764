"""The CLI through its real entry point: help for every command, one-line user errors."""

from __future__ import annotations

import pytest
import yaml

from tests.cli_helpers import pcav

COMMANDS = [
    "demo", "demo-data", "download", "preprocess", "pack", "stats", "pretrain", "finetune", "evaluate", "recipes", "visualize",
    "explain", "embed", "convert", "bench",
]  # fmt: skip
SUBCOMMANDS = (
    [[c] for c in COMMANDS]
    + [["recipes", s] for s in ("list", "show", "copy")]
    + [["visualize", s] for s in ("tsne", "reconstruct", "curves", "health", "prototypes")]
    + [["convert", "cavmae"]]
)


def test_root_help_lists_every_command():
    result = pcav("--help")
    assert result.returncode == 0, result.stderr
    listed = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("│ ") and len(line.split()) > 2}
    assert set(COMMANDS) <= listed, f"missing from --help: {set(COMMANDS) - listed}"


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(command):
    result = pcav(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage: pcav " + " ".join(command) in result.stdout
    if command not in (["recipes"], ["visualize"], ["convert"]):
        assert "Example" in result.stdout


def test_square_brackets_in_help_and_errors_are_printed_not_taken_for_markup(tmp_path):
    assert 'pip install "pcavmae-cli[download]"' in pcav("download", "--help").stdout
    missing = tmp_path / "[x]" / "r.yaml"
    result = pcav("recipes", "show", str(missing))
    assert result.returncode == 1 and f"recipe file not found: {missing}" in result.stderr


def test_version():
    result = pcav("--version")
    assert result.returncode == 0 and result.stdout.startswith("pcav ")


def test_recipes_list_and_show_with_override():
    listed = pcav("recipes", "list")
    assert listed.returncode == 0 and "demo" in listed.stdout and "base" in listed.stdout
    shown = pcav("recipes", "show", "demo", "data.loader.batch_size=4")
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["data"]["loader"]["batch_size"] == 4


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.loader.batchsize=3", "error: unknown key 'data.loader.batchsize'"),
        ("data.loader.batch_size=x", "error: key 'data.loader.batch_size' expects int, got 'x'"),
        ("nonsense", "error: override 'nonsense' is not of the form key.sub=value"),
    ],
)
def test_recipe_errors_are_one_line_and_exit_1(override, message):
    result = pcav("recipes", "show", "demo", override)
    assert result.returncode == 1
    assert result.stderr.strip() == message or result.stderr.strip().startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_recipes_copy_writes_a_standalone_recipe(tmp_path):
    result = pcav("recipes", "copy", "demo", str(tmp_path))
    assert result.returncode == 0, result.stderr
    copied = tmp_path / "demo.yaml"
    assert "extends" not in yaml.safe_load(copied.read_text())
    again = pcav("recipes", "copy", "demo", str(tmp_path))
    assert again.returncode == 1 and "exists; pass --force" in again.stderr
    shown = pcav("recipes", "show", str(copied))
    assert shown.returncode == 0 and yaml.safe_load(shown.stdout) == yaml.safe_load(pcav("recipes", "show", "demo").stdout)


def test_stats_on_a_missing_manifest_is_a_user_error(tmp_path):
    result = pcav("stats", str(tmp_path / "nope.jsonl"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: manifest not found: {tmp_path / 'nope.jsonl'}"


def test_help_text_reflows_sentences_and_keeps_meant_breaks():
    from pcavmae_cli.cli.help_text import reflow

    doc = """Summary that was wrapped
        at the source's width.

        A sentence,
        continued. A second line kept:
          indented kept
        - a bullet
          under it

        Example:
          pcav demo out
          --flag
        """
    assert reflow(doc) == (
        "Summary that was wrapped at the source's width.\n\n"
        "A sentence, continued. A second line kept:\n  indented kept\n- a bullet\n  under it\n\n"
        "Example:\n  pcav demo out\n  --flag"
    )


def test_no_command_help_breaks_a_sentence_across_lines():
    """Every registered command, sub-commands too: a line ends a sentence or the next is indented."""
    import typer.main

    from pcavmae_cli.cli.app import app

    def commands(group, path):
        for name, sub in getattr(group, "commands", {}).items():
            yield [*path, name], sub
            yield from commands(sub, [*path, name])

    seen = 0
    for path, command in commands(typer.main.get_command(app), []):
        seen += 1
        for paragraph in (command.help or "").split("\n\n"):
            if paragraph.startswith("Example"):
                continue
            lines = paragraph.split("\n")
            for line, following in zip(lines, lines[1:]):
                assert line.rstrip().endswith((".", ":", "!", "?")) or following.startswith((" ", "- ")), (
                    path, line)
    assert seen >= 20
