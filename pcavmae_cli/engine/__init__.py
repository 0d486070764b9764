"""The engine: everything the ``pcav`` commands call. Importable without Typer or Rich."""
