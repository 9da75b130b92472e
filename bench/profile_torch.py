"""Where the torch backend's time goes at small D: GEMMs vs elementwise/reduction ops vs Python overhead.

    python -m fastpref.bench.profile_torch [--rows dpo:256,dpo:512,logprobs:256,var:256,spo:256]
                                          [--d 128] [--v 32000] [--repeats 7] [--threads 2] [--ab]

For each row: the fastpref-torch step and the eager step timed interleaved (``--repeats`` rounds, medians and
their ratio), then one profiled fastpref-torch step (torch.profiler, CPU). The step's ``aten::`` self times (and
those of the compiled epilogue's Inductor graphs, counted as elementwise) are split by phase (the backend's
forward / backward, and the rest: loss head, autograd, ``prepare``) into GEMMs (``mm``/``addmm``) and everything
else (elementwise and reduction passes, gathers, small vector ops); the phase's wall time minus its op self time
is Python and dispatch overhead (inflated a little by the profiler's own per-op cost, which the unprofiled median
beside it shows). Per tile: the phase's time / its logits tiles.

Runs with the tile epilogue as configured (``FASTPREF_COMPILE_TILES``); ``--ab`` times the step with the
compiled epilogue on and off in the same interleaved rounds (and profiles the compiled one).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from typing import Dict, List

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import fastpref.backends.torch_backend as torch_backend

from . import measure
from .workloads import Options, build_case, implementations, release

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::mv", "aten::bmm")
PHASES = ("fastpref.forward", "fastpref.backward")
COMPILED = "## Call CompiledFxGraph"  # the profiler's range around an Inductor graph's kernels


@contextlib.contextmanager
def _instrumented(tiles: Dict[str, int]):
    """Label the backend's forward and backward with profiler ranges and count their logits tiles."""
    orig = torch_backend._forward, torch_backend._backward_rows, torch_backend._logits_tile
    phase = ["other"]

    def wrap(fn, name):
        def run(*args, **kwargs):
            phase[0] = name
            with record_function(name):
                try:
                    return fn(*args, **kwargs)
                finally:
                    phase[0] = "other"
        return run

    def tile(*args, **kwargs):
        tiles[phase[0]] = tiles.get(phase[0], 0) + 1
        return orig[2](*args, **kwargs)

    torch_backend._forward = wrap(orig[0], PHASES[0])
    torch_backend._backward_rows = wrap(orig[1], PHASES[1])
    torch_backend._logits_tile = tile
    try:
        yield
    finally:
        torch_backend._forward, torch_backend._backward_rows, torch_backend._logits_tile = orig


def _phase_of(event) -> str:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in PHASES:
            return parent.name
        parent = parent.cpu_parent
    return "other"


def profile_step(step, params) -> dict:
    """One profiled step: per phase, wall ms, GEMM / other op self ms, op counts and tiles."""
    tiles: Dict[str, int] = {}
    release(params)
    with _instrumented(tiles), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        measure.fwd_bwd(step)
        wall = time.perf_counter() - start
    out = {p: dict(wall=0.0, gemm=0.0, elem=0.0, gemm_ops=0, elem_ops=0, tiles=tiles.get(p, 0))
           for p in (*PHASES, "other")}
    for ev in prof.events():
        if ev.name in PHASES:
            out[ev.name]["wall"] += ev.cpu_time_total / 1e3
        elif ev.name.startswith(("aten::", COMPILED)):
            row = out[_phase_of(ev)]
            kind = "gemm" if ev.name in GEMM_OPS else "elem"  # a compiled epilogue's kernels count as elementwise
            row[kind] += ev.self_cpu_time_total / 1e3
            row[kind + "_ops"] += 1
    out["other"]["wall"] = wall * 1e3 - out[PHASES[0]]["wall"] - out[PHASES[1]]["wall"]
    for row in out.values():
        row["overhead"] = row["wall"] - row["gemm"] - row["elem"]
    out["step_ms"] = wall * 1e3
    return out


