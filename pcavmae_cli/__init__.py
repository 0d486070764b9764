"""pcav: PCAV-MAE (prototypical contrastive audio-visual masked autoencoder) as a tool.

The package has two layers: ``pcavmae_cli.engine`` does all the work and imports no
command-line library; ``pcavmae_cli.cli`` is a thin Typer + Rich layer over it.
"""

__version__ = "0.1.0"
