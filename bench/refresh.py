"""Regenerate the committed CPU results and README.md's Performance section in one command.

    python -m fastpref.bench.refresh               # fastpref bench --quick -> bench/results/cpu_quick.md (+ DPO plots),
                                          # then python -m fastpref.bench.readme
    python -m fastpref.bench.refresh --target      # also the DPO target row -> bench/results/cpu_target_dpo.md
    python -m fastpref.bench.refresh --readme-only # only python -m fastpref.bench.readme (from the committed files)

Run it on a quiet machine: the machine line of each table records the load average it saw. The raw runs
(results.json with every repeat) stay under ``bench/out/`` (git-ignored).
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
from typing import Optional, Sequence

from . import readme, runner

QUICK_OUT = os.path.join("bench", "out", "quick")
TARGET_OUT = os.path.join("bench", "out", "target")
TARGET_REPEATS = 3
# The plots the README and bench/README.md point at (the others stay in bench/out/quick).
COMMITTED_PLOTS = ("memory_vs_V_dpo_*.png", "time_vs_N_dpo_*.png")


def refresh_quick(results_dir: str = readme.RESULTS_DIR, threads: Optional[int] = None) -> str:
    runner.run(runner.Config(quick=True, out=QUICK_OUT, threads=threads))
    dest = os.path.join(results_dir, "cpu_quick.md")
    shutil.copyfile(os.path.join(QUICK_OUT, "results.md"), dest)
    for pattern in COMMITTED_PLOTS:
        for path in glob.glob(os.path.join(QUICK_OUT, pattern)):
            shutil.copyfile(path, os.path.join(results_dir, os.path.basename(path)))
    return dest


def refresh_target(results_dir: str = readme.RESULTS_DIR, threads: Optional[int] = None,
                   repeats: int = TARGET_REPEATS) -> str:
    shape = runner.TARGET_SHAPE
    runner.run(runner.Config(out=TARGET_OUT, workloads=["dpo"], repeats=repeats, threads=threads,
                             shapes=[(shape["tokens"], shape["dim"], shape["vocab"], shape["dtype"])]))
    dest = os.path.join(results_dir, "cpu_target_dpo.md")
    shutil.copyfile(os.path.join(TARGET_OUT, "results.md"), dest)
    return dest


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="store_true", help="also rerun the DPO target row (a few minutes)")
    parser.add_argument("--readme-only", action="store_true", help="only rewrite README.md from fastpref.bench/results/")
    parser.add_argument("--quick-threads", type=int, default=None,
                        help=f"torch threads for the quick run (default {runner.QUICK_THREADS})")
    parser.add_argument("--target-threads", type=int, default=None,
                        help="torch threads for the target row (default: torch's choice)")
    args = parser.parse_args(argv)
    if not args.readme_only:
        print(f"wrote {refresh_quick(threads=args.quick_threads)}")
        if args.target:
            print(f"wrote {refresh_target(threads=args.target_threads)}")
    return readme.main([])


if __name__ == "__main__":
    raise SystemExit(main())
