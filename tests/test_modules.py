"""Fused loss modules vs their eager twins (fastpref.reference), plus each module's own contract."""
from __future__ import annotations

import math

import pytest
import torch

import fastpref
import fastpref.reference as reference
from fastpref import losses
from fastpref.backends import torch_backend
from fastpref.testing import MODULE_NAMES, REFERENCE_FREE, make_case, make_sequences, rel_err, run_case

REF_USING = [n for n in MODULE_NAMES if n not in REFERENCE_FREE]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # V = 300 is not a multiple of 128, and 8-row blocks split every batch: the tiling edges get exercised.
    monkeypatch.setattr(torch_backend, "BLOCK_V", 128)
    monkeypatch.setattr(torch_backend, "BLOCK_N", 8)


def _compare(name, dtype, *, packed, seed=0, **case_options):
    case = make_case(name, dtype, packed=packed, seed=seed, **case_options)
    fused = run_case(getattr(fastpref, name)(**case.ctor), case)
    eager = run_case(getattr(reference, name)(**case.ctor), case)
    return case, fused, eager


def _errors(a, b):
    """Relative errors of (loss, grad_1, ..., grad_k) of two run_case results."""
    return [rel_err(a[0], b[0])] + [rel_err(x, y) for x, y in zip(a[1], b[1])]


# ------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", MODULE_NAMES)
def test_module_matches_eager_reference(name, dtype, tol, packed):
    case, fused, eager = _compare(name, dtype, packed=packed, seed=3)
    errs = _errors(fused, eager)
    assert max(errs) <= tol, f"{name}: relative errors (loss, dH, dW, db[, dH_kl]) {errs}"
    # The gradient is not trivially zero (the comparison would then prove nothing).
    for g in fused[1][:3]:
        assert g.abs().max() > 0
    assert torch.isfinite(fused[0])


@pytest.mark.parametrize("name", ["FusedDPOLoss", "FusedKTOLoss", "FusedMCPOLoss", "FusedSPOLoss"])
def test_without_bias(name):
    case = make_case(name, torch.float64, packed=True, seed=9)
    case.call.pop("bias")
    case.grad_inputs = [t for t in case.grad_inputs if t is not case.bias]
    fused = run_case(getattr(fastpref, name)(**case.ctor), case)
    eager = run_case(getattr(reference, name)(**case.ctor), case)
    assert max(_errors(fused, eager)) < 1e-10


@pytest.mark.parametrize("name", [n for n in REF_USING if n != "FusedSPOLoss"])
def test_precomputed_ref_logps_equal_ref_hidden(name):
    """ref_logps from the same reference give the same loss/grads as ref_hidden in the fused pass."""
    case = make_case(name, torch.float64, packed=False, seed=47)
    module = getattr(fastpref, name)
    with_hidden = run_case(module(**case.ctor), case)
    if name == "FusedKTOLoss":
        assert float(with_hidden[2]["z0"]) > 0  # the mismatched pairs' reference head matters
    ref_stats = fastpref.fused_logprobs(case.main.ref_hidden, case.call["ref_weight"], case.main.targets)
    # KTO keeps ref_weight: its mismatched pairs' kl_ref_hidden still read the reference head.
    dropped = ("ref_hidden",) if name == "FusedKTOLoss" else ("ref_hidden", "ref_weight")
    call = {k: v for k, v in case.call.items() if k not in dropped}
    case.call = dict(call, ref_logps=ref_stats.logps.float())  # any float dtype is accepted
    with_logps = run_case(module(**case.ctor), case)
    # The fp32-rounded ref log-probs move the loss by ~1e-7 relative at most.
    assert max(_errors(with_logps, with_hidden)) < 1e-5


@pytest.mark.parametrize("name", ["FusedDPOLoss", "FusedKTOLoss", "FusedVARLoss", "FusedMCPOLoss"])
def test_precomputed_ref_logps_parity(name):
    """The ref_logps path (VAR: cross pairs [B, B]) against the eager twin."""
    _, fused, eager = _compare(name, torch.float64, packed=True, seed=7, ref="logps")
    assert max(_errors(fused, eager)) < 1e-10


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", MODULE_NAMES)
def test_bf16_no_worse_than_eager(name, packed):
    """bf16 rule: fused error vs the fp64 truth <= eager bf16 error + small tolerance."""
    # MC-PO: the Gumbel noise stream depends on the dtype of the statistics (fp32 here, fp64 for the
    # truth), so use K = 1, where the one candidate is the negative whatever the noise.
    ctor = dict(make_case(name).ctor, **({"group_size": 2} if name == "FusedMCPOLoss" else {}))
    case = make_case(name, torch.bfloat16, packed=packed, seed=11)
    fused = run_case(getattr(fastpref, name)(**ctor), case)
    eager = run_case(getattr(reference, name)(**ctor), case)
    # The truth: the eager module in fp64 on exactly the same (bf16-rounded) inputs.
    truth_case = make_case(name, torch.bfloat16, packed=packed, seed=11)
    _to_fp64(truth_case)
    truth = run_case(getattr(reference, name)(**ctor), truth_case)
    fused_err, eager_err = _errors(fused, truth), _errors(eager, truth)
    for f, e in zip(fused_err, eager_err):
        assert f <= e + 1e-3, f"{name}: fused {fused_err} vs eager {eager_err}"
    # bf16 gradients carry bf16 rounding (~4e-3 relative), not more.
    assert max(fused_err) < 1e-2


