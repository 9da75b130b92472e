"""Metrics that show each seed paper's own quantities: alpha-DPO's sequential KL (Sec. 5.3) and VAR's weight
entropy / effective sample size. Checked against independent computations in fp64."""
import math

import pytest
import torch

import fastpref
import fastpref.losses as L
from fastpref.reference import fused_logprobs as eager_fused_logprobs
from fastpref.testing import make_case


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_alpha_dpo_reports_the_sequential_kl(packed):
    case = make_case("FusedAlphaDPOLoss", torch.float64, packed=packed, seed=5)
    out = fastpref.FusedAlphaDPOLoss(**case.ctor)(case.weight, case.main.hidden, case.main.targets, **case.kwargs())
    call = case.kwargs()
    truth = eager_fused_logprobs(case.main.hidden.detach(), case.weight.detach(), case.main.targets,
                                 bias=call["bias"].detach(), seq_ids=call.get("seq_ids"), num_seqs=call.get("num_seqs"),
                                 ref_hidden=call["ref_hidden"], ref_weight=call["ref_weight"], kl="reverse")
    chosen, rejected = truth.kl.chunk(2)
    torch.testing.assert_close(out.metrics["chosen_kl"], chosen, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.metrics["rejected_kl"], rejected, rtol=1e-10, atol=1e-12)
    assert (chosen > 0).all()  # the reference head differs: a real KL
    # a metric only: loss and gradients equal a pass without the KL
    plain = fastpref.FusedAlphaDPOLoss(**case.ctor)
    plain.sequence_kl = None
    out_plain = plain(case.weight, case.main.hidden, case.main.targets, **case.kwargs())
    assert "chosen_kl" not in out_plain.metrics
    torch.testing.assert_close(out.loss, out_plain.loss, rtol=1e-12, atol=0)
    grads = torch.autograd.grad(out.loss, case.grad_inputs)
    grads_plain = torch.autograd.grad(out_plain.loss, case.grad_inputs)
    for g, g_plain in zip(grads, grads_plain):
        torch.testing.assert_close(g, g_plain, rtol=1e-12, atol=1e-15)


def test_alpha_dpo_without_reference_pass_reports_no_kl():
    case = make_case("FusedAlphaDPOLoss", torch.float64, seed=6, ref="logps")
    out = fastpref.FusedAlphaDPOLoss(**case.ctor)(case.weight, case.main.hidden, case.main.targets, **case.kwargs())
    assert "chosen_kl" not in out.metrics and "rejected_kl" not in out.metrics


@pytest.mark.parametrize("normalize", ["self", "none"])
def test_var_weight_entropy_and_effective_sample_size(normalize):
    gen = torch.Generator().manual_seed(0)
    logps = -5 - 10 * torch.rand(6, generator=gen, dtype=torch.float64)
    rewards = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    ref = -5 - 10 * torch.rand(6, 6, generator=gen, dtype=torch.float64)
    _, m = L.var(logps, rewards, ref_logps=ref, beta=0.7, normalize=normalize)
    w = m["weights"]
    p = w / w.sum()
    assert m["weight_entropy"].item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-12)
    assert m["effective_sample_size"].item() == pytest.approx((w.sum() ** 2 / (w * w).sum()).item(), rel=1e-12)
    assert 1.0 <= m["effective_sample_size"].item() < 6.0
    # equal rewards and reference: uniform weights, entropy log B and an effective size of B
    _, flat = L.var(logps, torch.zeros(6, 6, dtype=torch.float64), ref_logps=torch.zeros(6, 6, dtype=torch.float64),
                    beta=0.7,
                    normalize=normalize)
    assert flat["weight_entropy"].item() == pytest.approx(math.log(6), rel=1e-12)
    assert flat["effective_sample_size"].item() == pytest.approx(6.0, rel=1e-12)
