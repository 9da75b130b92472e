"""Triton backend parity on CPU, through Triton's interpreter (run in a subprocess: see the script)."""
import importlib.util
from pathlib import Path

import pytest
import torch
from _interpret import run_interpreted

import fastpref

SCRIPT = Path(__file__).with_name("triton_interpret_cases.py")
_spec = importlib.util.spec_from_file_location("triton_interpret_cases", SCRIPT)
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)

FP32_RTOL = 1e-4  # the interpreter's tl.dot is numpy fp32: only summation order differs
BF16_SLACK = 1e-3  # bf16 rule: fused error vs fp64 truth <= eager bf16 error + this


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("interp") / "results.json"
    return run_interpreted(SCRIPT, out, timeout=600)


@pytest.mark.parametrize("name", list(cases.CASES))
def test_fp32_parity_with_eager_and_torch_backend(results, name):
    res = results[name]
    keys = res["keys"]
    assert {"logps", "token_logps", "d_hidden", "d_weight"} <= set(keys)
    spec = cases.CASES[name]
    if spec.get("kl"):
        assert {"kl", "token_kl", "ref_logps"} <= set(keys)
    if spec.get("bias"):
        assert "d_bias" in keys
    for key in keys:
        assert res[f"{key}/eager"] < FP32_RTOL, (key, res[f"{key}/eager"])
        assert res[f"{key}/torch"] < FP32_RTOL, (key, res[f"{key}/torch"])
    assert res["no_grad/token_logps"] < FP32_RTOL
    # large vocabularies go through the split forward and the combine kernel, small ones do not
    assert (res["n_splits"] > 1) == name.startswith("vocab_split"), res["n_splits"]
    # ... and through several chunks of the deterministic backward
    assert (res["n_chunks"] > 1) == name.startswith("vocab_split"), res["n_chunks"]


@pytest.mark.parametrize("name", list(cases.CASES))
def test_atomic_backward_matches_and_default_is_bitwise_deterministic(results, name):
    """The fused atomic backward (deterministic=False) against eager; the default chunked backward run twice
    gives the same bits."""
    res = results[name]
    for key in res["keys"]:
        assert res[f"{key}/atomic"] < FP32_RTOL, (key, res[f"{key}/atomic"])
        assert res[f"{key}/bitwise_rerun"], key


@pytest.mark.parametrize("name", cases.BF16_CASES)
def test_bf16_no_worse_than_eager_bf16(results, name):
    res = results["bf16_" + name]
    for key in res["keys"]:
        fused, eager = res[f"{key}/fused_vs_truth"], res[f"{key}/eager_vs_truth"]
        assert fused <= eager + BF16_SLACK, (key, fused, eager)


def _small_inputs(dtype):
    return torch.randn(5, 8, dtype=dtype), torch.randn(11, 8, dtype=dtype), torch.randint(0, 11, (5,))


def test_triton_backend_rejects_float64():
    h, w, t = _small_inputs(torch.float64)
    with pytest.raises(TypeError, match="float64"):
        fastpref.fused_logprobs(h, w, t, seq_ids=torch.zeros(5, dtype=torch.long), backend="triton")


def test_triton_backend_needs_cuda_or_interpreter():
    from fastpref.backends import triton_backend

    if triton_backend.interpreting():
        pytest.skip("this process runs the interpreter, where CPU tensors are accepted")
    h, w, t = _small_inputs(torch.float32)
    with pytest.raises(ValueError, match="CUDA"):
        fastpref.fused_logprobs(h, w, t, seq_ids=torch.zeros(5, dtype=torch.long), backend="triton")


def test_auto_backend_is_torch_for_cpu_tensors():
    from fastpref._prepare import prepare

    h, w, t = _small_inputs(torch.float32)
    assert prepare(h, w, t, seq_ids=torch.zeros(5, dtype=torch.long)).backend == "torch"
