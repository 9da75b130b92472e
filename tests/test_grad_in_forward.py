"""KernelOptions(grad_in_forward=True): the modules' four-GEMM path (fastpref/modules/grad_in_forward.py) against
the recompute path: same loss and metrics, same gradients (fp64 tight, fp32, the bf16 rule), on awkward layouts,
with several pair groups; and every fallback taken where the loss or the call does not allow it."""
from __future__ import annotations

import pytest
import torch

import fastpref
import fastpref.reference
from fastpref import KernelOptions
from fastpref._types import EXTRA_OUTPUTS
from fastpref.losses.dpo_family import DPO_LOSS_TYPES, SORTING_LOSS_TYPES
from fastpref.modules import grad_in_forward as gif

D, V = 12, 37  # V not a multiple of anything the path blocks by
SEPARABLE = [
    ("FusedDPOLoss", {}), ("FusedDPOLoss", dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], ld_alpha=0.5)),
    ("FusedDPOLoss", dict(compute_nll_loss=True, use_weighting=False)), ("FusedIPOLoss", {}), ("FusedSimPOLoss", {}),
    ("FusedSLiCLoss", {}), ("FusedDPOPLoss", {}), ("FusedORPOLoss", {}), ("FusedCPOLoss", dict(average_log_prob=True)),
] + [("FusedDPOLoss", dict(loss_type=t, label_smoothing=0.1 if t in ("robust", "exo_pair") else 0.0))
     for t in DPO_LOSS_TYPES if t not in SORTING_LOSS_TYPES]


def _inputs(dtype=torch.float64, seed=0, packed=False, empty=True):
    """4 pairs, padded [S, T, D] with ignored positions, a one-token and (``empty``) a fully ignored sequence (or
    packed, unequal lengths)."""
    g = torch.Generator().manual_seed(seed)
    s, t = 8, 6
    hidden = torch.randn(s, t, D, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (s, t), generator=g)
    targets[0, :2] = -100
    targets[1, 1:] = -100  # one token
    if empty:  # a fully ignored rejected response (the length-normalized losses refuse one)
        targets[5, :] = -100
    inputs = dict(hidden=hidden, targets=targets, ref_hidden=torch.randn(s, t, D, generator=g, dtype=torch.float64),
                  weight=torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5,
                  bias=torch.randn(V, generator=g, dtype=torch.float64) * 0.1, seq_ids=None, num_seqs=None)
    if packed:  # unequal lengths, sequence ids not sorted by position
        lengths = [3, 5, 1, 6, 4, 2, 5, 3]
        order = torch.randperm(29, generator=g)
        inputs["seq_ids"] = torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)])[order]
        inputs["num_seqs"] = 8
        for k in ("hidden", "ref_hidden"):
            inputs[k] = torch.randn(29, D, generator=g, dtype=torch.float64)
        inputs["targets"] = torch.randint(0, V, (29,), generator=g)
    for k in ("hidden", "ref_hidden", "weight", "bias"):
        inputs[k] = inputs[k].to(dtype)
    return inputs


def _run(name, kwargs, inputs, options, *, temperature=1.0, ref="hidden", grads=("hidden", "weight", "bias"),
         call=None):
    module = getattr(fastpref, name)(kernel_options=options, **kwargs)
    leaves = {k: inputs[k].detach().clone().requires_grad_(k in grads) for k in ("hidden", "weight", "bias")}
    extra = {}
    if module.reference_mode != "none":
        if ref == "hidden":
            extra["ref_hidden"] = inputs["ref_hidden"]
        else:  # precomputed per-sequence reference log-probs
            extra["ref_logps"] = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) - 5
    out = module(leaves["weight"], leaves["hidden"], inputs["targets"], bias=leaves["bias"], temperature=temperature,
                 seq_ids=inputs["seq_ids"], num_seqs=inputs["num_seqs"], **extra, **(call or {}))
    out.loss.backward()
    return out, {k: v.grad for k, v in leaves.items()}


def _budget(rows: int) -> int:
    """A workspace that holds ``rows`` fp64 logit rows: forces several pair groups."""
    return rows * V * 8


