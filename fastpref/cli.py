"""The ``fastpref`` command line: ``fastpref {check,kernels,bench} ...`` (also ``python -m fastpref``)."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# Each subcommand lives in fastpref/commands/<name>.py with ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS = {
    "check": "gradient-parity self-test of every loss and backend available on this machine",
    "kernels": "compile every Triton kernel/config ahead of time for a GPU arch and report registers/spills",
    "bench": "memory/throughput benchmark suite against eager PyTorch, TRL, Liger-Kernel and Cut Cross-Entropy",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastpref", description="Fused preference-optimization losses.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"fastpref.commands.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(f"fastpref.commands.{args.command}")
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
