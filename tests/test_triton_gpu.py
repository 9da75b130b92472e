"""Triton backend on a real GPU at realistic shapes (skipped without CUDA, see conftest.py)."""
import importlib.util
from pathlib import Path

import pytest
import torch

import fastpref
from fastpref.reference import fused_logprobs as eager_fused_logprobs

_spec = importlib.util.spec_from_file_location("triton_interpret_cases",
                                               Path(__file__).with_name("triton_interpret_cases.py"))
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)

pytestmark = pytest.mark.gpu
FP32_RTOL = 1e-4
BF16_SLACK = 2e-3


def on_cuda(case):
    move = lambda v: v.cuda() if isinstance(v, torch.Tensor) else v  # noqa: E731
    return dict(inputs={k: move(v) for k, v in case["inputs"].items()},
                kwargs={k: move(v) for k, v in case["kwargs"].items()},
                targets=move(case["targets"]), upstream={k: move(v) for k, v in case["upstream"].items()})


REALISTIC = {
    "padded_kl_forward_softcap": dict(S=4, T=1024, D=2048, V=32000, bias=True, ref="shared", kl="forward",
                                      softcap=30.0, temperature=0.9),
    "packed_kl_reverse_separate_head": dict(layout="packed", lengths=[700, 1, 1500, 333, 1562], D=2048, D_ref=1024,
                                            V=32000, ref="separate", kl="reverse"),
    "large_vocab_no_ref": dict(S=2, T=1024, D=1024, V=128256, bias=True),
}


@pytest.fixture(autouse=True)
def exact_fp32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # eager fp32 and the kernels' fp32 dot: both exact
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("name", list(REALISTIC))
def test_fp32_parity_at_realistic_shapes(name):
    case = on_cuda(cases.make_case(torch.float32, seed=7, **REALISTIC[name]))
    tri = cases.run(fastpref.fused_logprobs, case, backend="triton")
    eager = cases.run(eager_fused_logprobs, case)
    for key in eager:
        err = cases.rel_err(tri[key], eager[key])
        assert err < FP32_RTOL, (key, err)


@pytest.mark.parametrize("name", list(REALISTIC))
def test_bf16_no_worse_than_eager_bf16(name):
    case = on_cuda(cases.make_case(torch.bfloat16, seed=8, **REALISTIC[name]))
    truth = cases.run(eager_fused_logprobs, case, dtype=torch.float64)
    eager = cases.run(eager_fused_logprobs, case)
    tri = cases.run(fastpref.fused_logprobs, case, backend="triton")
    for key in truth:
        fused_err, eager_err = cases.rel_err(tri[key], truth[key]), cases.rel_err(eager[key], truth[key])
        assert fused_err <= eager_err + BF16_SLACK, (key, fused_err, eager_err)


def test_auto_backend_picks_triton_for_cuda_tensors():
    from fastpref._prepare import prepare

    case = on_cuda(cases.make_case(torch.bfloat16, seed=9, S=2, T=64, D=256, V=1000))
    prep = prepare(case["inputs"]["hidden"], case["inputs"]["weight"], case["targets"], **case["kwargs"])
    assert prep.backend == "triton"
    auto = fastpref.fused_logprobs(case["inputs"]["hidden"], case["inputs"]["weight"], case["targets"],
                                   **case["kwargs"])
    torch_backend = fastpref.fused_logprobs(case["inputs"]["hidden"], case["inputs"]["weight"], case["targets"],
                                            backend="torch", **case["kwargs"])
    assert cases.rel_err(auto.logps.double(), torch_backend.logps.double()) < 1e-4


def test_no_grad_forward_never_allocates_logits():
    """N=8192 positions x V=128256 fp32 logits would be 4 GiB; the kernel needs only [N] vectors."""
    case = on_cuda(cases.make_case(torch.bfloat16, seed=10, S=8, T=1024, D=1024, V=128256, ref="shared",
                                   kl="forward"))
    with torch.no_grad():  # first call autotunes, and Triton's benchmark allocates an L2-flush buffer
        fastpref.fused_logprobs(case["inputs"]["hidden"], case["inputs"]["weight"], case["targets"],
                                **case["kwargs"])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        stats = fastpref.fused_logprobs(case["inputs"]["hidden"], case["inputs"]["weight"], case["targets"],
                                        **case["kwargs"])
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(stats.kl).all() and (stats.kl > -1e-3).all()
    assert extra < 64 * 2**20, f"forward used {extra / 2**20:.0f} MiB beyond its inputs"
