"""pytest-benchmark entries for the core op, forward + backward on a small CPU shape.

Not part of ``make test`` (pytest's testpaths is ``tests/``). Run and compare runs with::

    python -m pytest bench/test_bench_core.py --benchmark-autosave          # saves .benchmarks/...
    python -m pytest bench/test_bench_core.py --benchmark-compare           # against the last saved run
"""
import pytest
import torch

from fastpref.bench import measure
from fastpref.bench.workloads import Options, build_case, implementations, release

SHAPE = dict(tokens=512, dim=256, vocab=32000, dtype=torch.float32, device=torch.device("cpu"))


@pytest.mark.parametrize("impl", ["eager", "trl", "fastpref-torch"])
@pytest.mark.parametrize("workload", ["logprobs", "dpo"])
def test_fwd_bwd(benchmark, workload, impl):
    case = build_case(workload, **SHAPE)
    ready, _ = implementations(case, Options(compile=False, impls=(impl,)))
    step = ready[0].step

    def run():
        release(case.params)
        measure.fwd_bwd(step)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in case.params)
