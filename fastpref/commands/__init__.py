"""Subcommands of the ``fastpref`` CLI, one module each (see fastpref/cli.py)."""
