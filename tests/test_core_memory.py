"""Measured (memray) workspace of forward+backward: independent of V and far below the eager path."""
import os
import tempfile

import pytest
import torch

import fastpref
import fastpref.reference as reference

memray = pytest.importorskip("memray")

N, D = 2048, 256


def _workspace_bytes(fn, vocab: int) -> int:
    """Peak heap during fwd+bwd of ``fn`` minus the gradient tensors it returns (inputs exist before)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g).requires_grad_()
    weight = (torch.randn(vocab, D, generator=g) * 0.05).requires_grad_()
    ref_hidden = torch.randn(N, D, generator=g)
    targets = torch.randint(0, vocab, (N,), generator=g)
    seq_ids = torch.arange(N) // 256

    def step():
        stats = fn(hidden, weight, targets, seq_ids=seq_ids, ref_hidden=ref_hidden, kl="forward")
        return torch.autograd.grad(stats.logps.sum() + stats.kl.sum(), [hidden, weight])

    step()  # warm-up: BLAS packing buffers and thread pools are allocated once per process
    path = os.path.join(tempfile.mkdtemp(), "trace.bin")
    try:
        with memray.Tracker(path):
            grads = step()
        peak = memray.FileReader(path).metadata.peak_memory
    finally:
        if os.path.exists(path):
            os.remove(path)
    return peak - sum(t.numel() * t.element_size() for t in grads)


@pytest.mark.slow
def test_workspace_independent_of_vocab_and_far_below_eager():
    fused_16k = _workspace_bytes(fastpref.fused_logprobs, 16384)
    fused_64k = _workspace_bytes(fastpref.fused_logprobs, 65536)
    eager_64k = _workspace_bytes(reference.fused_logprobs, 65536)
    logits_bytes = N * 65536 * 4
    assert fused_64k <= 1.25 * fused_16k and fused_16k <= 1.25 * fused_64k, (fused_16k, fused_64k)
    assert eager_64k >= logits_bytes  # the eager path really materializes the logits
    assert fused_64k * 20 <= eager_64k, (fused_64k, eager_64k)
    assert fused_64k < logits_bytes / 10