@pytest.mark.parametrize("name,kwargs", SEPARABLE, ids=lambda x: x if isinstance(x, str) else str(x)[:40])
@pytest.mark.parametrize("packed", [False, True])
def test_fp64_equals_recompute(name, kwargs, packed):
    inputs = _inputs(packed=packed, empty=(name, kwargs) == ("FusedDPOLoss", {}))
    ref_out, ref_grads = _run(name, kwargs, inputs, None, temperature=1.3)
    out, grads = _run(name, kwargs, inputs, KernelOptions(grad_in_forward=True, workspace_bytes=_budget(12)),
                      temperature=1.3)
    assert gif.LAST_PATH["path"] == "in_forward" and gif.LAST_PATH["groups"] >= 2, gif.LAST_PATH
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-13, atol=1e-13)
    assert set(out.metrics) == set(ref_out.metrics)
    for k in ref_out.metrics:
        torch.testing.assert_close(out.metrics[k], ref_out.metrics[k], rtol=1e-12, atol=1e-12)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-11, atol=1e-12)


def test_non_contiguous_precomputed_reference_and_partial_grads():
    inputs = _inputs()
    inputs["hidden"] = inputs["hidden"].transpose(0, 1).contiguous().transpose(0, 1)  # same values, strided
    assert not inputs["hidden"].is_contiguous()
    for grads in (("hidden",), ("weight", "bias")):
        ref_out, ref_grads = _run("FusedDPOLoss", {}, inputs, None, ref="logps", grads=grads)
        out, got = _run("FusedDPOLoss", {}, inputs, KernelOptions(grad_in_forward=True), ref="logps", grads=grads)
        assert gif.LAST_PATH["path"] == "in_forward"
        torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-13, atol=0)
        for k in grads:
            assert got[k].shape == inputs[k].shape
            torch.testing.assert_close(got[k], ref_grads[k], rtol=1e-11, atol=1e-12)


def test_fp32_and_bf16_rule():
    truth, truth_grads = _run("FusedDPOLoss", {}, _inputs(), None)
    for dtype, tol in ((torch.float32, None), (torch.bfloat16, 0.02)):
        inputs = _inputs(dtype)
        base, base_grads = _run("FusedDPOLoss", {}, inputs, None)
        out, grads = _run("FusedDPOLoss", {}, inputs, KernelOptions(grad_in_forward=True, workspace_bytes=_budget(12)))
        assert gif.LAST_PATH["path"] == "in_forward"
        for k in truth_grads:
            assert grads[k].dtype == dtype
            if tol is None:
                torch.testing.assert_close(grads[k], base_grads[k], rtol=1e-4, atol=1e-5)
            else:  # no worse against the fp64 truth than the recompute path, plus a small tolerance
                err = (grads[k].double() - truth_grads[k]).abs().max()
                base_err = (base_grads[k].double() - truth_grads[k]).abs().max()
                assert err <= base_err + tol * truth_grads[k].abs().max(), (k, err, base_err)
        torch.testing.assert_close(out.loss.double(), truth.loss, rtol=1e-3 if tol else 1e-5, atol=1e-5)


def test_upstream_gradient_scales_and_second_backward_is_refused():
    inputs = _inputs()
    module = fastpref.FusedDPOLoss(kernel_options=KernelOptions(grad_in_forward=True))
    w = inputs["weight"].clone().requires_grad_(True)
    out = module(w, inputs["hidden"], inputs["targets"], bias=inputs["bias"], ref_hidden=inputs["ref_hidden"])
    (3.0 * out.loss).backward(retain_graph=True)
    _, plain = _run("FusedDPOLoss", {}, inputs, None, grads=("weight",))
    torch.testing.assert_close(w.grad, 3.0 * plain["weight"], rtol=1e-12, atol=1e-13)
    with pytest.raises(RuntimeError, match="retain_graph"):
        out.loss.backward()


