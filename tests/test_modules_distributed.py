"""Batch statistics across ranks: two gloo processes with unequal shares equal one process on the whole batch.

alpha-DPO's running margin statistics, KTO's z0 and SPO's weight baseline are global-batch statistics.
Also single-process checks of the ``stats_group`` option and of MC-PO's precomputed negatives.
"""
from __future__ import annotations

import pytest
import torch

import fastpref
from fastpref.testing import make_sequences

PAIRS = 4
SHARES = ([0], [1, 2, 3])  # rank 0 gets one pair, rank 1 three: exercises the unequal all_gather


def _data(step: int):
    """Deterministic global batch of one step: 4 pairs (8 padded sequences) + 6 mismatched KTO pairs."""
    gen = torch.Generator().manual_seed(100 + step)
    weight = 0.3 * torch.randn(300, 32, generator=gen, dtype=torch.float64)
    seq = make_sequences(gen, 2 * PAIRS, dtype=torch.float64, packed=False, vocab=300, dim=32, requires_grad=False)
    ref_logps = -5.0 - 20.0 * torch.rand(2 * PAIRS, generator=gen, dtype=torch.float64)
    mism = make_sequences(gen, 6, dtype=torch.float64, packed=False, vocab=300, dim=32, requires_grad=False)
    return weight, seq, ref_logps, mism


def _rows(pairs):
    """Sequence rows of the given pairs in the pairwise layout (chosen block, then rejected block)."""
    return list(pairs) + [PAIRS + p for p in pairs]


def _run(pairs, mism_rows):
    """alpha-DPO statistics after two steps, KTO z0 and SPO weights for ``pairs`` of each step's batch."""
    alpha = fastpref.FusedAlphaDPOLoss(beta=2.5, alpha=0.2)
    spo = fastpref.FusedSPOLoss(gamma=0.05)
    out = {"spo_weights": [], "z0": []}
    for step in range(2):
        weight, seq, ref_logps, mism = _data(step)
        rows = _rows(pairs)
        alpha(weight, seq.hidden[rows], seq.targets[rows], ref_logps=ref_logps[rows])
        out["spo_weights"].append(spo(weight, seq.hidden[rows], seq.targets[rows]).metrics["weights"])
        kto = fastpref.FusedKTOLoss()(weight, seq.hidden[rows], seq.targets[rows], ref_logps=ref_logps[rows],
                                      labels=torch.ones(len(rows), dtype=torch.bool),
                                      kl_hidden=mism.hidden[mism_rows], kl_targets=mism.targets[mism_rows],
                                      kl_ref_hidden=mism.ref_hidden[mism_rows])
        out["z0"].append(kto.metrics["z0"])
    out.update(margin_mean=alpha.margin_mean.clone(), margin_std=alpha.margin_std.clone())
    return out


def _worker(rank: int, world: int) -> dict:
    mism_rows = [[0, 1], [2, 3, 4, 5]][rank]
    return _run(SHARES[rank], mism_rows)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_batch_statistics_are_global(tmp_path):
    # the shared harness (TCP rendezvous, deadline, per-rank tracebacks), as every other gloo test
    from test_distributed import run_distributed

    ranks = run_distributed(_worker, tmp_path=tmp_path)
    single = _run(range(PAIRS), list(range(6)))
    assert float(single["margin_std"]) > 0
    for res, pairs in zip(ranks, SHARES):
        for key in ("margin_mean", "margin_std"):
            torch.testing.assert_close(res[key], single[key], rtol=1e-12, atol=1e-14)
        for step in range(2):
            torch.testing.assert_close(res["z0"][step], single["z0"][step], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(res["spo_weights"][step], single["spo_weights"][step][list(pairs)],
                                       rtol=1e-12, atol=0)
    # Non-vacuous: rank 0's pair alone would give a different (undefined) std, and local SPO weights differ.
    assert not torch.allclose(_run([1, 2, 3], [2, 3, 4, 5])["spo_weights"][0], ranks[1]["spo_weights"][0])


def test_stats_group_option_is_validated_and_local_needs_no_process_group():
    with pytest.raises(ValueError, match="stats_group"):
        fastpref.FusedAlphaDPOLoss(stats_group="world")
    with pytest.raises(TypeError, match="process group"):
        fastpref.FusedKTOLoss(stats_group=0)
    # "local" and None agree without torch.distributed; the statistic is this batch's
    weight, seq, ref_logps, _ = _data(0)
    outs = [fastpref.FusedAlphaDPOLoss(stats_group=sg)(weight, seq.hidden, seq.targets, ref_logps=ref_logps)
            for sg in (None, "local")]
    torch.testing.assert_close(outs[0].metrics["margin_std"], outs[1].metrics["margin_std"], rtol=0, atol=0)
    margins = outs[0].metrics["margin"].double()
    torch.testing.assert_close(outs[0].metrics["margin_std"].double(), margins.std(), rtol=1e-6, atol=0)


def test_mcpo_precomputed_negatives_on_selected_rows_equal_the_full_call():
    """MC-PO's no-grad pass done by the caller: the module called on the preferred + selected rows only
    (negatives [1..M]) gives the full call's loss and gradients with the same negatives."""
    gen = torch.Generator().manual_seed(3)
    b, g, m = 3, 4, 2
    weight = (0.3 * torch.randn(50, 16, generator=gen, dtype=torch.float64)).requires_grad_(True)
    hidden = torch.randn(b * g, 6, 16, generator=gen, dtype=torch.float64).requires_grad_(True)
    targets = torch.randint(0, 50, (b * g, 6), generator=gen)
    ref_logps = -10.0 * torch.rand(b * g, generator=gen, dtype=torch.float64)
    loss_fn = fastpref.FusedMCPOLoss(beta=0.5, group_size=g, num_negatives=m)
    with torch.no_grad():
        stats = fastpref.fused_logprobs(hidden, weight, targets)
    negatives = loss_fn.sample_negatives(stats.logps.view(b, g), ref_logps.view(b, g),
                                         generator=torch.Generator().manual_seed(0))
    full = loss_fn(weight, hidden, targets, ref_logps=ref_logps, negatives=negatives)
    rows = torch.cat([torch.cat([torch.tensor([i * g]), i * g + negatives[i]]) for i in range(b)])
    compact = loss_fn(weight, hidden[rows], targets[rows], ref_logps=ref_logps[rows], group_size=1 + m,
                      negatives=torch.arange(1, m + 1).expand(b, m))
    torch.testing.assert_close(compact.loss, full.loss, rtol=1e-12, atol=1e-14)
    for got, want in zip(torch.autograd.grad(compact.loss, (weight, hidden)),
                         torch.autograd.grad(full.loss, (weight, hidden))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert float(full.loss) > 0
    with pytest.raises(ValueError, match="not both"):
        loss_fn(weight, hidden, targets, ref_logps=ref_logps, negatives=negatives, generator=torch.Generator())
    with pytest.raises(ValueError, match="column indices in 0..3"):
        loss_fn(weight, hidden, targets, ref_logps=ref_logps, negatives=negatives + g)
    with pytest.raises(TypeError, match="int64"):
        loss_fn(weight, hidden, targets, ref_logps=ref_logps, negatives=negatives.float())
    with pytest.raises(ValueError, match="shape"):
        loss_fn(weight, hidden, targets, ref_logps=ref_logps, negatives=negatives[:1])
