"""Shipped YAML recipes; installed as the package data ``pcavmae_cli.recipes``."""
