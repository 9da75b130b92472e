"""Batch statistics across ranks: two gloo processes with unequal shares equal one process on the whole batch.

alpha-DPO's running margin statistics, KTO's z0 and SPO's weight baseline are global-batch statistics.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

import fastpref
from fastpref._module_checks import make_sequences

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


def _worker(rank: int, store: str, result_dir: str) -> None:
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no dependence on hostname resolution
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        mism_rows = [[0, 1], [2, 3, 4, 5]][rank]
        torch.save(_run(SHARES[rank], mism_rows), os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_batch_statistics_are_global(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
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