def _to_fp64(case):
    """Upcast every float tensor of a case in place of its bf16 values (leaves stay leaves)."""
    def up(t):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            return t
        return t.detach().double().requires_grad_(t.requires_grad)

    mapping = {id(t): up(t) for t in [case.weight, case.bias, case.main.hidden, *case.grad_inputs]}
    case.weight, case.bias = mapping[id(case.weight)], mapping[id(case.bias)]
    case.main.hidden = mapping[id(case.main.hidden)]
    case.call = {k: mapping.get(id(v), up(v)) for k, v in case.call.items()}
    case.grad_inputs = [mapping[id(t)] for t in case.grad_inputs]


# ------------------------------------------------------------------------------------------- contract


def test_output_and_metrics():
    case = make_case("FusedDPOLoss", torch.float32, seed=1)
    out = fastpref.FusedDPOLoss(**case.ctor)(case.weight, case.main.hidden, case.main.targets, **case.kwargs())
    loss, metrics = out
    assert loss is out.loss and loss.dim() == 0 and loss.requires_grad
    assert metrics["logps"].shape == (6,)
    for key in ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "reward_accuracy"):
        assert key in metrics
    assert all(not v.requires_grad for v in metrics.values())
    # Layout: the first half of the sequences is chosen.
    torch.testing.assert_close(metrics["chosen_logps"], metrics["logps"][:3])
    torch.testing.assert_close(metrics["rejected_logps"], metrics["logps"][3:])


def test_shared_reference_head_by_default():
    """Without ref_weight the reference reads the policy head (detached), as fused_logprobs does."""
    case = make_case("FusedDPOLoss", torch.float64, seed=2)
    case.call.pop("ref_weight")
    out = fastpref.FusedDPOLoss(**case.ctor)(case.weight, case.main.hidden, case.main.targets, **case.kwargs())
    ref = reference.fused_logprobs(case.main.ref_hidden, case.weight.detach(), case.main.targets,
                                   bias=case.bias.detach())
    pol = reference.fused_logprobs(case.main.hidden, case.weight, case.main.targets, bias=case.bias)
    expected, _ = losses.dpo(pol.logps[:3], pol.logps[3:], ref.logps[:3], ref.logps[3:], **case.ctor)
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0)


def test_temperature_and_softcap_are_passed_to_the_fused_op():
    case = make_case("FusedSimPOLoss", torch.float64, seed=4)
    plain = run_case(fastpref.FusedSimPOLoss(**case.ctor), case)
    case.call.update(temperature=0.7, softcap=3.0)  # the head's options travel with the call
    fused = run_case(fastpref.FusedSimPOLoss(**case.ctor), case)
    eager = run_case(reference.FusedSimPOLoss(**case.ctor), case)
    assert max(_errors(fused, eager)) < 1e-10
    assert rel_err(fused[0], plain[0]) > 1e-3


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_head_options_per_call_match_the_eager_twin(name):
    """Every module and its eager twin take temperature/softcap per call, and they change the loss."""
    case = make_case(name, torch.float64, packed=True, seed=5)
    plain = run_case(getattr(fastpref, name)(**case.ctor), case)
    case.call.update(temperature=0.8, softcap=4.0)
    fused = run_case(getattr(fastpref, name)(**case.ctor), case)
    eager = run_case(getattr(reference, name)(**case.ctor), case)
    assert max(_errors(fused, eager)) < 1e-10
    assert rel_err(fused[0], plain[0]) > 1e-6


