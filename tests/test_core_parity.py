"""Torch backend of fused_logprobs vs the eager reference: outputs and dH, dW, db."""
import pytest
import torch

import fastpref
import fastpref.reference as reference
from fastpref.backends import torch_backend
from core_cases import CASES, make_case, max_rel_err, run_with_grads


SHIPPED_BLOCKS = (torch_backend.BLOCK_N, torch_backend.BLOCK_V)
SMALL_BLOCKS = (8, 128)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # Small tiles so every case spans several token and vocab blocks, with ragged last blocks.
    monkeypatch.setattr(torch_backend, "BLOCK_N", SMALL_BLOCKS[0])
    monkeypatch.setattr(torch_backend, "BLOCK_V", SMALL_BLOCKS[1])


@pytest.fixture(params=[SMALL_BLOCKS, SHIPPED_BLOCKS], ids=["small_blocks", "shipped_blocks"])
def blocks(request, monkeypatch):
    """The parity tests run twice: with small tiles (many ragged tiles) and with the shipped sizes
    (where these small cases fit one partial tile)."""
    monkeypatch.setattr(torch_backend, "BLOCK_N", request.param[0])
    monkeypatch.setattr(torch_backend, "BLOCK_V", request.param[1])
    return request.param


def _compare(name, dtype, tol):
    inputs, kwargs = make_case(name, dtype)
    fused_out, fused_grads = run_with_grads(fastpref.fused_logprobs, inputs, kwargs, backend="torch")
    ref_out, ref_grads = run_with_grads(reference.fused_logprobs, inputs, kwargs)
    assert len(fused_out) == len(ref_out)
    for i, (a, b) in enumerate(zip(fused_out + fused_grads, ref_out + ref_grads)):
        assert a.dtype == b.dtype
        assert torch.isfinite(a).all()
        assert max_rel_err(a, b) < tol, f"{name}: output/grad #{i} differs: {max_rel_err(a, b):.2e}"


@pytest.mark.parametrize("name", CASES)
def test_parity_float64(name, blocks):
    _compare(name, torch.float64, 1e-10)


@pytest.mark.parametrize("name", CASES)
def test_parity_float32(name, blocks):
    _compare(name, torch.float32, 1e-5)


# Relative error (to the largest |value|) of eager fp32 math on half-precision products is ~1e-4..1e-2;
# the fused op's fp32 blocks stay near fp32 round-off on the forward outputs.
FP32_BLOCKS_TOL = 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", CASES)
def test_parity_half_precision_rule(name, dtype, blocks):
    """bf16/fp16: fused error vs the fp64 truth is no worse than the eager error plus a small tolerance.

    The truth is fp64 math on exactly the rounded inputs. Gradients come back in the input dtype, so
    both implementations carry its rounding (<= eps/2 of the largest entry); the tolerance is eps/4.
    The forward outputs are float32 and must also be fp32-accurate: that is what checks that half
    inputs are computed in fp32 blocks (eager's half-precision projection is ~100x further off).
    """
    slack = torch.finfo(dtype).eps / 4
    inputs64, kwargs64 = make_case(name, torch.float64)
    to_half = lambda t: t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t  # noqa: E731
    inputs16 = tuple(to_half(t) for t in inputs64)
    kwargs16 = {k: to_half(v) for k, v in kwargs64.items()}
    to_64 = lambda t: t.double() if torch.is_tensor(t) and t.is_floating_point() else t  # noqa: E731
    truth_out, truth_grads = run_with_grads(
        reference.fused_logprobs, tuple(to_64(t) for t in inputs16), {k: to_64(v) for k, v in kwargs16.items()}
    )
    fused_out, fused_grads = run_with_grads(fastpref.fused_logprobs, inputs16, kwargs16, backend="torch")
    eager_out, eager_grads = run_with_grads(reference.fused_logprobs, inputs16, kwargs16)
    for i, (f, e, t) in enumerate(zip(fused_out + fused_grads, eager_out + eager_grads, truth_out + truth_grads)):
        fused_err, eager_err = max_rel_err(f, t), max_rel_err(e, t)
        assert torch.isfinite(f.float()).all()
        assert fused_err <= eager_err + slack, f"{name}: #{i} fused {fused_err:.2e} vs eager {eager_err:.2e}"
        if i < len(fused_out):
            assert f.dtype == torch.float32  # per-sequence stats are fp32 whatever the input dtype
            assert fused_err < FP32_BLOCKS_TOL, f"{name}: output #{i} {fused_err:.2e}: not fp32 blocks?"
        else:
            assert f.dtype == dtype  # gradients in the input dtype


def test_fully_ignored_sequence_is_zero_with_zero_grads():
    inputs, kwargs = make_case("fully_ignored", torch.float64)
    hidden, weight, targets = (t.clone() for t in inputs)
    hidden.requires_grad_()
    stats = fastpref.fused_logprobs(hidden, weight, targets, **kwargs)
    assert stats.logps[1].item() == 0 and stats.lengths[1].item() == 0 and stats.kl[1].item() == 0
    (stats.logps.sum() + stats.kl.sum()).backward()
    assert torch.count_nonzero(hidden.grad[1]) == 0
    assert torch.isfinite(hidden.grad).all()


