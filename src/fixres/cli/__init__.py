"""Subcommands of the ``fixres`` CLI: argument parsing and config building only (the CLI edge).

Modules here must stay light at import time (no torch): heavy imports go inside ``run``.
"""
