"""``fastpref bench``: memory/throughput suite vs eager PyTorch, TRL, Liger-Kernel and Cut Cross-Entropy.

Runs the grid of bench/runner.py (``--quick``: a small CPU grid that finishes in under 3 minutes) and
writes ``results.json``, ``results.md`` and PNG plots under ``--out``. ``--n/--d/--v/--dtype`` replace
the grid by their cartesian product.

``--device cuda --quick`` runs the GPU benchmark of bench/gpu.py instead: the issue's two target rows
(DPO with a reference at N=8192, D=4096, V=128256; the log-prob op at V=151936) against the measured cuBLAS
floor, eager, Liger, Cut Cross-Entropy and TRL's chunked path, with the cost model's prediction beside
each row; it writes ``gpu_bench.json`` and ``gpu_bench.md``. ``--device cpu-interpret --tiny`` (tests
only) is the same on tiny shapes under Triton's interpreter.

Optional packages (memray, matplotlib, rich, the peers) are looked up first: each missing one is reported
in one line with the pip extra that installs it, and the run goes on without it (a missing peer is skipped,
memory without memray is marked not measured, no plots without matplotlib), with the same note in the
results. results.json and results.md are written before the plots.
"""
from __future__ import annotations

import argparse
import os
import sys

DEFAULT_OUT = "bench/out"


def _int_list(text: str):
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _str_list(text: str):
    return [x for x in text.split(",") if x]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastpref.bench.workloads import IMPLEMENTATIONS, WORKLOADS

    parser.add_argument("--quick", action="store_true",
                        help="small CPU grid (fp32, D=128, N<=512), 3 repeats, 1 torch thread; under 3 minutes")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    parser.add_argument("--device", choices=["cpu", "cuda", "cpu-interpret"], default="cpu",
                        help="cuda with --quick: the GPU target rows vs the cuBLAS floor and the cost model")
    # Test-only: tiny shapes of the GPU benchmark (with --device cpu-interpret under TRITON_INTERPRET=1).
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--losses", type=_str_list, default=list(WORKLOADS),
                        help=f"comma-separated workloads from {','.join(WORKLOADS)} (default: all)")
    parser.add_argument("--impls", type=_str_list, default=list(IMPLEMENTATIONS),
                        help=f"comma-separated implementations from {','.join(IMPLEMENTATIONS)}")
    parser.add_argument("--n", type=_int_list, help="tokens per row, e.g. 1024,4096 (replaces the grid)")
    parser.add_argument("--d", type=_int_list, help="hidden sizes (with --n)")
    parser.add_argument("--v", type=_int_list, help="vocabulary sizes (with --n)")
    parser.add_argument("--dtype", type=_str_list, help="dtypes fp32,bf16 (with --n)")
    parser.add_argument("--repeats", type=int, help="timed repeats per implementation (default 3 quick, 5 full)")
    parser.add_argument("--no-compile", action="store_true",
                        help="no torch.compile: Liger runs compiled=False, CCE (CPU: torch.compile only) is skipped")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--max-logits-gib", type=float, default=None,
                        help="skip implementations that would materialize more logits than this (default 8)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: 1 with --quick, else torch's choice; "
                             "1 is steadier on a busy machine)")
    parser.add_argument("--seed", type=int, default=0)


def run_gpu(args: argparse.Namespace) -> int:
    """``--device cuda --quick`` / ``--device cpu-interpret --tiny``: bench/gpu.py."""
    from fastpref.bench import gpu, runner

    # The same up-front report as the CPU grid: the GPU rows skip a missing peer (gpu.implementations).
    device = "cpu" if args.device == "cpu-interpret" else args.device  # the interpreter's memory is memray's
    for dep in runner.missing_dependencies(runner.Config(device=device, plots=False, show=False)):
        print(f"fastpref bench: {runner.dependency_note(dep)}", file=sys.stderr)
    out = args.out if args.out != DEFAULT_OUT else os.path.join(DEFAULT_OUT, "gpu")
    cfg = gpu.Config(device=args.device, out=out, tiny=args.tiny, repeats=args.repeats, compile=not args.no_compile,
                     seed=args.seed)
    try:
        results = gpu.run(cfg)
    except ValueError as exc:
        raise SystemExit(f"fastpref bench: {exc}") from exc
    print(gpu.markdown(results))
    print(f"fastpref bench: wrote {results['files']['json']} and {results['files']['md']}")
    return 0


def run(args: argparse.Namespace) -> int:
    from fastpref.bench import runner

    if args.device == "cpu-interpret" or args.tiny or (args.device == "cuda" and args.quick):
        if args.device == "cpu":
            raise SystemExit("fastpref bench: --tiny goes with --device cpu-interpret or cuda")
        if any(x is not None for x in (args.n, args.d, args.v, args.dtype)):
            raise SystemExit("fastpref bench: --n/--d/--v/--dtype do not apply to --device cuda --quick (fixed rows)")
        return run_gpu(args)
    from fastpref.bench.workloads import IMPLEMENTATIONS

    bad = [i for i in args.impls if i not in IMPLEMENTATIONS]
    if bad:
        raise SystemExit(f"fastpref bench: --impls: unknown {bad}; choose from {IMPLEMENTATIONS}")
    shapes = None
    if any(x is not None for x in (args.n, args.d, args.v, args.dtype)):
        quick = runner.QUICK_SHAPES[0] if args.quick else runner.FULL_SHAPES[0]
        shapes = runner.shapes_from(args.n or [quick[0]], args.d or [quick[1]], args.v or [quick[2]],
                                    args.dtype or [quick[3]])
    cfg = runner.Config(
        quick=args.quick, out=args.out, device=args.device, workloads=args.losses, impls=args.impls,
        shapes=shapes, repeats=args.repeats, compile=not args.no_compile, plots=not args.no_plots,
        seed=args.seed, threads=args.threads, max_logits_gib=args.max_logits_gib or runner.DEFAULT_MAX_LOGITS_GIB,
    )
    try:
        results = runner.run(cfg)
    except ValueError as exc:
        raise SystemExit(f"fastpref bench: {exc}") from exc
    print(f"fastpref bench: wrote {results['files']['results.json']}, {results['files']['results.md']} "
          f"and {len(results['files']['plots'])} plots in {cfg.out}")
    return 0
