"""MC-PO options (issue 14): include_positive's gradient scale, Max/Min sampling, sampling-weight metrics,
ranked-data helper."""
from __future__ import annotations

import math

import pytest
import torch

import fastpref
from fastpref import losses
from fastpref.integrations.ranked import ranked_to_mcpo
from fastpref.losses.mcpo import mcpo_sampling_weights
from fastpref.testing import make_case


def _grouped(b=5, g=4, seed=0, scale=40.0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(b, g, generator=gen, dtype=torch.float64) * scale
    r = torch.randn(b, g, generator=gen, dtype=torch.float64) * scale
    return s, r


def _grad_with(s, r, beta, column):
    s = s.clone().requires_grad_(True)
    negatives = torch.full((s.shape[0], 1), column, dtype=torch.int64)
    loss, _ = losses.mcpo(s, r, beta=beta, negatives=negatives)
    loss.backward()
    return s.grad


def test_include_positive_false_scales_each_prompts_expected_gradient_by_one_over_one_minus_w0():
    beta = 0.05
    s, r = _grouped()
    g = s.shape[1]
    grads = torch.stack([_grad_with(s, r, beta, j) for j in range(g)], dim=1)  # [B, draw j, G]; rows independent
    w_all = mcpo_sampling_weights(s, r, beta=beta, include_positive=True)
    w_cand = mcpo_sampling_weights(s, r, beta=beta, include_positive=False)
    assert torch.all(w_cand[:, 0] == 0)
    torch.testing.assert_close(w_cand[:, 1:], w_all[:, 1:] / (1 - w_all[:, :1]), rtol=1e-12, atol=0)
    assert grads[:, 0].abs().max() < 1e-15  # drawing y0 (M = 1): zero gradient (up to rounding)
    literal = (w_all[:, :, None] * grads).sum(1)  # include_positive=True
    default = (w_cand[:, :, None] * grads).sum(1)
    ratio = 1 / (1 - w_all[:, 0])
    torch.testing.assert_close(default, literal * ratio[:, None], rtol=1e-10, atol=1e-15)
    assert bool((ratio > 1.2).any()) and bool((ratio > 1).all())
    # the documented example: K = 3, beta r = (1, 0, 0, 0) -> factor (e + 3) / 3 = 1.906
    w0 = mcpo_sampling_weights(torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64),
                               torch.zeros(1, 4, dtype=torch.float64), beta=1.0, include_positive=True)[0, 0]
    assert abs(1 / (1 - w0.item()) - (math.e + 3) / 3) < 1e-12 and abs((math.e + 3) / 3 - 1.906) < 1e-3


def test_include_positive_gradient_ratio_with_the_sampler():
    """The sampler's draws (Monte Carlo over many copies of one prompt) give the same 1 / (1 - w0) ratio."""
    beta, n = 1.0, 40000
    s = torch.tensor([[1.0, 0.3, -0.2, 0.0]], dtype=torch.float64).expand(n, 4)
    r = torch.zeros(n, 4, dtype=torch.float64)
    grads = {}
    for include in (True, False):
        z = losses.mcpo_sample_negatives(s, r, beta=beta, include_positive=include,
                                         generator=torch.Generator().manual_seed(1))
        x = s.clone().requires_grad_(True)
        losses.mcpo(x, r, beta=beta, negatives=z)[0].backward()
        grads[include] = x.grad.sum(0)  # n * mean gradient of the prompt
    w0 = mcpo_sampling_weights(s[:1], r[:1], beta=beta, include_positive=True)[0, 0].item()
    ratio = grads[False][0] / grads[True][0]
    assert abs(ratio.item() - 1 / (1 - w0)) < 0.03 * (1 / (1 - w0))


@pytest.mark.parametrize("include_positive", [False, True])
@pytest.mark.parametrize("m", [1, 2])
def test_max_min_sampling_picks_the_extreme_weights(include_positive, m):
    s, r = _grouped(b=6, g=5, seed=3)
    w = mcpo_sampling_weights(s, r, beta=0.05, include_positive=include_positive)
    first = 0 if include_positive else 1
    for sampling, largest in (("max", True), ("min", False)):
        z = losses.mcpo_sample_negatives(s, r, beta=0.05, num_negatives=m, include_positive=include_positive,
                                         sampling=sampling, generator=torch.Generator().manual_seed(0))
        again = losses.mcpo_sample_negatives(s, r, beta=0.05, num_negatives=m, include_positive=include_positive,
                                             sampling=sampling, generator=torch.Generator().manual_seed(9))
        assert torch.equal(z, again)  # deterministic
        expected = torch.topk(w[:, first:], m, dim=1, largest=largest).indices + first
        assert torch.equal(z, expected)
        if m == 1:
            pick = w[:, first:].argmax(1) if largest else w[:, first:].argmin(1)
            assert torch.equal(z[:, 0], pick + first)
    with pytest.raises(ValueError, match="sampling must be one of"):
        losses.mcpo_sample_negatives(s, r, sampling="argmax")


