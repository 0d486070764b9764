"""``python -m pcavmae_cli`` runs the same CLI as the ``pcav`` console script."""

from pcavmae_cli.cli.app import main

main()
