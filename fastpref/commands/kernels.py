"""``fastpref kernels``: ahead-of-time compile every Triton kernel and configuration, print the resource table.

The compilation itself lives in :mod:`fastpref.backends.triton_aot` (no GPU needed). The table has the
registers, spills, shared memory and wgmma use of every configuration, and from its SASS the GPU-wide fences,
returning atomics, L1 invalidates and reductions (total and inside loops). The command fails (exit 1) when a
configuration spills or has a fence, a returning atomic or an L1 invalidate inside a loop.
"""
from __future__ import annotations

import argparse

from ..backends.triton_aot import ARCH_CAPABILITY, compile_all, format_table, report_markdown, sass_summary, serialising


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=sorted(ARCH_CAPABILITY), required=True, help="target GPU architecture")
    parser.add_argument("--out", required=True, help="directory for the .ptx and .cubin files (one per configuration)")
    parser.add_argument("--workers", type=int, default=None, help="parallel compile processes (default: CPUs)")
    parser.add_argument("--report", default=None, help="also write the Markdown kernel report to this file")


def run(args: argparse.Namespace) -> int:
    reports = compile_all(args.arch, args.out, workers=args.workers)
    print(format_table(reports))
    print("\n" + sass_summary(reports))
    if args.report:
        with open(args.report, "w") as f:
            f.write(report_markdown(args.arch, reports))
    spilling = [r for r in reports if r.spill_bytes]
    looped = [r for r in reports if serialising(r, in_loops=True)]
    if spilling:
        print(f"\n{len(spilling)} configuration(s) spill registers")
    for r in looped:
        print(f"{r.kernel} {r.variant} {r.config}: {', '.join(serialising(r, in_loops=True))} inside a loop")
    return 1 if spilling or looped else 0
