"""pcav: PCAV-MAE (prototypical contrastive audio-visual masked autoencoder) as a tool.

The package has two layers: ``pcavmae_cli.engine`` does all the work and imports no
command-line library; ``pcavmae_cli.cli`` is a thin Typer + Rich layer over it.
"""

__version__ = "0.1.0"


def load(path, **options):
    """A trained run (run folder, checkpoint folder, or converted CAV-MAE model), ready for
    ``predict`` / ``embed`` on your own files: ``pcavmae_cli.engine.inference.load``.

        model = pcavmae_cli.load("runs/finetune")
        model.predict("clip.mp4").top
    """
    from pcavmae_cli.engine.inference import load as _load  # imports torch only when used

    return _load(path, **options)
