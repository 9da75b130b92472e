"""Liger-Kernel as an external oracle: our fused modules equal its chunked losses where the loss is the same.

Both sides get the same fp32 inputs (padded [2B, T, D], first half chosen) and are configured to the
same semantics; loss, dH, dW and db must agree to 1e-4 (relative to the largest entry). Deliberate
default differences (documented in the module docstrings):
- SimPO: Liger adds the chosen token-mean NLL by default (compute_nll_loss=True) and its beta default
  is 0.1; we compare with compute_nll_loss=False and equal beta/gamma, and ``from_liger()`` with Liger's
  defaults (tests/test_liger_cases.py runs Liger's own test parameters).
- ORPO: Liger's ``beta`` is our ``orpo_lambda``; both include the NLL and length-average.
- KTO: Liger takes the reference point as ``kl`` (not clamped); we pass our z0 directly.
- DPO / CPO: Liger's defaults (summed log-probs, CPO with NLL weight alpha=1) equal ours.
"""
from __future__ import annotations

import pytest
import torch

import fastpref
from fastpref.testing import make_sequences, rel_err

chunked = pytest.importorskip("liger_kernel.chunked_loss")

VOCAB, DIM, PAIRS = 300, 32, 3


def _inputs(seed: int, num: int = 2 * PAIRS):
    gen = torch.Generator().manual_seed(seed)
    weight = (0.3 * torch.randn(VOCAB, DIM, generator=gen)).requires_grad_()
    bias = (0.1 * torch.randn(VOCAB, generator=gen)).requires_grad_()
    ref_weight = weight.detach() + 0.05 * torch.randn(VOCAB, DIM, generator=gen)
    ref_bias = 0.1 * torch.randn(VOCAB, generator=gen)
    seq = make_sequences(gen, num, dtype=torch.float32, packed=False, vocab=VOCAB, dim=DIM)
    return weight, bias, ref_weight, ref_bias, seq


def _loss_and_grads(loss, leaves):
    grads = torch.autograd.grad(loss, leaves)
    return [loss.detach()] + [g.detach() for g in grads]


def _assert_same(ours, theirs, tol=1e-4):
    errs = [rel_err(a, b) for a, b in zip(ours, theirs)]
    assert max(errs) <= tol, f"relative errors (loss, dH, dW, db): {errs}"
    assert all(t.abs().max() > 0 for t in theirs[1:])  # non-trivial gradients


def _liger_loss(out):
    return out[0] if isinstance(out, tuple) else out


def test_dpo_equals_liger():
    weight, bias, ref_weight, ref_bias, seq = _inputs(1)
    leaves = [seq.hidden, weight, bias]
    ours = fastpref.FusedDPOLoss(beta=0.5)(weight, seq.hidden, seq.targets, bias=bias, ref_hidden=seq.ref_hidden,
                                           ref_weight=ref_weight, ref_bias=ref_bias)
    liger = chunked.LigerFusedLinearDPOLoss(beta=0.5, compiled=False)
    theirs = liger(weight, seq.hidden, seq.targets, bias, ref_input=seq.ref_hidden, ref_weight=ref_weight,
                   ref_bias=ref_bias)
    _assert_same(_loss_and_grads(ours.loss, leaves), _loss_and_grads(_liger_loss(theirs), leaves))


def test_simpo_equals_liger_without_its_nll():
    weight, bias, _, _, seq = _inputs(2)
    leaves = [seq.hidden, weight, bias]
    ours = fastpref.FusedSimPOLoss(beta=2.0, gamma=0.5)(weight, seq.hidden, seq.targets, bias=bias)
    liger = chunked.LigerFusedLinearSimPOLoss(beta=2.0, gamma=0.5, compute_nll_loss=False, compiled=False)
    theirs = liger(weight, seq.hidden, seq.targets, bias)
    _assert_same(_loss_and_grads(ours.loss, leaves), _loss_and_grads(_liger_loss(theirs), leaves))


def test_cpo_equals_liger_defaults():
    weight, bias, _, _, seq = _inputs(3)
    leaves = [seq.hidden, weight, bias]
    ours = fastpref.FusedCPOLoss()(weight, seq.hidden, seq.targets, bias=bias)
    theirs = chunked.LigerFusedLinearCPOLoss(compiled=False)(weight, seq.hidden, seq.targets, bias)
    _assert_same(_loss_and_grads(ours.loss, leaves), _loss_and_grads(_liger_loss(theirs), leaves))


def test_orpo_equals_liger():
    weight, bias, _, _, seq = _inputs(4)
    leaves = [seq.hidden, weight, bias]
    ours = fastpref.FusedORPOLoss(orpo_lambda=0.5)(weight, seq.hidden, seq.targets, bias=bias)
    theirs = chunked.LigerFusedLinearORPOLoss(beta=0.5, compiled=False)(weight, seq.hidden, seq.targets, bias)
    _assert_same(_loss_and_grads(ours.loss, leaves), _loss_and_grads(_liger_loss(theirs), leaves))


def test_kto_equals_liger_with_the_same_reference_point():
    weight, bias, ref_weight, ref_bias, seq = _inputs(5, num=5)
    labels = torch.tensor([True, False, True, True, False])
    leaves = [seq.hidden, weight, bias]
    z0 = 0.7
    ours = fastpref.FusedKTOLoss(beta=0.5)(weight, seq.hidden, seq.targets, bias=bias, ref_hidden=seq.ref_hidden,
                                           ref_weight=ref_weight, ref_bias=ref_bias, labels=labels, z0=z0)
    liger = chunked.LigerFusedLinearKTOLoss(beta=0.5, use_ref_model=True, compiled=False)
    # Liger's KTO takes (_input, lin_weight) in that order.
    theirs = liger(seq.hidden, weight, seq.targets, bias, preference_labels=labels, ref_input=seq.ref_hidden,
                   ref_weight=ref_weight, ref_bias=ref_bias, kl=torch.tensor(z0))
    _assert_same(_loss_and_grads(ours.loss, leaves), _loss_and_grads(_liger_loss(theirs), leaves))


@pytest.mark.parametrize("name", ["SimPO", "ORPO", "CPO"])
def test_from_liger_defaults_equal_liger_defaults(name):
    """``FusedXLoss.from_liger()`` is Liger's module at Liger's defaults (SimPO: beta 0.1 and the NLL on)."""
    weight, bias, _, _, seq = _inputs(6)
    leaves = [seq.hidden, weight, bias]
    ours = getattr(fastpref, f"Fused{name}Loss").from_liger()(weight, seq.hidden, seq.targets, bias=bias)
    theirs = getattr(chunked, f"LigerFusedLinear{name}Loss")(compiled=False)(weight, seq.hidden, seq.targets, bias)
    _assert_same(_loss_and_grads(ours.loss, leaves), _loss_and_grads(_liger_loss(theirs), leaves))