@pytest.mark.parametrize("case", ["aot", "alpha_dpo", "softcap", "no_grad", "budget", "eager", "orpo_nll"])
def test_fallbacks_are_exact(case):
    inputs = _inputs(empty=False)
    name, kwargs, call = "FusedDPOLoss", {}, {}
    if case == "aot":
        kwargs = dict(loss_type="aot")
    elif case == "alpha_dpo":
        name = "FusedAlphaDPOLoss"
    elif case == "softcap":
        call = dict(softcap=3.0)
    elif case == "orpo_nll":
        name, call = "FusedORPOLoss", dict(nll_targets=inputs["targets"].flip(1))
    cls = getattr(fastpref.reference if case == "eager" else fastpref, name)
    options = KernelOptions(grad_in_forward=True, workspace_bytes=_budget(3) if case == "budget" else 2**28)
    module, plain = cls(kernel_options=options, **kwargs), cls(**kwargs)
    ref = {} if name == "FusedORPOLoss" else dict(ref_hidden=inputs["ref_hidden"])
    w = inputs["weight"].clone().requires_grad_(case != "no_grad")
    gif.LAST_PATH.update(path=None, reason="")
    out = module(w, inputs["hidden"], inputs["targets"], **ref, **call)
    expected = plain(w, inputs["hidden"], inputs["targets"], **ref, **call)
    if case == "eager":  # the eager twin never enters the path
        assert gif.LAST_PATH["path"] == "recompute" and "eager" in gif.LAST_PATH["reason"]
    else:
        assert gif.LAST_PATH["path"] == "recompute" and gif.LAST_PATH["reason"], gif.LAST_PATH
    assert torch.equal(out.loss.detach(), expected.loss.detach())


def test_option_is_validated():
    with pytest.raises(TypeError, match="grad_in_forward"):
        KernelOptions(grad_in_forward=1)
    with pytest.raises(TypeError, match="kernel_options"):
        fastpref.FusedDPOLoss(kernel_options={"grad_in_forward": True})


@pytest.mark.parametrize("packed", [False, True])
def test_extra_outputs_equal_the_ops(packed):
    """The extras (metrics only: no loss reads them) come from the group's buffer, equal to the op's."""
    kwargs = dict(extra_outputs=EXTRA_OUTPUTS)
    inputs = _inputs(packed=packed)
    ref_out, ref_grads = _run("FusedDPOLoss", kwargs, inputs, None)
    out, grads = _run("FusedDPOLoss", kwargs, inputs, KernelOptions(grad_in_forward=True, workspace_bytes=_budget(12)))
    assert gif.LAST_PATH["path"] == "in_forward"
    for name in EXTRA_OUTPUTS:
        torch.testing.assert_close(out.metrics[name], ref_out.metrics[name], rtol=1e-12, atol=1e-12)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("loss", ["dpo", "mcpo"])
def test_trainer_takes_the_path(tmp_path, loss):
    """FastPrefDPOTrainer (which asks for TRL's vocabulary metrics; for MC-PO it samples the negatives in a no-grad
    pass and passes them) with the option: same loss, gradients, metrics."""
    import copy

    from _trl_fixtures import dpo_config, one_batch, preference_rows, tiny_llama

    from fastpref.integrations.toy import toy_tokenizer
    from fastpref.integrations.trl import FastPrefDPOTrainer

    policy, ref = tiny_llama(0), tiny_llama(1)
    results = []
    base = dict(beta=0.5, num_negatives=2) if loss == "mcpo" else {}
    for i, kwargs in enumerate(({}, {"kernel_options": KernelOptions(grad_in_forward=True)})):
        trainer = FastPrefDPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref),
                                     args=dpo_config(tmp_path / str(i), beta=0.5),
                                     train_dataset=preference_rows(8, candidates=3 if loss == "mcpo" else 0),
                                     processing_class=toy_tokenizer(), fastpref_loss=loss,
                                     fastpref_loss_kwargs={**base, **kwargs})
        gif.LAST_PATH.update(path=None)
        results.append(one_batch(trainer, seed=0))
    assert gif.LAST_PATH["path"] == "in_forward", gif.LAST_PATH
    (loss0, grads0, metrics0), (loss1, grads1, metrics1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-7)
    assert grads0.keys() == grads1.keys() and metrics0.keys() == metrics1.keys()
    scale = max(g.abs().max() for g in grads0.values())
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], rtol=1e-5, atol=1e-6 * scale)
    for k in metrics0:
        assert metrics1[k] == pytest.approx(metrics0[k], rel=1e-5, abs=1e-6), k