def test_outputs_layout_and_lengths():
    inputs, kwargs = make_case("packed", torch.float32)
    stats = fastpref.fused_logprobs(*inputs, **kwargs)
    seq, targets = kwargs["seq_ids"], inputs[2]
    expected_lengths = torch.zeros(4).index_add_(0, seq, (targets != -100).float())
    assert torch.equal(stats.lengths, expected_lengths)
    assert stats.token_logps.shape == targets.shape and stats.token_kl.shape == targets.shape
    assert stats.logps.dtype == torch.float32 and stats.ref_logps.dtype == torch.float32
    assert stats.token_logps[3].item() == 0  # the ignored position
    assert (stats.token_logps <= 0).all() and (stats.token_kl >= -1e-6).all()
    assert stats.lengths.requires_grad is False and stats.ref_logps.requires_grad is False


def test_no_grad_call_saves_nothing():
    inputs, kwargs = make_case("kl_forward", torch.float32)
    hidden, weight, targets = inputs
    hidden.requires_grad_()
    with torch.no_grad():
        stats = fastpref.fused_logprobs(hidden, weight, targets, **kwargs)
    assert stats.logps.grad_fn is None and stats.kl.grad_fn is None and stats.token_logps.grad_fn is None
    plain = fastpref.fused_logprobs(hidden.detach(), weight, targets, **kwargs)
    assert plain.logps.grad_fn is None


def test_grad_only_through_requested_inputs():
    inputs, kwargs = make_case("bias", torch.float64)
    hidden, weight, targets = inputs
    weight = weight.clone().requires_grad_()
    stats = fastpref.fused_logprobs(hidden, weight, targets, **kwargs)  # hidden and bias need no grad
    (grad_w,) = torch.autograd.grad(stats.logps.sum(), [weight])
    ref = reference.fused_logprobs(hidden, weight, targets, **kwargs)
    (ref_w,) = torch.autograd.grad(ref.logps.sum(), [weight])
    assert max_rel_err(grad_w, ref_w) < 1e-10


def test_zero_upstream_rows_are_skipped(monkeypatch):
    """Positions whose upstream gradients are all zero cost no backward work."""
    seen = []
    real = torch_backend._logits_tile

    def spy(h, *args, **kwargs):
        seen.append(h.shape[0])
        return real(h, *args, **kwargs)

    inputs, kwargs = make_case("padded", torch.float64)
    hidden, weight, targets = inputs
    hidden = hidden.clone().requires_grad_()
    stats = fastpref.fused_logprobs(hidden, weight, targets, backend="torch")
    monkeypatch.setattr(torch_backend, "_logits_tile", spy)
    stats.logps[2].backward()  # only sequence 2 gets an upstream gradient
    assert sum(seen) == (targets[2] != -100).sum().item() * -(-weight.shape[0] // torch_backend.BLOCK_V)
    assert torch.count_nonzero(hidden.grad[:2]) == 0 and torch.count_nonzero(hidden.grad[2]) > 0


def test_half_precision_gradients_have_input_dtype():
    inputs, kwargs = make_case("bias", torch.bfloat16)
    hidden, weight, targets = (t.clone() for t in inputs)
    hidden.requires_grad_()
    weight.requires_grad_()
    stats = fastpref.fused_logprobs(hidden, weight, targets, **kwargs)
    stats.logps.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    assert torch.isfinite(hidden.grad.float()).all()


@pytest.mark.parametrize("variant", ["forward_kl_shared_head", "reverse_kl_bias_temp_softcap_ignored"])
def test_default_blocks_large_problem_matches_reference(monkeypatch, variant):
    """The shipped tile sizes (not the tiny test ones) on a problem spanning several tiles."""
    monkeypatch.setattr(torch_backend, "BLOCK_N", SHIPPED_BLOCKS[0])
    monkeypatch.setattr(torch_backend, "BLOCK_V", SHIPPED_BLOCKS[1])
    g = torch.Generator().manual_seed(3)
    n, d, v = 1100, 32, 9000
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) * 0.3
    targets = torch.randint(0, v, (n,), generator=g)
    seq = torch.arange(n) // 100
    kwargs = dict(seq_ids=seq, ref_hidden=hidden + 0.1, kl="forward")
    if variant != "forward_kl_shared_head":
        targets[torch.rand(n, generator=g) < 0.3] = -100
        kwargs.update(kl="reverse", bias=torch.randn(v, generator=g, dtype=torch.float64),
                      ref_weight=weight + 0.05 * torch.randn(v, d, generator=g, dtype=torch.float64),
                      ref_bias=torch.randn(v, generator=g, dtype=torch.float64), temperature=0.7, softcap=5.0)
    out, grads = run_with_grads(fastpref.fused_logprobs, (hidden, weight, targets), kwargs)
    ref_out, ref_grads = run_with_grads(reference.fused_logprobs, (hidden, weight, targets), kwargs)
    assert len(out + grads) == len(ref_out + ref_grads)
    for a, b in zip(out + grads, ref_out + ref_grads):
        assert max_rel_err(a, b) < 1e-10