@pytest.mark.parametrize("sampling", ["max", "min", "mc"])
def test_module_sampling_option_and_weight_metrics(sampling):
    case = make_case("FusedMCPOLoss", torch.float64, seed=5)  # B = 2 groups of 4
    ctor = dict(case.ctor, beta=0.5, sampling=sampling, generator=torch.Generator().manual_seed(0))
    module = fastpref.FusedMCPOLoss(**ctor)
    g = ctor["group_size"]
    ref_logps = torch.randn(case.main.hidden.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = module(case.weight, case.main.hidden, case.main.targets, bias=case.call["bias"], ref_logps=ref_logps)
    logps = out.metrics["logps"]
    ref = ref_logps.view(-1, g)
    weights = out.metrics["sampling_weights"]
    assert weights.shape == (logps.shape[0], g) and not weights.requires_grad
    expected_w = torch.softmax(torch.cat([torch.full_like(logps[:, :1], -math.inf),
                                          0.5 * (logps - ref)[:, 1:]], dim=1), dim=1)
    torch.testing.assert_close(weights, expected_w, rtol=1e-12, atol=1e-15)
    negatives = out.metrics["negatives"]
    if sampling != "mc":
        pick = weights[:, 1:].argmax(1) if sampling == "max" else weights[:, 1:].argmin(1)
        assert torch.equal(negatives[:, 0], pick + 1)
    head, _ = losses.mcpo(logps, ref, beta=0.5, negatives=negatives)
    torch.testing.assert_close(out.loss.detach(), head, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="sampling must be one of"):
        fastpref.FusedMCPOLoss(group_size=4, sampling="best")


def test_max_and_min_differ_when_weights_do():
    case = make_case("FusedMCPOLoss", torch.float64, seed=5)
    outs = {s: fastpref.FusedMCPOLoss(**dict(case.ctor, beta=0.5, sampling=s))(
        case.weight, case.main.hidden, case.main.targets, **case.kwargs()) for s in ("max", "min")}
    assert not torch.equal(outs["max"].metrics["negatives"], outs["min"].metrics["negatives"])
    # the hardest negative gives the larger loss (LSE grows with the negative's reward)
    assert outs["max"].loss.item() > outs["min"].loss.item()


RANKED = [
    {"prompt": "p1", "completions": [{"text": "b", "rank": 2}, {"text": "a", "rank": 1}, {"text": "d", "rank": 4},
                                     {"text": "c", "rank": 3}], "id": 1},
    {"prompt": "p2", "completions": [{"text": "z", "rank": 3.0}, {"text": "y", "rank": 2.0},
                                     {"text": "w", "rank": 4.0}, {"text": "x", "rank": 1.0}], "id": 2},
]


def test_ranked_to_mcpo_list_and_dataset():
    rows = ranked_to_mcpo(RANKED)
    assert rows[0] == {"prompt": "p1", "id": 1, "chosen": "a", "rejected": "b", "candidates": ["b", "c", "d"]}
    assert rows[1]["chosen"] == "x" and rows[1]["candidates"] == ["y", "z", "w"]
    assert "completions" in RANKED[0]  # input untouched
    from datasets import Dataset

    ds = ranked_to_mcpo(Dataset.from_list(RANKED))
    assert set(ds.column_names) == {"prompt", "id", "chosen", "rejected", "candidates"}
    assert ds.to_list() == rows
    dropped = ranked_to_mcpo(RANKED, drop_best=1)  # Fig. 2: remove rank 2
    assert dropped[0]["candidates"] == ["c", "d"] and dropped[0]["rejected"] == "c"
    assert ranked_to_mcpo(RANKED, num_candidates=1)[1]["candidates"] == ["y"]


def test_ranked_to_mcpo_scores_and_errors():
    scored = [{"prompt": "p", "answers": [{"answer": "lo", "score": 0.1}, {"answer": "hi", "score": 0.9},
                                          {"answer": "mid", "score": 0.5}]}]
    row = ranked_to_mcpo(scored, completions_column="answers", text_key="answer", order_key="score",
                         higher_is_better=True)[0]
    assert (row["chosen"], row["candidates"]) == ("hi", ["mid", "lo"])
    with pytest.raises(ValueError, match="completions_column"):
        ranked_to_mcpo(scored)
    with pytest.raises(ValueError, match="order_key"):
        ranked_to_mcpo(scored, completions_column="answers", text_key="answer")
    with pytest.raises(ValueError, match="drop_best"):
        ranked_to_mcpo(RANKED, drop_best=-1)
    with pytest.raises(ValueError, match="candidates remain"):
        ranked_to_mcpo(RANKED, drop_best=3)
    uneven = [RANKED[0], {**RANKED[1], "completions": RANKED[1]["completions"][:3]}]
    with pytest.raises(ValueError, match="num_candidates"):
        ranked_to_mcpo(uneven)
    assert [len(r["candidates"]) for r in ranked_to_mcpo(uneven, num_candidates=2)] == [2, 2]
    with pytest.raises(TypeError, match="data must be"):
        ranked_to_mcpo("not data")