def test_extra_passes_use_the_call_head():
    """KTO's mismatched pairs and SPO's online samples go through the call's temperature and softcap."""
    head = dict(temperature=0.6, softcap=5.0)
    case = make_case("FusedKTOLoss", torch.float64, seed=47)
    out = fastpref.FusedKTOLoss(**case.ctor)(case.weight, case.main.hidden, case.main.targets, **case.kwargs(),
                                             **head)
    mism = reference.fused_logprobs(case.call["kl_hidden"], case.weight, case.call["kl_targets"], bias=case.bias,
                                    ref_hidden=case.call["kl_ref_hidden"], ref_weight=case.call["ref_weight"],
                                    **head)
    z0 = max(0.0, float((mism.logps - mism.ref_logps).detach().mean()))
    assert z0 > 0 and float(out.metrics["z0"]) == pytest.approx(z0, rel=1e-12)
    plain = fastpref.FusedKTOLoss(**case.ctor)(case.weight, case.main.hidden, case.main.targets, **case.kwargs())
    assert abs(float(plain.metrics["z0"]) - z0) > 0.1  # the head's options matter to z0
    case = make_case("FusedSPOLoss", torch.float64, seed=23)
    out = fastpref.FusedSPOLoss(**case.ctor)(case.weight, case.main.hidden, case.main.targets, **case.kwargs(),
                                             **head)
    expected = reference.fused_logprobs(case.call["kl_hidden"], case.weight, case.call["kl_targets"], bias=case.bias,
                                        ref_hidden=case.call["kl_ref_hidden"], ref_weight=case.call["ref_weight"],
                                        kl="forward", **head).kl
    torch.testing.assert_close(out.metrics["kl"], expected.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", [dict(temperature=0.7), dict(softcap=3.0), dict(temperature=0.7, softcap=3.0)])
@pytest.mark.parametrize("namespace", [fastpref, reference], ids=["fused", "eager"])
def test_constructor_refuses_head_options(namespace, options):
    for name in MODULE_NAMES:
        ctor = dict(make_case(name).ctor, **options)
        with pytest.raises(TypeError, match="LM head.*per call.*loss_fn\\(weight, hidden, targets, temperature=|"
                                            "LM head.*per call.*loss_fn\\(weight, hidden, targets, softcap="):
            getattr(namespace, name)(**ctor)
    module = fastpref.FusedDPOLoss()
    assert "temperature" not in module.hyperparameters() and "softcap" not in module.hyperparameters()
    assert "temperature" not in repr(module) and "softcap" not in repr(module)
    assert "temperature" not in module.logprob_options() and "softcap" not in module.logprob_options()
    with pytest.raises(TypeError, match="unexpected keyword argument 'tempreature'"):
        fastpref.FusedDPOLoss(tempreature=0.7)


def test_ignore_index_default_is_the_package_default():
    from fastpref._types import IGNORE_INDEX

    for name in MODULE_NAMES:
        assert getattr(fastpref, name)(**make_case(name).ctor).ignore_index == IGNORE_INDEX


# ------------------------------------------------------------------------------------------- registry


def test_one_registry_of_loss_modules():
    from fastpref.modules import LOSS_MODULES, FusedLossBase

    expected = ["FusedDPOLoss", "FusedIPOLoss", "FusedSimPOLoss", "FusedSLiCLoss", "FusedDPOPLoss", "FusedKTOLoss",
                "FusedORPOLoss", "FusedCPOLoss", "FusedVARLoss", "FusedAlphaDPOLoss", "FusedMCPOLoss", "FusedSPOLoss"]
    assert list(LOSS_MODULES) == expected
    assert all(cls.__name__ == name and issubclass(cls, FusedLossBase) for name, cls in LOSS_MODULES.items())
    assert MODULE_NAMES == expected
    # fastpref, fastpref.reference and the registry agree, in the registry's order.
    assert [n for n in fastpref.__all__ if n.startswith("Fused")] == expected
    assert [n for n in reference.__all__ if n.startswith("Fused")] == expected
    assert {"LossOutput", "var_cross_pair_ref_logps"} <= set(fastpref.__all__)
    assert {"fused_logprobs", "var_cross_pair_ref_logps"} <= set(reference.__all__)
    for name, cls in LOSS_MODULES.items():
        assert getattr(fastpref, name) is cls
        twin = getattr(reference, name)
        assert twin is not cls and issubclass(twin, cls) and twin.__name__ == name
        assert twin.fused_logprobs is reference.fused_logprobs


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_every_module_has_the_shared_call_shape(name):
    import inspect

    for cls in (getattr(fastpref, name), getattr(reference, name)):
        params = inspect.signature(cls.forward).parameters
        positional = [p for p, v in params.items() if v.kind == v.POSITIONAL_OR_KEYWORD]
        assert positional == ["self", "weight", "hidden", "targets"]
        keyword = {p for p, v in params.items() if v.kind == v.KEYWORD_ONLY}
        assert {"bias", "temperature", "softcap", "ref_hidden", "ref_weight", "ref_bias", "ref_logps", "seq_ids",
                "num_seqs"} <= keyword
        assert params["temperature"].default == 1.0 and params["softcap"].default is None
        assert any(v.kind == v.VAR_KEYWORD for v in params.values())


def test_errors_name_the_argument():
    case = make_case("FusedDPOLoss", torch.float32, seed=0)
    w, h, t = case.weight, case.main.hidden, case.main.targets
    dpo = fastpref.FusedDPOLoss()
    with pytest.raises(ValueError, match="ref_hidden"):
        dpo(w, h, t)
    with pytest.raises(ValueError, match="not both"):
        dpo(w, h, t, ref_hidden=case.main.ref_hidden, ref_logps=torch.zeros(6))
    with pytest.raises(ValueError, match="ref_logps must have shape"):
        dpo(w, h, t, ref_logps=torch.zeros(5))
    with pytest.raises(ValueError, match="even"):
        dpo(w, h[:5], t[:5], ref_logps=torch.zeros(5))
    with pytest.raises(ValueError, match="no reference"):
        fastpref.FusedSimPOLoss()(w, h, t, ref_hidden=case.main.ref_hidden)
    with pytest.raises(TypeError):
        dpo(w, h, t, ref_logps=torch.zeros(6), not_an_option=1)
    kto = fastpref.FusedKTOLoss()
    with pytest.raises(ValueError, match="labels"):
        kto(w, h, t, ref_logps=torch.zeros(6), z0=0.0)
    with pytest.raises(TypeError, match="labels"):
        kto(w, h, t, ref_logps=torch.zeros(6), z0=0.0, labels=torch.ones(6))
    with pytest.raises(ValueError, match="z0"):
        kto(w, h, t, ref_logps=torch.zeros(6), labels=torch.ones(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="group_size"):
        fastpref.FusedMCPOLoss()(w, h, t, ref_logps=torch.zeros(6))
    with pytest.raises(ValueError, match="grouped"):
        fastpref.FusedMCPOLoss(group_size=4)(w, h, t, ref_logps=torch.zeros(6))  # 6 = B * 4 has no B
    with pytest.raises(ValueError, match="rewards"):
        fastpref.FusedVARLoss(beta=1.0)(w, h, t)
    with pytest.raises(ValueError, match="beta"):
        fastpref.FusedVARLoss(beta=0.0)
    with pytest.raises(ValueError, match="mode"):
        fastpref.FusedSPOLoss(mode="listwise")
    with pytest.raises(ValueError, match="kl_ref_hidden"):
        fastpref.FusedSPOLoss()(w, h, t, kl_hidden=h)


def test_call_keywords_are_checked_by_the_heads():
    """The modules pass labels / negatives / best to the heads, which own their checks."""
    case = make_case("FusedKTOLoss", torch.float64, seed=0)
    kto = fastpref.FusedKTOLoss()
    call = dict(case.call, labels=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels must have the shape of logps"):
        kto(case.weight, case.main.hidden, case.main.targets, **call)
    case = make_case("FusedMCPOLoss", torch.float64, seed=0)  # B = 2 groups of 4
    mcpo = fastpref.FusedMCPOLoss(**case.ctor)
    for bad, error, message in ((torch.full((2, 1), 4), ValueError, "column indices in 0..3"),
                                (torch.ones(3, 1, dtype=torch.int64), ValueError, "negatives must have shape"),
                                (torch.ones(2, 1, dtype=torch.int32), TypeError, "int64"),
                                ([[1], [2]], TypeError, "int64")):
        with pytest.raises(error, match=message):
            mcpo(case.weight, case.main.hidden, case.main.targets, **case.call, negatives=bad)
    case = make_case("FusedSPOLoss", torch.float64, seed=0)  # 6 sequences: B = 2 groups of 3
    spo = fastpref.FusedSPOLoss(**dict(case.ctor, mode="best_of_n", group_size=3))
    for bad in (torch.tensor([0, 3]), torch.tensor([0]), torch.tensor([0.0, 1.0]), torch.tensor([0, 1]).int()):
        with pytest.raises(ValueError, match="best"):
            spo(case.weight, case.main.hidden, case.main.targets, **case.call, best=bad)
    with pytest.raises(ValueError, match="best is for mode='best_of_n'"):
        fastpref.FusedSPOLoss(**case.ctor)(case.weight, case.main.hidden, case.main.targets, **case.call,
                                           best=torch.tensor([0, 1, 2]))


# ------------------------------------------------------------------------------------------- MC-PO


def _count_backward_positions(monkeypatch):
    seen = []
    original = torch_backend.backward

    def counting(prep, lse, ref_lse, token_kl, grad_logps, grad_kl, need, **extras):
        a = grad_logps * prep.valid
        seen.append({"positions": prep.num_positions, "active": int((a != 0).sum())})
        return original(prep, lse, ref_lse, token_kl, grad_logps, grad_kl, need, **extras)

    monkeypatch.setattr(torch_backend, "backward", counting)
    return seen


def _count_tile_rows(monkeypatch):
    """Rows of every logits tile the torch backend forms (forward and backward)."""
    rows = []
    original = torch_backend._logits_tile

    def counting(h, *args, **kwargs):
        rows.append(h.shape[0])
        return original(h, *args, **kwargs)

    monkeypatch.setattr(torch_backend, "_logits_tile", counting)
    return rows


@pytest.mark.parametrize("num_negatives,include_positive", [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_mcpo_backward_touches_only_selected_sequences(monkeypatch, packed, num_negatives, include_positive):
    seen = _count_backward_positions(monkeypatch)
    case = make_case("FusedMCPOLoss", torch.float64, packed=packed, seed=13)
    ctor = dict(case.ctor, num_negatives=num_negatives, include_positive=include_positive)
    out = fastpref.FusedMCPOLoss(**ctor)(case.weight, case.main.hidden, case.main.targets, **case.kwargs())
    tile_rows = _count_tile_rows(monkeypatch)
    out.loss.backward()
    b, g = 2, ctor["group_size"]
    negatives = out.metrics["negatives"]
    selected = torch.zeros(b, g, dtype=torch.bool)
    selected[:, 0] = True
    selected.scatter_(1, negatives, True)
    selected = selected.reshape(-1)
    assert int(selected.sum()) < b * g
    if not include_positive:
        assert int(selected.sum()) == (1 + num_negatives) * b
    targets, hidden = case.main.targets, case.main.hidden
    if packed:
        seq_of_position = case.main.seq_ids
    else:
        seq_of_position = torch.arange(b * g)[:, None].expand_as(targets)
    selected_positions = selected[seq_of_position]
    valid = targets != -100
    n_selected = int((selected_positions & valid).sum())
    # One backward call; only the selected sequences' valid positions carry a gradient ...
    assert len(seen) == 1
    assert seen[0]["active"] == n_selected < int(valid.sum())
    # ... and only their policy logits tiles are recomputed, over every vocabulary block, nothing else.
    vocab_blocks = math.ceil(case.weight.shape[0] / torch_backend.BLOCK_V)
    assert sum(tile_rows) == n_selected * vocab_blocks
    # Unselected hidden rows get exactly zero gradient; selected valid ones do not.
    grad_rows = hidden.grad.abs().sum(-1)
    assert bool((grad_rows[~selected_positions] == 0).all())
    assert bool((grad_rows[selected_positions & valid] > 0).all())
    # And the gradients equal the eager twin's (full logits, plain autograd).
    fused = run_case(fastpref.FusedMCPOLoss(**ctor), case)
    eager = run_case(reference.FusedMCPOLoss(**ctor), case)
    assert max(_errors(fused, eager)) < 1e-10


def test_mcpo_is_one_fused_pass(monkeypatch):
    calls = []
    original = fastpref.FusedMCPOLoss.fused_logprobs

    def counting(*args, **kwargs):
        calls.append(kwargs.get("ref_hidden") is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(fastpref.FusedMCPOLoss, "fused_logprobs", staticmethod(counting))
    case = make_case("FusedMCPOLoss", torch.float64, seed=13)
    module = fastpref.FusedMCPOLoss(**case.ctor)
    trained = module(case.weight, case.main.hidden, case.main.targets, **case.kwargs())
    assert calls == [True]  # policy and reference of all K + 1 sequences, once
    with torch.no_grad():
        evaluated = module(case.weight, case.main.hidden, case.main.targets, **case.kwargs())
    torch.testing.assert_close(evaluated.loss, trained.loss.detach(), rtol=1e-12, atol=0)
    assert torch.equal(evaluated.metrics["negatives"], trained.metrics["negatives"])


def test_mcpo_sampling_is_seeded_and_uses_the_generator():
    case = make_case("FusedMCPOLoss", torch.float64, seed=17)
    ctor = dict(case.ctor, beta=0.01)
    call = {k: v for k, v in case.call.items()}
    draws = []
    for seed in (0, 0, 1, 2, 3, 4, 5):
        module = fastpref.FusedMCPOLoss(**ctor, generator=torch.Generator().manual_seed(seed))
        out = module(case.weight, case.main.hidden, case.main.targets, **call)
        draws.append(out.metrics["negatives"])
        assert bool(((out.metrics["negatives"] >= 1) & (out.metrics["negatives"] <= 3)).all())
    assert torch.equal(draws[0], draws[1])
    assert any(not torch.equal(draws[0], d) for d in draws[2:])  # beta small: weights near uniform


def test_mcpo_loss_equals_head_on_full_statistics():
    case = make_case("FusedMCPOLoss", torch.float64, seed=19)
    out = fastpref.FusedMCPOLoss(**case.ctor)(case.weight, case.main.hidden, case.main.targets, **case.kwargs())
    pol = reference.fused_logprobs(case.main.hidden, case.weight, case.main.targets, bias=case.bias)
    ref = reference.fused_logprobs(case.main.ref_hidden, case.call["ref_weight"], case.main.targets)
    expected, _ = losses.mcpo(pol.logps.view(2, 4), ref.logps.view(2, 4), beta=case.ctor["beta"],
                              negatives=out.metrics["negatives"])
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------- SPO


def test_spo_kl_gradient_reaches_online_samples():
    case = make_case("FusedSPOLoss", torch.float64, packed=False, seed=23)
    kl_hidden = case.call["kl_hidden"]
    out = fastpref.FusedSPOLoss(**case.ctor)(case.weight, case.main.hidden, case.main.targets, **case.kwargs())
    (g,) = torch.autograd.grad(out.loss, [kl_hidden])
    valid = case.call["kl_targets"] != -100
    assert bool((g.abs().sum(-1)[valid] > 0).all())
    assert bool((g.abs().sum(-1)[~valid] == 0).all())
    # The KL is the full-vocabulary KL(pi_theta || pi_ref) of the eager op, summed per sample.
    expected = reference.fused_logprobs(kl_hidden, case.weight, case.call["kl_targets"], bias=case.bias,
                                        ref_hidden=case.call["kl_ref_hidden"], ref_weight=case.call["ref_weight"],
                                        kl="forward").kl
    torch.testing.assert_close(out.metrics["kl"], expected.detach(), rtol=1e-10, atol=1e-12)
    # kl_coef = 0 removes it: no gradient to the online samples.
    out0 = fastpref.FusedSPOLoss(**dict(case.ctor, kl_coef=0.0))(case.weight, case.main.hidden, case.main.targets,
                                                                   **case.kwargs())
    (g0,) = torch.autograd.grad(out0.loss, [kl_hidden], allow_unused=True)
    assert g0 is None or bool((g0 == 0).all())


def test_spo_gamma_zero_gives_uniform_weights():
    case = make_case("FusedSPOLoss", torch.float64, seed=29)
    out = fastpref.FusedSPOLoss(**dict(case.ctor, gamma=0.0))(case.weight, case.main.hidden, case.main.targets,
                                                               **case.kwargs())
    assert torch.equal(out.metrics["weights"], torch.ones(3, dtype=torch.float64))
    weighted = fastpref.FusedSPOLoss(**dict(case.ctor, gamma=0.5))(case.weight, case.main.hidden,
                                                                    case.main.targets, **case.kwargs())
    assert not torch.allclose(weighted.metrics["weights"], torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["best_of_n", "ranked"])
def test_spo_grouped_modes(mode):
    case = make_case("FusedSPOLoss", torch.float64, packed=True, seed=31)
    ctor = dict(case.ctor, mode=mode, group_size=3)
    if mode == "best_of_n":
        case.call["best"] = torch.tensor([2, 0])
    fused = run_case(fastpref.FusedSPOLoss(**ctor), case)
    eager = run_case(reference.FusedSPOLoss(**ctor), case)
    assert max(_errors(fused, eager)) < 1e-10
    # Equal to the head on the eager statistics (group-major layout b * G + g).
    pol = reference.fused_logprobs(case.main.hidden, case.weight, case.main.targets, bias=case.bias,
                                   **case.main.layout())
    kl = fused[2]["kl"]
    common = dict(alpha=ctor["alpha"], gamma=ctor["gamma"], kl=kl, kl_coef=ctor["kl_coef"])
    if mode == "best_of_n":
        expected, _ = losses.spo_best_of_n(pol.logps.view(2, 3), case.call["best"], **common)
    else:
        expected, _ = losses.spo_ranked(pol.logps.view(2, 3), **common)
    torch.testing.assert_close(fused[0], expected.detach(), rtol=1e-10, atol=0)


# ------------------------------------------------------------------------------------------- alpha-DPO


def _alpha_batches(steps, seed=37):
    gen = torch.Generator().manual_seed(seed)
    weight = (0.3 * torch.randn(300, 32, generator=gen, dtype=torch.float64)).requires_grad_()
    batches = []
    for _ in range(steps):
        seq = make_sequences(gen, 6, dtype=torch.float64, packed=False, vocab=300, dim=32)
        batches.append((seq, -5.0 - 20.0 * torch.rand(6, generator=gen, dtype=torch.float64)))
    return weight, batches


def _hand_margins(weight, seq, ref_logps):
    s = reference.fused_logprobs(seq.hidden, weight, seq.targets)
    n = s.lengths
    avg, ref_avg = s.logps.detach() / n, ref_logps / n
    return [float((avg[i] - avg[i + 3]) - (ref_avg[i] - ref_avg[i + 3])) for i in range(3)]


@pytest.mark.parametrize("bias_correction", [True, False])
def test_alpha_dpo_ema_matches_hand_computed_sequence(bias_correction):
    weight, batches = _alpha_batches(3)
    module = fastpref.FusedAlphaDPOLoss(beta=2.5, gamma_beta_ratio=0.4, alpha=0.2, bias_correction=bias_correction)
    raw_mean = raw_std = 0.0
    for k, (seq, ref) in enumerate(batches, start=1):
        out = module(weight, seq.hidden, seq.targets, ref_logps=ref)
        m = _hand_margins(weight, seq, ref)
        mean = sum(m) / len(m)
        std = math.sqrt(sum((x - mean) ** 2 for x in m) / (len(m) - 1))
        raw_mean, raw_std = 0.9 * raw_mean + 0.1 * mean, 0.9 * raw_std + 0.1 * std
        used = (raw_mean / (1 - 0.9 ** k), raw_std / (1 - 0.9 ** k)) if bias_correction else (raw_mean, raw_std)
        assert int(module.num_updates) == k
        assert float(module.margin_mean) == pytest.approx(raw_mean, rel=1e-12, abs=1e-14)
        assert float(module.margin_std) == pytest.approx(raw_std, rel=1e-12)
        assert float(out.metrics["margin_mean"]) == pytest.approx(used[0], rel=1e-12, abs=1e-14)
        assert float(out.metrics["margin_std"]) == pytest.approx(used[1], rel=1e-12)
        # The loss is the head with exactly these statistics.
        s = reference.fused_logprobs(seq.hidden, weight, seq.targets)
        expected, _ = losses.alpha_dpo(s.logps[:3], s.logps[3:], ref[:3], ref[3:], s.lengths[:3], s.lengths[3:],
                                       beta=2.5, gamma_beta_ratio=0.4, alpha=0.2, margin_mean=used[0],
                                       margin_std=used[1])
        torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0)
    if bias_correction:
        # At step 1 the corrected statistics are the batch's own (the public code's are 10x smaller).
        fresh = fastpref.FusedAlphaDPOLoss()
        seq, ref = batches[0]
        out = fresh(weight, seq.hidden, seq.targets, ref_logps=ref)
        m = _hand_margins(weight, seq, ref)
        assert float(out.metrics["margin_mean"]) == pytest.approx(sum(m) / 3, rel=1e-12)


def test_alpha_dpo_eval_freezes_statistics():
    weight, batches = _alpha_batches(3, seed=41)
    module = fastpref.FusedAlphaDPOLoss()
    for seq, ref in batches[:2]:
        module(weight, seq.hidden, seq.targets, ref_logps=ref)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    assert set(state) == {"margin_mean", "margin_std", "num_updates"}
    module.eval()
    seq, ref = batches[2]
    out1 = module(weight, seq.hidden, seq.targets, ref_logps=ref)
    out2 = module(weight, seq.hidden, seq.targets, ref_logps=ref)
    for k, v in module.state_dict().items():
        assert torch.equal(v, state[k]), k
    torch.testing.assert_close(out1.loss, out2.loss, rtol=0, atol=0)
    module.train()
    module(weight, seq.hidden, seq.targets, ref_logps=ref)
    assert int(module.num_updates) == 3
    # Before any update, eval z-scores with the batch's own statistics and stores nothing.
    fresh = fastpref.FusedAlphaDPOLoss().eval()
    out = fresh(weight, seq.hidden, seq.targets, ref_logps=ref)
    m = torch.tensor(_hand_margins(weight, seq, ref), dtype=torch.float64)
    assert float(out.metrics["margin_mean"]) == pytest.approx(float(m.mean()), rel=1e-12)
    assert float(out.metrics["margin_std"]) == pytest.approx(float(m.std()), rel=1e-12)
    assert int(fresh.num_updates) == 0 and float(fresh.margin_mean) == 0.0


def test_alpha_dpo_needs_two_pairs():
    weight, batches = _alpha_batches(1, seed=43)
    seq, ref = batches[0]
    two = [0, 3]  # one pair: chosen 0, rejected 3
    with pytest.raises(ValueError, match="at least 2"):
        fastpref.FusedAlphaDPOLoss()(weight, seq.hidden[two], seq.targets[two], ref_logps=ref[two])


# ------------------------------------------------------------------------------------------- KTO


def test_kto_reference_point_from_mismatched_pairs():
    case = make_case("FusedKTOLoss", torch.float64, seed=47)
    out = fastpref.FusedKTOLoss(**case.ctor)(case.weight, case.main.hidden, case.main.targets, **case.kwargs())
    mism = reference.fused_logprobs(case.call["kl_hidden"], case.weight, case.call["kl_targets"], bias=case.bias,
                                    ref_hidden=case.call["kl_ref_hidden"], ref_weight=case.call["ref_weight"])
    z0 = max(0.0, float((mism.logps - mism.ref_logps).detach().mean()))
    assert float(out.metrics["z0"]) == pytest.approx(z0, rel=1e-12, abs=1e-14)
    # Passing z0 directly gives the same loss, and the mismatched pairs get no gradient.
    call = {k: v for k, v in case.call.items() if not k.startswith("kl_")}
    direct = fastpref.FusedKTOLoss(**case.ctor)(case.weight, case.main.hidden, case.main.targets, z0=z0, **call)
    torch.testing.assert_close(direct.loss, out.loss, rtol=1e-12, atol=0)
    # Precomputed reference log-probs of the mismatched pairs give the same z0.
    with_logps = dict(case.call, kl_ref_logps=mism.ref_logps)
    with_logps.pop("kl_ref_hidden")
    precomputed = fastpref.FusedKTOLoss(**case.ctor)(case.weight, case.main.hidden, case.main.targets, **with_logps)
    assert float(precomputed.metrics["z0"]) == pytest.approx(z0, rel=1e-12, abs=1e-14)
    # A positive z0 changes the loss (the test above is not vacuous).
    shifted = fastpref.FusedKTOLoss(**case.ctor)(case.weight, case.main.hidden, case.main.targets, z0=z0 + 3.0,
                                                 **call)
    assert abs(float((shifted.loss - out.loss).detach())) > 1e-4


# ------------------------------------------------------------------------------------------- VAR


def test_var_ref_hidden_gives_the_diagonal():
    case = make_case("FusedVARLoss", torch.float64, seed=53)
    out = fastpref.FusedVARLoss(**case.ctor)(case.weight, case.main.hidden, case.main.targets, **case.kwargs())
    ref = reference.fused_logprobs(case.main.ref_hidden, case.call["ref_weight"], case.main.targets)
    pol = reference.fused_logprobs(case.main.hidden, case.weight, case.main.targets, bias=case.bias)
    for normalize in ("self", "none"):
        module = fastpref.FusedVARLoss(beta=1.0, normalize=normalize)
        got = module(case.weight, case.main.hidden, case.main.targets, **case.kwargs())
        expected, metrics = losses.var(pol.logps, case.call["rewards"], beta=1.0, ref_logps=ref.logps,
                                       normalize=normalize)
        torch.testing.assert_close(got.loss, expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(got.metrics["weights"], metrics["weights"], rtol=1e-12, atol=0)
    assert out.metrics["weights"].sum().item() == pytest.approx(4.0)


class _ToyBackbone(torch.nn.Module):
    """Embedding + a causal running mean + tanh: hidden states that depend on the whole prefix."""

    def __init__(self, vocab, dim, gen):
        super().__init__()
        self.embed = torch.nn.Parameter(torch.randn(vocab, dim, generator=gen, dtype=torch.float64))
        self.calls = 0

    def forward(self, input_ids, attention_mask):
        self.calls += 1
        x = self.embed[input_ids] * attention_mask[..., None]
        steps = torch.arange(1, input_ids.shape[1] + 1, dtype=x.dtype)[None, :, None]
        return (torch.tanh(x.cumsum(1) / steps),)  # a tuple, like a transformers model with return_dict=False


@pytest.mark.parametrize("prompts_per_chunk", [1, 3])
def test_var_cross_pair_ref_logps_against_a_loop(prompts_per_chunk):
    gen = torch.Generator().manual_seed(59)
    vocab, dim, b = 50, 16, 3
    backbone = _ToyBackbone(vocab, dim, gen)
    head = 0.3 * torch.randn(vocab, dim, generator=gen, dtype=torch.float64)
    prompts = [torch.randint(0, vocab, (n,), generator=gen) for n in (2, 4, 3)]
    responses = [torch.randint(0, vocab, (n,), generator=gen) for n in (3, 1, 5)]
    got = fastpref.var_cross_pair_ref_logps(prompts, responses, backbone, head, prompts_per_chunk=prompts_per_chunk)
    eager = reference.var_cross_pair_ref_logps(prompts, responses, backbone, head, prompts_per_chunk=prompts_per_chunk)
    assert backbone.calls == 2 * math.ceil(b / prompts_per_chunk)
    assert got.shape == (b, b) and not got.requires_grad
    for i in range(b):
        for j in range(b):
            ids = torch.cat([prompts[i], responses[j]])
            with torch.no_grad():
                (h,) = backbone(ids[None], torch.ones(1, ids.numel(), dtype=torch.long))
            logp = torch.log_softmax(h[0] @ head.T, -1)
            p = prompts[i].numel()
            expected = sum(float(logp[t - 1, ids[t]]) for t in range(p, ids.numel()))
            assert float(got[i, j]) == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(got, eager, rtol=1e-12, atol=0)
    # Feeds FusedVARLoss as cross-pair ref_logps.
    seq = make_sequences(gen, b, dtype=torch.float64, packed=False, vocab=vocab, dim=dim)
    weight = head.clone().requires_grad_()
    out = fastpref.FusedVARLoss(beta=2.0)(weight, seq.hidden, seq.targets, ref_logps=got,
                                          rewards=torch.randn(b, b, generator=gen, dtype=torch.float64))
    out.loss.backward()
    assert torch.isfinite(out.loss) and weight.grad.abs().max() > 0


# ------------------------------------------------------------------------------------------- check


def test_fastpref_check_has_a_row_per_module():
    from fastpref.commands.check import SUITES

    rows = SUITES["modules"].run(torch.float64, 0)
    assert len(rows) == 12
    assert {r[0].split("/")[0] for r in rows} == {n[len("Fused"):-len("Loss")] for n in MODULE_NAMES}
    assert all(err < 1e-10 for _, err in rows)


# ------------------------------------------------------------------------------------------- drop-in use


def test_drop_in_training_loop_lowers_the_loss():
    """A trainer's view: hidden states from a backbone, the nn.Linear head's parameters, .backward(), a step."""
    gen = torch.Generator().manual_seed(61)
    vocab, dim = 300, 32
    backbone = torch.nn.Embedding(vocab, dim)
    head = torch.nn.Linear(dim, vocab)
    with torch.no_grad():
        backbone.weight.copy_(torch.randn(vocab, dim, generator=gen))
        head.weight.mul_(3.0)
    ids = torch.randint(0, vocab, (6, 7), generator=gen)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    ref_logps = fastpref.fused_logprobs(backbone(ids).detach(), head.weight.detach(), targets,
                                        bias=head.bias.detach()).logps
    loss_fn = fastpref.FusedDPOLoss(beta=0.5)
    opt = torch.optim.Adam(list(backbone.parameters()) + list(head.parameters()), lr=1e-2)
    history = []
    for _ in range(15):
        opt.zero_grad()
        out = loss_fn(head.weight, backbone(ids), targets, bias=head.bias, ref_logps=ref_logps)
        out.loss.backward()
        opt.step()
        history.append(out.loss.item())
    assert history[0] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference at step 0
    assert history[-1] < 0.5 * history[0]
    assert float(out.metrics["reward_accuracy"].mean()) == 1.0


# ------------------------------------------------------------------------------------------- VAR reductions


def _var_by_hand(logps, lengths, rewards, ref, beta, policy_mean, ref_mean):
    """Paper-literal (normalize="none") VAR loss from per-sequence statistics, written as loops."""
    b = len(logps)
    total = 0.0
    for i in range(b):
        z = sum(math.exp(float(rewards[i, j]) / beta + float(ref[i, j]) / (float(lengths[j]) if ref_mean else 1.0))
                for j in range(b)) / b
        w = math.exp(float(rewards[i, i]) / beta) / z
        total = total - w * logps[i] / (lengths[i] if policy_mean else 1.0)
    return total / b


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("policy_reduction,ref_reduction", [("mean", "sum"), ("sum", "mean"), ("mean", "mean")])
def test_var_reduction_options_match_eager_and_a_formula(policy_reduction, ref_reduction, packed):
    case = make_case("FusedVARLoss", torch.float64, packed=packed, seed=67, ref="logps")  # cross pairs [B, B]
    ctor = dict(beta=1.5, normalize="none", policy_reduction=policy_reduction, ref_reduction=ref_reduction)
    fused = run_case(fastpref.FusedVARLoss(**ctor), case)
    eager = run_case(reference.FusedVARLoss(**ctor), case)
    assert max(_errors(fused, eager)) < 1e-10
    assert all(g.abs().max() > 0 for g in fused[1])
    pol = reference.fused_logprobs(case.main.hidden, case.weight, case.main.targets, bias=case.bias,
                                   **case.main.layout())
    want = _var_by_hand(pol.logps, pol.lengths, case.call["rewards"], case.call["ref_logps"], 1.5,
                        policy_reduction == "mean", ref_reduction == "mean")
    torch.testing.assert_close(fused[0], want.detach(), rtol=1e-10, atol=1e-12)
    # The options change the loss (the lengths differ across sequences).
    plain = run_case(fastpref.FusedVARLoss(beta=1.5, normalize="none"), case)
    assert abs(float(plain[0] - fused[0])) > 1e-6


def test_var_reduction_options_are_validated_at_construction():
    for bad in (dict(ref_reduction="max"), dict(policy_reduction="token"), dict(normalize="batch")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            fastpref.FusedVARLoss(beta=1.0, **bad)


def test_simpo_module_gamma_beta_ratio_sets_gamma_from_beta():
    """FusedSimPOLoss(gamma_beta_ratio=r) equals gamma = r * beta (SimPOConfig's parameterization)."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 6, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(40, 8, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 40, (4, 6), generator=g)
    by_ratio = fastpref.FusedSimPOLoss(beta=4.0, gamma_beta_ratio=0.25)(weight, hidden, targets).loss
    by_gamma = fastpref.FusedSimPOLoss(beta=4.0, gamma=1.0)(weight, hidden, targets).loss
    default_gamma = fastpref.FusedSimPOLoss(beta=4.0)(weight, hidden, targets).loss
    assert torch.allclose(by_ratio, by_gamma, rtol=1e-12, atol=0)
    assert not torch.allclose(by_ratio, default_gamma)
    with pytest.raises(ValueError, match="gamma_beta_ratio"):
        fastpref.FusedSimPOLoss(beta=4.0, gamma=1.0, gamma_beta_ratio=0.25)(weight, hidden, targets)
