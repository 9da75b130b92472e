"""Every bad input of fused_logprobs raises a clear error naming the argument."""
import math

import pytest
import torch

import fastpref
import fastpref.reference as reference

S, T, D, V = 2, 3, 8, 50


def good(**over):
    args = dict(
        hidden=torch.randn(S, T, D),
        weight=torch.randn(V, D),
        targets=torch.randint(0, V, (S, T)),
    )
    args.update(over)
    return args


def call(fn, hidden, weight, targets, **kwargs):
    return fn(hidden, weight, targets, **kwargs)


BAD = [
    # (description, arguments, exception, text that must appear in the message)
    ("targets shape", good(targets=torch.zeros(S, T + 1, dtype=torch.long)), ValueError, "targets"),
    ("weight D", good(weight=torch.randn(V, D + 1)), ValueError, "weight"),
    ("weight rank", good(weight=torch.randn(V)), ValueError, "weight"),
    ("hidden rank", good(hidden=torch.randn(D)), ValueError, "hidden"),
    ("bias length", dict(good(), bias=torch.randn(V + 1)), ValueError, "bias"),
    ("float targets", good(targets=torch.zeros(S, T)), TypeError, "targets"),
    ("int hidden", good(hidden=torch.zeros(S, T, D, dtype=torch.long)), TypeError, "hidden"),
    ("dtype mismatch", good(weight=torch.randn(V, D, dtype=torch.float64)), TypeError, "weight"),
    ("target >= V", good(targets=torch.full((S, T), V)), ValueError, "targets"),
    ("negative target", good(targets=torch.full((S, T), -3)), ValueError, "targets"),
    ("packed without seq_ids", good(hidden=torch.randn(6, D), targets=torch.zeros(6, dtype=torch.long)),
     ValueError, "seq_ids"),
    ("seq_ids out of range", dict(good(hidden=torch.randn(6, D), targets=torch.zeros(6, dtype=torch.long)),
                                  seq_ids=torch.tensor([0, 0, 1, 1, 2, 5]), num_seqs=3), ValueError, "seq_ids"),
    ("negative seq_ids", dict(good(hidden=torch.randn(3, D), targets=torch.zeros(3, dtype=torch.long)),
                              seq_ids=torch.tensor([0, -1, 1])), ValueError, "seq_ids"),
    ("seq_ids length", dict(good(hidden=torch.randn(3, D), targets=torch.zeros(3, dtype=torch.long)),
                            seq_ids=torch.tensor([0, 1])), ValueError, "seq_ids"),
    ("seq_ids on padded", dict(good(), seq_ids=torch.zeros(S * T, dtype=torch.long)), ValueError, "seq_ids"),
    ("kl without ref_hidden", dict(good(), kl="forward"), ValueError, "ref_hidden"),
    ("unknown kl", dict(good(), ref_hidden=torch.randn(S, T, D), kl="sideways"), ValueError, "kl"),
    ("unknown backend", dict(good(), backend="cuda-magic"), ValueError, "backend"),
    ("ref_hidden shape", dict(good(), ref_hidden=torch.randn(S, T + 1, D)), ValueError, "ref_hidden"),
    ("ref_hidden D", dict(good(), ref_hidden=torch.randn(S, T, D + 2)), ValueError, "ref_hidden"),
    ("ref_weight V", dict(good(), ref_hidden=torch.randn(S, T, D), ref_weight=torch.randn(V - 1, D)),
     ValueError, "ref_weight"),
    ("ref_bias length", dict(good(), ref_hidden=torch.randn(S, T, D), ref_weight=torch.randn(V, D),
                             ref_bias=torch.randn(3)), ValueError, "ref_bias"),
    ("ref_weight without ref_hidden", dict(good(), ref_weight=torch.randn(V, D)), ValueError, "ref_hidden"),
    ("mixed devices weight", good(weight=torch.empty(V, D, device="meta")), ValueError, "weight.*mixed devices"),
    ("mixed devices bias", dict(good(), bias=torch.empty(V, device="meta")), ValueError, "bias.*mixed devices"),
    ("mixed devices seq_ids", dict(good(hidden=torch.randn(3, D), targets=torch.zeros(3, dtype=torch.long)),
                                   seq_ids=torch.zeros(3, dtype=torch.long, device="meta")), ValueError, "seq_ids"),
    ("mixed devices ref_weight", dict(good(), ref_hidden=torch.randn(S, T, D),
                                      ref_weight=torch.empty(V, D, device="meta")), ValueError, "ref_weight"),
    ("mixed devices ref_bias", dict(good(), ref_hidden=torch.randn(S, T, D), ref_weight=torch.randn(V, D),
                                    ref_bias=torch.empty(V, device="meta")), ValueError, "ref_bias"),
    ("float seq_ids", dict(good(hidden=torch.randn(3, D), targets=torch.zeros(3, dtype=torch.long)),
                           seq_ids=torch.zeros(3)), TypeError, "seq_ids"),
    ("bias dtype", dict(good(), bias=torch.randn(V, dtype=torch.float64)), TypeError, "bias"),
    ("ref_bias dtype", dict(good(), ref_hidden=torch.randn(S, T, D), ref_weight=torch.randn(V, D),
                            ref_bias=torch.randn(V, dtype=torch.float64)), TypeError, "ref_bias"),
    ("bias -inf", dict(good(), bias=torch.full((V,), -math.inf)), ValueError, "bias must be finite"),
    ("bias nan", dict(good(), bias=torch.full((V,), math.nan)), ValueError, "bias must be finite"),
    ("ref_bias inf", dict(good(), ref_hidden=torch.randn(S, T, D), ref_weight=torch.randn(V, D),
                          ref_bias=torch.full((V,), math.inf)), ValueError, "ref_bias must be finite"),
    ("num_seqs float", dict(good(hidden=torch.randn(3, D), targets=torch.zeros(3, dtype=torch.long)),
                            seq_ids=torch.tensor([0, 0, 1]), num_seqs=2.7), TypeError, "num_seqs"),
    ("ignore_index None", dict(good(), ignore_index=None), TypeError, "ignore_index"),
    ("ignore_index float", dict(good(), ignore_index=-100.0), TypeError, "ignore_index"),
    ("mixed devices targets", good(targets=torch.zeros(S, T, dtype=torch.long, device="meta")), ValueError,
     "targets"),
    ("mixed devices ref", dict(good(), ref_hidden=torch.empty(S, T, D, device="meta")), ValueError, "ref_hidden"),
    ("temperature 0", dict(good(), temperature=0.0), ValueError, "temperature"),
    ("temperature nan", dict(good(), temperature=math.nan), ValueError, "temperature"),
    ("temperature inf", dict(good(), temperature=math.inf), ValueError, "temperature"),
    ("softcap negative", dict(good(), softcap=-1.0), ValueError, "softcap"),
    ("softcap zero", dict(good(), softcap=0.0), ValueError, "softcap"),
    ("softcap inf", dict(good(), softcap=math.inf), ValueError, "softcap"),
    ("temperature string", dict(good(), temperature="hot"), TypeError, "temperature"),
    ("num_seqs mismatch padded", dict(good(), num_seqs=S + 1), ValueError, "num_seqs"),
]


