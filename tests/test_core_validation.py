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
    ("mixed devices weight", good(weight=torch.empty(V, D, device="meta")), ValueError, "mixed devices"),
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
