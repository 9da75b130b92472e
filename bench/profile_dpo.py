"""Profile one fwd+bwd step of fastpref-torch DPO and print where the time goes (GEMMs vs the rest).

    OMP_NUM_THREADS=1 python -m fastpref.bench.profile_dpo --n 4096 --d 1024 --v 32000 [--block-n 1024 --block-v 8192]

``--block-n/--block-v`` override the torch backend's tile sizes (module constants) for the experiment.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fastpref.backends.torch_backend as torch_backend

from . import measure
from .workloads import Options, build_case, implementations, release

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--block-n", type=int)
    parser.add_argument("--block-v", type=int)
    args = parser.parse_args()
    if args.block_n:
        torch_backend.BLOCK_N = args.block_n
    if args.block_v:
        torch_backend.BLOCK_V = args.block_v
    case = build_case("dpo", args.n, args.d, args.v, torch.float32, torch.device("cpu"))
    step = implementations(case, Options(compile=False, impls=("fastpref-torch",)))[0][0].step
    measure.fwd_bwd(step)  # warm-up
    release(case.params)
    start = time.perf_counter()
    measure.fwd_bwd(step)
    print(f"step {time.perf_counter() - start:.2f} s, BLOCK_N={torch_backend.BLOCK_N}, BLOCK_V={torch_backend.BLOCK_V}")
    release(case.params)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        measure.fwd_bwd(step)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"{e.key:<32}{e.count:>7}{e.self_cpu_time_total / 1e6:>9.2f} s {100 * e.self_cpu_time_total / total:5.1f}%")
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
    print(f"GEMM share {100 * gemm / total:.1f}% of {total / 1e6:.2f} s self time")


if __name__ == "__main__":
    main()
