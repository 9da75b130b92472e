"""``fastpref check``: gradient-parity self-test of every backend (and loss) available here.

Each row runs a fused computation and its eager reference (``fastpref.reference``) on the same random
inputs, applies the same random upstream gradients, and reports the largest relative error over the
outputs and the gradients. Exit status 1 if any row exceeds its tolerance. The suites are listed in
:data:`SUITES`; their cases live in :mod:`fastpref.testing`.

``--device cuda`` runs the GPU device check instead (:mod:`fastpref.device_check`: every shipped kernel
configuration forced once, fp64-truth parity at realistic shapes by the eager-error rule, bias and precision
cases, determinism, the host-sync count) and writes ``device_check.json`` / ``device_check.md`` under
``--out``. ``--device cpu-interpret --tiny`` (tests only) is the same on tiny shapes under Triton's interpreter.
"""
from __future__ import annotations

import argparse
import functools
import os
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from .. import testing

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
#: Default time budget of ``--device cuda`` (with ``fastpref bench --device cuda --quick``: under 8 min on an H100).
DEVICE_BUDGET_S = 240.0


class Suite(NamedTuple):
    """One group of ``fastpref check`` rows: ``run(dtype, seed) -> [(case, rel_err)]`` for each dtype."""

    run: Callable[[torch.dtype, int], List[testing.Row]]
    dtypes: Tuple[torch.dtype, ...] = (torch.float64, torch.float32)
    backend: Optional[str] = None  # runs only when this backend is checked; None: always


#: Every suite, in table order.
SUITES: Dict[str, Suite] = {
    "fused_logprobs[torch]": Suite(functools.partial(testing.check_core, "torch"), backend="torch"),
    # The Triton kernels take no float64 (tl.dot accumulates in fp32): fp32 rows only.
    "fused_logprobs[triton]": Suite(functools.partial(testing.check_core, "triton"), (torch.float32,), "triton"),
    "modules": Suite(testing.check_modules),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastpref check`` flags: ``--backend`` (repeatable) and ``--seed``."""
    parser.add_argument("--backend", action="append", choices=["torch", "triton"],
                        help="backend(s) to check (default: every one available on this machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda", "cpu-interpret"], default=None,
                        help="cuda: the GPU device check (writes JSON and Markdown to --out); "
                             "default/cpu: the parity table above")
    parser.add_argument("--out", default="bench/out/device-check",
                        help="output directory of --device cuda (default: %(default)s)")
    parser.add_argument("--budget-s", type=float, default=DEVICE_BUDGET_S,
                        help="--device cuda: rows that would start after this many seconds are skipped "
                             "(default: %(default)s)")
    # Test-only: tiny shapes (with --device cpu-interpret under TRITON_INTERPRET=1, the CPU smoke of make test).
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)


def available_backends() -> List[str]:
    """torch always; triton on CUDA, or on CPU under TRITON_INTERPRET=1."""
    backends = ["torch"]
    try:
        import triton  # noqa: F401

        if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            backends.append("triton")
    except ImportError:
        pass
    return backends


def run_device(args: argparse.Namespace) -> int:
    """``--device cuda`` / ``cpu-interpret``: the device check; 1 if any row failed."""
    from .. import device_check

    if args.backend:
        raise SystemExit("fastpref check: --backend applies to the CPU table; --device checks the triton backend")
    try:
        results = device_check.run(args.device, args.out, tiny=args.tiny, seed=args.seed, budget_s=args.budget_s)
    except ValueError as exc:
        raise SystemExit(f"fastpref check: {exc}") from exc
    print(device_check.report.markdown(results))
    s = results["summary"]
    print(f"fastpref check --device {args.device}: {s['ok']} ok, {s['FAIL']} failed, {s['skipped']} skipped; "
          f"wrote {results['files']['json']} and {results['files']['md']}")
    return 1 if s["FAIL"] else 0


def run(args: argparse.Namespace) -> int:
    """Print the table of every suite for the chosen backends; 1 if any row fails its tolerance."""
    if getattr(args, "device", None) not in (None, "cpu"):
        return run_device(args)
    if getattr(args, "tiny", False):
        raise SystemExit("fastpref check: --tiny goes with --device cpu-interpret or cuda")
    backends = args.backend or available_backends()
    failures = 0
    print(f"fastpref check: backends {', '.join(backends)}; relative tolerance fp64 1e-10, fp32 1e-4")
    print(f"{'what':<28}{'dtype':<10}{'case':<14}{'max rel err':>14}  result")
    start = time.perf_counter()
    for label, suite in SUITES.items():
        if suite.backend is not None and suite.backend not in backends:
            continue
        for dtype in suite.dtypes:
            dtype_name = str(dtype).replace("torch.", "")
            for case, err in suite.run(dtype, args.seed):
                ok = err <= TOLERANCE[dtype]
                failures += not ok
                print(f"{label:<28}{dtype_name:<10}{case:<14}{err:>14.2e}  {'ok' if ok else 'FAIL'}")
    print(f"{'all passed' if not failures else f'{failures} FAILED'} in {time.perf_counter() - start:.1f}s")
    return 1 if failures else 0
