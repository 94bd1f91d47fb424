"""Thin DVC stage entry points: `python -m stages.<name> [--params params.yaml]`."""