def test_keyword_tensor_with_gradient_falls_back():
    """SLiC's ``sft_logps`` is differentiable: a call keyword that needs a gradient takes the recompute path."""
    inputs = _inputs(empty=False)
    grads = []
    for options in (None, KernelOptions(grad_in_forward=True)):
        sft = torch.linspace(-3.0, -1.0, 4, dtype=torch.float64).requires_grad_(True)
        w = inputs["weight"].clone().requires_grad_(True)
        fastpref.FusedSLiCLoss(kernel_options=options)(w, inputs["hidden"], inputs["targets"], sft_logps=sft).loss.backward()
        grads.append((sft.grad, w.grad))
    assert gif.LAST_PATH["path"] == "recompute" and "keyword" in gif.LAST_PATH["reason"]
    assert grads[1][0] is not None and torch.equal(grads[1][0], grads[0][0]) and torch.equal(grads[1][1], grads[0][1])


def test_autocast_is_ignored_as_by_the_op():
    """Under CPU autocast the op computes in its inputs' dtype; so does the path (fp32 inputs, bf16 autocast)."""
    inputs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in _inputs().items()}
    base, base_grads = _run("FusedDPOLoss", {}, inputs, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _run("FusedDPOLoss", {}, inputs, KernelOptions(grad_in_forward=True))
    assert gif.LAST_PATH["path"] == "in_forward"
    torch.testing.assert_close(out.loss, base.loss, rtol=1e-5, atol=1e-6)
    for k in base_grads:
        torch.testing.assert_close(grads[k], base_grads[k], rtol=1e-4, atol=1e-5)


def test_create_graph_raises_instead_of_a_silent_zero():
    inputs = _inputs()
    w = inputs["weight"].clone().requires_grad_(True)
    out = fastpref.FusedDPOLoss(kernel_options=KernelOptions(grad_in_forward=True))(
        w, inputs["hidden"], inputs["targets"], ref_hidden=inputs["ref_hidden"])
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(out.loss, w, create_graph=True)


def test_non_finite_loss_gives_non_finite_gradients_as_the_recompute_path():
    """The chosen-token NLL over chosen responses that are all ignored is 0/0: NaN loss, NaN gradients, both paths."""
    inputs = _inputs(empty=False)
    inputs["targets"][:4] = -100
    for options in (None, KernelOptions(grad_in_forward=True)):
        out, grads = _run("FusedDPOLoss", dict(compute_nll_loss=True), inputs, options)
        assert out.loss.isnan() and grads["weight"].isnan().any(), options


def test_mcpo_with_given_negatives():
    """MC-PO is a sum of per-prompt terms once the negatives are given (what FastPrefDPOTrainer passes); sampling
    inside the call takes the recompute path."""
    inputs = _inputs(empty=False)  # 8 sequences: 2 prompts x (1 preferred + 3 candidates)
    negatives = torch.tensor([[2], [1]])
    results = []
    for options in (None, KernelOptions(grad_in_forward=True, workspace_bytes=_budget(24))):
        out, grads = _run("FusedMCPOLoss", dict(beta=0.5, group_size=4), inputs, options, call=dict(negatives=negatives))
        results.append((out, grads))
    assert gif.LAST_PATH["path"] == "in_forward" and gif.LAST_PATH["groups"] == 2, gif.LAST_PATH
    (base, base_grads), (out, grads) = results
    torch.testing.assert_close(out.loss, base.loss, rtol=1e-13, atol=1e-13)
    for k in base_grads:
        torch.testing.assert_close(grads[k], base_grads[k], rtol=1e-11, atol=1e-12)
    _run("FusedMCPOLoss", dict(beta=0.5, group_size=4), inputs, KernelOptions(grad_in_forward=True))
    assert gif.LAST_PATH["path"] == "recompute"