@pytest.mark.parametrize("fn", [fastpref.fused_logprobs, reference.fused_logprobs], ids=["fused", "reference"])
@pytest.mark.parametrize("desc,args,exc,text", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(fn, desc, args, exc, text):
    with pytest.raises(exc, match=text):
        call(fn, **args)


def test_ignore_index_is_not_out_of_range():
    targets = torch.randint(0, V, (S, T))
    targets[0, 0] = -7
    stats = fastpref.fused_logprobs(torch.randn(S, T, D), torch.randn(V, D), targets, ignore_index=-7)
    assert stats.lengths.tolist() == [T - 1, T]


def test_int32_targets_and_seq_ids_accepted():
    hidden, weight = torch.randn(5, D), torch.randn(V, D)
    targets = torch.randint(0, V, (5,), dtype=torch.int32)
    seq = torch.tensor([0, 0, 1, 1, 1], dtype=torch.int32)
    stats = fastpref.fused_logprobs(hidden, weight, targets, seq_ids=seq)
    ref = reference.fused_logprobs(hidden, weight, targets.long(), seq_ids=seq.long())
    assert torch.allclose(stats.logps, ref.logps, rtol=1e-5, atol=1e-5)


def test_explicit_num_seqs_adds_empty_sequences():
    hidden, weight = torch.randn(4, D), torch.randn(V, D)
    stats = fastpref.fused_logprobs(hidden, weight, torch.randint(0, V, (4,)), seq_ids=torch.tensor([0, 0, 2, 2]),
                                    num_seqs=5)
    assert stats.logps.shape == (5,)
    assert stats.logps[1].item() == 0 and stats.logps[3].item() == 0 and stats.logps[4].item() == 0
    assert torch.isfinite(stats.logps).all()


def test_in_place_change_before_backward_is_detected():
    """The backward recomputes the logits from the inputs: modifying one in place must raise, as eager does."""
    hidden = torch.randn(S, T, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    stats = fastpref.fused_logprobs(hidden, weight, torch.randint(0, V, (S, T)))
    with torch.no_grad():
        weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stats.logps.sum().backward()


def test_double_backward_raises_clearly():
    hidden = torch.randn(S, T, D, requires_grad=True)
    stats = fastpref.fused_logprobs(hidden, torch.randn(V, D), torch.randint(0, V, (S, T)))
    (grad,) = torch.autograd.grad(stats.logps.sum(), hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(grad.sum(), hidden)


@pytest.mark.parametrize("fn", [fastpref.fused_logprobs, reference.fused_logprobs], ids=["fused", "reference"])
def test_non_finite_hidden_at_ignored_position_does_not_leak(fn):
    """An ignored position is excluded, whatever its hidden state holds (e.g. NaN padding)."""
    hidden = torch.randn(S, T, D)
    targets = torch.randint(0, V, (S, T))
    hidden[0, 1] = math.nan
    hidden[1, 2] = math.inf
    targets[0, 1] = targets[1, 2] = -100
    leaf = hidden.clone().requires_grad_()
    stats = fn(leaf, torch.randn(V, D), targets, ref_hidden=hidden.nan_to_num(0.0, 0.0, 0.0), kl="forward")
    assert torch.isfinite(stats.logps).all() and torch.isfinite(stats.kl).all()
    assert torch.isfinite(stats.ref_logps).all()
    (stats.logps.sum() + stats.kl.sum()).backward()
    assert torch.isfinite(leaf.grad).all()
    assert leaf.grad[0, 1].abs().sum() == 0 and leaf.grad[1, 2].abs().sum() == 0


def test_non_finite_hidden_at_valid_position_is_visible():
    """NaN in a used hidden state is not hidden away: its sequence's log-prob is NaN, the others are not."""
    hidden = torch.randn(S, T, D)
    hidden[1, 0] = math.nan
    stats = fastpref.fused_logprobs(hidden, torch.randn(V, D), torch.randint(0, V, (S, T)))
    assert torch.isnan(stats.logps[1]) and torch.isfinite(stats.logps[0])
