"""``fastpref kernels``: ahead-of-time compile every Triton kernel and configuration, print the resource table.

The compilation itself lives in :mod:`fastpref.backends.triton_aot` (no GPU needed).
"""
from __future__ import annotations

import argparse

from ..backends.triton_aot import ARCH_CAPABILITY, compile_all, format_table, report_markdown


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=sorted(ARCH_CAPABILITY), required=True, help="target GPU architecture")
    parser.add_argument("--out", required=True, help="directory for the .ptx files (one per configuration)")
    parser.add_argument("--workers", type=int, default=None, help="parallel compile processes (default: CPUs)")
    parser.add_argument("--report", default=None, help="also write the Markdown kernel report to this file")


def run(args: argparse.Namespace) -> int:
    reports = compile_all(args.arch, args.out, workers=args.workers)
    print(format_table(reports))
    if args.report:
        with open(args.report, "w") as f:
            f.write(report_markdown(args.arch, reports))
    bad = [r for r in reports if r.spill_bytes]
    if bad:
        print(f"\n{len(bad)} configuration(s) spill registers")
    return 1 if bad else 0
