"""Property-based parity: random small shapes and options, torch backend vs eager reference (fp64)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastpref
import fastpref.reference as reference
from fastpref.backends import torch_backend
from core_cases import max_rel_err, run_with_grads


@st.composite
def problems(draw):
    packed = draw(st.booleans())
    dim = draw(st.integers(1, 12))
    vocab = draw(st.integers(2, 300))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    kwargs = {}
    if packed:
        lengths = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
        n = sum(lengths)
        seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        kwargs["seq_ids"] = seq[torch.randperm(n, generator=g)]
        shape = (n,)
    else:
        shape = (draw(st.integers(1, 4)), draw(st.integers(1, 6)))
    hidden = torch.randn(*shape, dim, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 1.0, 3.0]))
    targets = torch.randint(0, vocab, shape, generator=g)
    ignore = torch.rand(shape, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    targets[ignore] = -100
    if draw(st.booleans()):
        kwargs["bias"] = torch.randn(vocab, generator=g, dtype=torch.float64)
    if draw(st.booleans()):
        kwargs["temperature"] = draw(st.sampled_from([0.5, 1.0, 2.0]))
    if draw(st.booleans()):
        kwargs["softcap"] = draw(st.sampled_from([1.0, 5.0, 30.0]))
    kl = draw(st.sampled_from([None, None, "forward", "reverse"]))
    if kl or draw(st.booleans()):
        kwargs["ref_hidden"] = hidden + torch.randn(hidden.shape, generator=g, dtype=torch.float64)
        if draw(st.booleans()):
            kwargs["ref_weight"] = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
        kwargs["kl"] = kl
    blocks = (draw(st.integers(1, 9)), draw(st.integers(1, 64)))
    return (hidden, weight, targets), kwargs, blocks


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_random_problems_match_reference(problem):
    inputs, kwargs, (block_n, block_v) = problem
    old = torch_backend.BLOCK_N, torch_backend.BLOCK_V
    torch_backend.BLOCK_N, torch_backend.BLOCK_V = block_n, block_v
    try:
        out, grads = run_with_grads(fastpref.fused_logprobs, inputs, kwargs, backend="torch")
    finally:
        torch_backend.BLOCK_N, torch_backend.BLOCK_V = old
    ref_out, ref_grads = run_with_grads(reference.fused_logprobs, inputs, kwargs)
    for a, b in zip(out + grads, ref_out + ref_grads):
        assert torch.isfinite(a).all()
        assert max_rel_err(a, b) < 1e-9
