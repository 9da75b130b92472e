"""Triton backend on a real GPU at realistic shapes (skipped without CUDA, see conftest.py)."""
import pytest
import torch

import fastpref
from fastpref.reference import fused_logprobs as eager_fused_logprobs
from fastpref.testing import make_core_case, rel_err, run_core

pytestmark = pytest.mark.gpu
FP32_RTOL = 1e-4
BF16_SLACK = 2e-3


def cuda_case(dtype, seed, **spec):
    """A fastpref.testing.make_core_case case, on the GPU."""
    return make_core_case(dtype, seed, device="cuda", **spec)


REALISTIC = {
    "padded_kl_forward_softcap": dict(S=4, T=1024, D=2048, V=32000, bias=True, ref="shared", kl="forward",
                                      softcap=30.0, temperature=0.9),
    "packed_kl_reverse_separate_head": dict(layout="packed", lengths=(700, 1, 1500, 333, 1562), D=2048, D_ref=1024,
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
    case = cuda_case(torch.float32, seed=7, **REALISTIC[name])
    tri = run_core(fastpref.fused_logprobs, case, backend="triton")
    eager = run_core(eager_fused_logprobs, case)
    for key in eager:
        err = rel_err(tri[key], eager[key])
        assert err < FP32_RTOL, (key, err)


@pytest.mark.parametrize("name", list(REALISTIC))
def test_bf16_no_worse_than_eager_bf16(name):
    case = cuda_case(torch.bfloat16, seed=8, **REALISTIC[name])
    truth = run_core(eager_fused_logprobs, case.to(torch.float64))
    eager = run_core(eager_fused_logprobs, case)
    tri = run_core(fastpref.fused_logprobs, case, backend="triton")
    for key in truth:
        fused_err, eager_err = rel_err(tri[key], truth[key]), rel_err(eager[key], truth[key])
        assert fused_err <= eager_err + BF16_SLACK, (key, fused_err, eager_err)


def test_auto_backend_picks_triton_for_cuda_tensors():
    from fastpref._prepare import prepare

    case = cuda_case(torch.bfloat16, seed=9, S=2, T=64, D=256, V=1000)
    prep = prepare(*case.inputs, **case.kwargs)
    assert prep.backend == "triton"
    auto = fastpref.fused_logprobs(*case.inputs, **case.kwargs)
    torch_backend = fastpref.fused_logprobs(*case.inputs, backend="torch", **case.kwargs)
    assert rel_err(auto.logps, torch_backend.logps) < 1e-4


def test_no_grad_forward_never_allocates_logits():
    """N=8192 positions x V=128256 fp32 logits would be 4 GiB; the kernel needs only [N] vectors."""
    case = cuda_case(torch.bfloat16, seed=10, S=8, T=1024, D=1024, V=128256, ref="shared", kl="forward")
    with torch.no_grad():  # first call autotunes, and Triton's benchmark allocates an L2-flush buffer
        fastpref.fused_logprobs(*case.inputs, **case.kwargs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        stats = fastpref.fused_logprobs(*case.inputs, **case.kwargs)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(stats.kl).all() and (stats.kl > -1e-3).all()
    assert extra < 64 * 2**20, f"forward used {extra / 2**20:.0f} MiB beyond its inputs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_in_forward_on_the_gpu(dtype):
    """KernelOptions(grad_in_forward=True) on CUDA (row kernels, cuBLAS with fp32 output for bf16) against the fp64
    recompute path: fp32 within FP32_RTOL, bf16 no worse than the default Triton path plus BF16_SLACK."""
    from fastpref.modules import grad_in_forward as gif

    g = torch.Generator().manual_seed(3)
    hidden, ref_hidden = (torch.randn(8, 512, 1024, generator=g, dtype=torch.float64) for _ in range(2))
    weight = torch.randn(32000, 1024, generator=g, dtype=torch.float64) / 32
    targets = torch.randint(0, 32000, (8, 512), generator=g)
    targets[0, :100] = -100

    def step(backend, dt, options):
        leaves = [t.to("cuda", dt, copy=True).requires_grad_(True) for t in (hidden, weight)]
        loss = fastpref.FusedDPOLoss(beta=0.5, backend=backend, kernel_options=options)(
            leaves[1], leaves[0], targets.cuda(), ref_hidden=ref_hidden.to("cuda", dt)).loss
        loss.backward()
        return [loss.detach().double()] + [t.grad.double() for t in leaves]

    truth = step("torch", torch.float64, None)
    got = step("triton", dtype, fastpref.KernelOptions(grad_in_forward=True, workspace_bytes=2**30))
    assert gif.LAST_PATH["path"] == "in_forward", gif.LAST_PATH
    base = step("triton", dtype, None)
    for g_, b_, t_ in zip(got, base, truth):
        if dtype == torch.float32:
            assert rel_err(g_, t_) <= FP32_RTOL
        else:
            assert rel_err(g_, t_) <= rel_err(b_, t_) + BF16_SLACK
