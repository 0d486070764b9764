"""The command-line layer: Typer commands that parse arguments and call the engine."""
