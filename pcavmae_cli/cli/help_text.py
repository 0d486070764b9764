"""Command help that reflows to the terminal's width.

Typer's rich help keeps every line break of a docstring, so a sentence wrapped at the source's
line length breaks again at 80 columns into a ragged pair of lines. ``reflow`` joins a line to the
one before it when that one ends mid-sentence, and keeps the breaks a docstring means: after a
full stop or a colon, before an indented or bulleted line, and in ``Example`` paragraphs (the
commands there are copied as written).
"""

from __future__ import annotations

import inspect

import typer

SENTENCE_ENDS = (".", ":", "!", "?")


def reflow(doc: str) -> str:
    """``doc`` (a docstring) dedented, with the lines of each sentence joined."""
    return "\n\n".join(_reflow_paragraph(p) for p in inspect.cleandoc(doc).split("\n\n"))


def _reflow_paragraph(paragraph: str) -> str:
    if paragraph.startswith(("Example", "\b")):
        return paragraph
    first, *rest = paragraph.split("\n")
    lines = [first]
    for line in rest:
        if line.startswith((" ", "- ", "* ")) or lines[-1].rstrip().endswith(SENTENCE_ENDS):
            lines.append(line)
        else:
            lines[-1] = f"{lines[-1].rstrip()} {line.strip()}"
    return "\n".join(lines)


def reflow_commands(app: typer.Typer) -> None:
    """Reflow the help of every command of ``app`` and of its sub-apps (call once all are added)."""
    for command in app.registered_commands:
        command.help = reflow(command.help or inspect.getdoc(command.callback) or "")
    for group in app.registered_groups:
        reflow_commands(group.typer_instance)
