"""Vocabulary parallelism through the Triton kernels: two gloo processes on CPU, the kernels in Triton's
interpreter (``TRITON_INTERPRET=1`` reaches the spawned children through the environment, before they
first import ``fastpref.kernels``). Each rank holds an unequal slice of the head; outputs, dH and each
rank's slice of dW/db equal the unsharded eager reference, for the deterministic (chunked) backward and
the fused atomic one."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("triton")

from test_distributed import VP_CASES, _run_case, _vp_inputs, run_distributed  # noqa: E402

import fastpref  # noqa: E402
import fastpref.reference  # noqa: E402

FIELDS = ("logps", "lengths", "token_logps", "ref_logps", "ref_token_logps", "kl", "token_kl")
OPTIONS = {"chunked": fastpref.KernelOptions(workspace_bytes=1), "atomic": fastpref.KernelOptions(deterministic=False)}


def _triton_vocab_parallel_worker(rank: int, world: int) -> dict:
    from fastpref.backends import triton_backend

    assert triton_backend.interpreting(), "the children must run the kernels in the interpreter"
    torch.set_num_threads(1)
    group = dist.new_group(list(range(world)))
    checked = {name: 0 for name in OPTIONS}
    for i, case in enumerate(VP_CASES):
        inp, coef = _vp_inputs(case, torch.float32, seed=200 + i)
        lo = sum(case["splits"][:rank])
        hi = lo + case["splits"][rank]

        def local(t):
            return None if t is None else t[lo:hi].clone()

        full_stats, full_grads = _run_case(fastpref.reference.fused_logprobs, case, inp, coef)
        sharded = dict(inp, weight=local(inp["weight"]), bias=local(inp["bias"]),
                       ref_weight=local(inp["ref_weight"]), ref_bias=local(inp["ref_bias"]))
        for name, options in OPTIONS.items():
            stats, grads = _run_case(fastpref.fused_logprobs, case, sharded, coef, backend="triton",
                                     vocab_parallel_group=group, options=options)
            for field in FIELDS:
                want, got = getattr(full_stats, field), getattr(stats, field)
                assert (want is None) == (got is None), (case["name"], field)
                if want is not None:
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5,
                                               msg=lambda m: f"{name} {case['name']} {field}: {m}")
                    checked[name] += 1
            labels = ["dH", "dW"] + (["db"] if case["bias"] else [])
            for label, got, want in zip(labels, grads, full_grads):
                want = want if label == "dH" else want[lo:hi]
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{name} {case['name']} {label}: {m}")
                checked[name] += 1
    return checked


def test_triton_vocab_parallel_matches_unsharded(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    results = run_distributed(_triton_vocab_parallel_worker, tmp_path=tmp_path)
    # every field and gradient of every case, for both backwards, on both ranks
    assert results == [{"chunked": 32, "atomic": 32}] * 2