def _timed(steps: Dict[str, callable], params, repeats: int) -> Dict[str, List[float]]:
    for s in steps.values():  # warm-up (and compilation of the tile epilogue, when on)
        measure.fwd_bwd(s)
        release(params)
    timings = measure.time_interleaved({k: (lambda s=s: measure.fwd_bwd(s)) for k, s in steps.items()},
                                       repeats, torch.device("cpu"), before_each=lambda: release(params))
    return {k: t.times_s for k, t in timings.items()}


def _with_compile(step, on: bool):
    def run():
        old = os.environ.get("FASTPREF_COMPILE_TILES")
        os.environ["FASTPREF_COMPILE_TILES"] = "1" if on else "0"
        try:
            return step()
        finally:
            if old is None:
                del os.environ["FASTPREF_COMPILE_TILES"]
            else:
                os.environ["FASTPREF_COMPILE_TILES"] = old
    return run


def run_row(workload: str, n: int, d: int, v: int, repeats: int, ab: bool) -> None:
    case = build_case(workload, n, d, v, torch.float32, torch.device("cpu"))
    impls = {i.name: i.step for i in implementations(case, Options(compile=False, impls=("eager", "fastpref-torch")))[0]}
    steps = {"eager": impls["eager"], "fastpref": impls["fastpref-torch"]}
    if ab:
        steps = {"eager": impls["eager"], "compiled": _with_compile(impls["fastpref-torch"], True),
                 "uncompiled": _with_compile(impls["fastpref-torch"], False)}
    times = _timed(steps, case.params, repeats)
    med = {k: statistics.median(t) * 1e3 for k, t in times.items()}
    best = {k: min(t) * 1e3 for k, t in times.items()}
    head = f"{workload} N={n} D={d} V={v} fp32"
    print(f"\n### {head}\n")
    print("| step | median ms | best ms | x eager (best) |\n|---|---:|---:|---:|")
    for k in med:
        print(f"| {k} | {med[k]:.1f} | {best[k]:.1f} | {med[k] / med['eager']:.2f} ({best[k] / best['eager']:.2f}) |")
    prof = profile_step(impls["fastpref-torch"] if not ab else steps["compiled"], case.params)
    print(f"\nprofiled fastpref step: {prof['step_ms']:.1f} ms (profiler on)\n")
    print("| phase | wall ms | GEMM ms (ops) | elementwise+reduction ms (ops) | Python/dispatch ms | tiles "
          "| per tile: GEMM / elem / overhead us |\n|---|---:|---:|---:|---:|---:|---:|")
    for p in (*PHASES, "other"):
        r = prof[p]
        t = r["tiles"] or 1
        per = f"{1e3 * r['gemm'] / t:.0f} / {1e3 * r['elem'] / t:.0f} / {1e3 * r['overhead'] / t:.0f}" \
            if r["tiles"] else "-"
        print(f"| {p.replace('fastpref.', '')} | {r['wall']:.1f} | {r['gemm']:.1f} ({r['gemm_ops']}) "
              f"| {r['elem']:.1f} ({r['elem_ops']}) | {r['overhead']:.1f} | {r['tiles']} | {per} |")
    release(case.params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="dpo:256,dpo:512,logprobs:256,var:256,spo:256")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ab", action="store_true", help="time the compiled epilogue against the uncompiled one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"load average {[round(x, 2) for x in os.getloadavg()]}; BLOCK_N={torch_backend.BLOCK_N}, "
          f"BLOCK_V={torch_backend.BLOCK_V}; FASTPREF_COMPILE_TILES={os.environ.get('FASTPREF_COMPILE_TILES', '')!r}")
    for spec in args.rows.split(","):
        workload, n = spec.split(":")
        run_row(workload, int(n), args.d, args.v, args.repeats, args.ab)


if __name__ == "__main__":
    main()
