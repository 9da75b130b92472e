"""The row-wise softmax kernels (``fastpref/backends/triton_rows.py``) on CPU, through Triton's interpreter.

``TRITON_INTERPRET`` is read when ``fastpref.kernels`` is first imported, so, as in ``test_triton_interpret.py``,
the kernels run in a subprocess: this file run as a script (``run_cases``) writes the errors of every case as JSON,
and the tests assert on them. Argument checks run in this process (they raise before any launch).

References are plain torch expressions on the same tensor: ``torch.logsumexp``, ``gather``, the gradient formula,
and the autograd gradient of ``sum(row_scale * log_softmax(z).gather(targets))``. Shapes are set against the
interpreter's BLOCK_V: a ragged tail, a vocabulary narrower than one block, exact blocks, a single row, logits offset
by +-1e4 (a naive exp overflows even in fp64), and whole -inf blocks; targets include columns 0 and V - 1.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from _interpret import run_interpreted

from fastpref.backends.triton_backend import INTERPRET_BLOCKS

BLOCK_V = INTERPRET_BLOCKS["BLOCK_V"]  # the launcher's block under the interpreter
TOL = {"float64": 1e-13, "float32": 2e-6}

# name -> (rows, vocabulary, kind of logits)
CASES = {
    "ragged_tail": (5, BLOCK_V + 36, "normal"),
    "narrow_vocab": (3, BLOCK_V - 27, "normal"),
    "exact_blocks": (4, 2 * BLOCK_V, "normal"),
    "many_blocks": (2, 10 * BLOCK_V + 9, "normal"),
    "single_row": (1, BLOCK_V + 5, "normal"),
    "single_row_narrow": (1, 7, "normal"),
    "large_magnitude": (4, 2 * BLOCK_V + 22, "offsets"),
    "neg_inf_blocks": (3, 2 * BLOCK_V + 22, "neg_inf"),
}
DTYPES = ("float64", "float32")


def make_case(rows: int, vocab: int, kind: str, dtype: torch.dtype):
    """(z, targets, row_scale), seeded per shape. Targets: row 0 -> column 0 and the last row -> V - 1 (a single
    row: 0 when V > BLOCK_V, else V - 1), the others random; one row has scale 0 when there are three or more."""
    gen = torch.Generator().manual_seed(1000 * rows + vocab)
    z = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 3
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    if rows == 1:
        targets[0] = 0 if vocab > BLOCK_V else vocab - 1
    else:
        targets[0], targets[-1] = 0, vocab - 1
    if kind == "offsets":  # +1e4, -1e4, then rising / falling ramps over [-1e4, 1e4] (the max in the last block,
        ramp = torch.linspace(-1e4, 1e4, vocab, dtype=torch.float64)  # then in the first)
        z = z + torch.stack([torch.full_like(ramp, 1e4), torch.full_like(ramp, -1e4), ramp, ramp.flip(0)])
    if kind == "neg_inf":  # a whole first block, scattered columns, and the tail at -inf (targets kept finite)
        z[0, :BLOCK_V] = -math.inf
        z[1, 1:][torch.rand(vocab - 1, generator=gen) < 0.3] = -math.inf
        z[2, vocab - 20:] = -math.inf
        targets[:] = torch.tensor([vocab - 1, 0, 0])
    scale = torch.randn(rows, generator=gen, dtype=torch.float64)
    if rows >= 3:
        scale[1] = 0.0
    return z.to(dtype), targets, scale.to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over entries of |a - b| / max(1, |b|), for the finite entries of b (inf/-inf entries must agree exactly)."""
    finite = torch.isfinite(b)
    if not torch.equal(a[~finite], b[~finite]):
        return math.inf
    a, b = a[finite], b[finite]
    return ((a - b).abs() / b.abs().clamp(min=1.0)).max().item()


def run_case(name: str, dtype_name: str) -> dict:
    """Every error of one case (run under the interpreter)."""
    from fastpref.backends.triton_rows import row_softmax_stats, softmax_grad_

    rows, vocab, kind = CASES[name]
    dtype = getattr(torch, dtype_name)
    z, targets, scale = make_case(rows, vocab, kind, dtype)
    lse, target_logit = row_softmax_stats(z, targets)
    lse_ref = torch.logsumexp(z, dim=1)
    out = {"lse": _rel(lse, lse_ref), "dtype_ok": lse.dtype == target_logit.dtype == dtype,
           "lse_vs_fp64": _rel(lse.double(), torch.logsumexp(z.double(), dim=1)),
           "target_exact": torch.equal(target_logit, z.gather(1, targets[:, None])[:, 0])}

    # The formula on the same lse: differences come only from exp. z lives in a padded buffer (an extra row and
    # 7 extra columns) whose padding must come back untouched: the tail mask writes nothing past V.
    buffer = torch.full((rows + 1, vocab + 7), 12345.0, dtype=dtype)
    view = buffer[:rows, :vocab]
    view.copy_(z)
    returned = softmax_grad_(view, lse_ref, scale, targets)
    onehot = torch.nn.functional.one_hot(targets, vocab).to(dtype)
    out["grad_formula"] = _rel(view, scale[:, None] * (onehot - torch.exp(z - lse_ref[:, None])))
    out["in_place"] = returned is view and returned.data_ptr() == buffer.data_ptr()
    out["padding_untouched"] = bool((buffer[rows] == 12345.0).all() and (buffer[:, vocab:] == 12345.0).all())

    # The pipeline (stats -> grad, both kernels) against autograd. The gradient's error follows lse's rounding
    # times exp(z - lse): relative to max(1, |z|) (eps * 1e4 in fp32 with the +-1e4 offsets).
    leaf = z.clone().requires_grad_(True)
    (scale * torch.log_softmax(leaf, dim=1).gather(1, targets[:, None])[:, 0]).sum().backward()
    grad = softmax_grad_(z.clone(), lse, scale, targets)
    out["grad_autograd"] = _rel(grad, leaf.grad) / max(1.0, z[torch.isfinite(z)].abs().max().item())
    out["grad_finite"] = bool(torch.isfinite(grad).all())
    out["zero_scale_row_zero"] = rows < 3 or bool((grad[1] == 0).all())
    return out


def run_edge_rows() -> dict:
    """An all -inf row gets lse = -inf (torch.logsumexp's value) without NaN; an out-of-range target gives a NaN
    target logit and no one-hot column."""
    from fastpref.backends.triton_rows import row_softmax_stats, softmax_grad_

    z = torch.randn(3, BLOCK_V + 3, dtype=torch.float64)
    z[1] = -math.inf
    lse, _ = row_softmax_stats(z, torch.tensor([0, 1, 2]))
    bad_lse, bad_target = row_softmax_stats(z[[0, 2]], torch.tensor([-1, BLOCK_V + 3]))
    grad = softmax_grad_(z[[0, 2]].clone(), bad_lse, torch.ones(2, dtype=torch.float64), torch.tensor([-1, 70]))
    return {"all_neg_inf_lse": lse[1].item() == -math.inf and bool(torch.isfinite(lse[[0, 2]]).all()),
            "out_of_range_target_nan": bool(torch.isnan(bad_target).all()),
            "out_of_range_target_no_onehot": bool((grad[0] < 0).all() and (grad[1] <= 0).all()),
            "empty_rows": [t.shape for t in row_softmax_stats(z[:0], torch.zeros(0, dtype=torch.long))] == [(0,)] * 2}


def run_cases(path: str) -> None:
    from fastpref.backends.triton_backend import interpreting

    assert interpreting(), "run this script with TRITON_INTERPRET=1"
    results = {f"{name}/{d}": run_case(name, d) for name in CASES for d in DTYPES}
    results["edge_rows"] = run_edge_rows()
    Path(path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("rows") / "results.json"
    return run_interpreted(__file__, out)


def test_case_shapes_cover_the_block_edges():
    vocabs = {name: v for name, (_, v, _) in CASES.items()}
    assert vocabs["ragged_tail"] % BLOCK_V and vocabs["ragged_tail"] > BLOCK_V
    assert vocabs["narrow_vocab"] < BLOCK_V and vocabs["exact_blocks"] % BLOCK_V == 0
    assert CASES["single_row"][0] == CASES["single_row_narrow"][0] == 1
    firsts, lasts = set(), set()
    for name, (rows, vocab, kind) in CASES.items():
        targets = make_case(rows, vocab, kind, torch.float64)[1].tolist()
        assert all(0 <= t < vocab for t in targets)
        (firsts if 0 in targets else set()).add(name)
        (lasts if vocab - 1 in targets else set()).add(name)
    assert firsts == set(CASES) - {"single_row_narrow"} and lasts == set(CASES) - {"single_row"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_stats_and_grad_match_torch(results, name, dtype):
    res, tol = results[f"{name}/{dtype}"], TOL[dtype]
    assert res["dtype_ok"] and res["target_exact"], res
    assert res["lse"] < tol, res
    assert res["lse_vs_fp64"] < tol, res  # stable: no overflow or cancellation, even at +-1e4
    assert res["grad_formula"] < tol, res
    assert res["grad_autograd"] < tol, res
    assert res["grad_finite"] and res["zero_scale_row_zero"], res
    assert res["in_place"] and res["padding_untouched"], res


def test_edge_rows(results):
    assert results["edge_rows"] == {"all_neg_inf_lse": True, "out_of_range_target_nan": True,
                                    "out_of_range_target_no_onehot": True, "empty_rows": True}


def _args(rows: int = 3, vocab: int = 10, dtype: torch.dtype = torch.float32):
    return (torch.randn(rows, vocab, dtype=dtype), torch.zeros(rows, dtype=dtype), torch.ones(rows, dtype=dtype),
            torch.zeros(rows, dtype=torch.long))


@pytest.mark.parametrize("make, error, match", [
    (lambda z, lse, s, t: (z[0], t), ValueError, r"z must be 2-D"),
    (lambda z, lse, s, t: (z.long(), t), TypeError, r"z must be float32 or float64.*int64"),
    (lambda z, lse, s, t: (z.bfloat16(), t), TypeError, r"z must be float32 or float64.*bfloat16"),
    (lambda z, lse, s, t: (z[:, :0], t), ValueError, r"z has no vocabulary columns"),
    (lambda z, lse, s, t: (z.t().contiguous().t(), t), ValueError, r"z must have contiguous rows"),
    (lambda z, lse, s, t: (z.numpy(), t), TypeError, r"z must be a torch.Tensor"),
    (lambda z, lse, s, t: (z, t[:2]), ValueError, r"targets must have shape \[3\]"),
    (lambda z, lse, s, t: (z, t.int()), TypeError, r"targets must be torch.int64.*int32"),
    (lambda z, lse, s, t: (z, t.to("meta")), ValueError, r"targets is on meta but z is on cpu"),
])
def test_row_softmax_stats_argument_errors(make, error, match):
    from fastpref.backends.triton_rows import row_softmax_stats

    with pytest.raises(error, match=match):
        row_softmax_stats(*make(*_args()))


@pytest.mark.parametrize("make, error, match", [
    (lambda z, lse, s, t: (z, lse.double(), s, t), TypeError, r"lse must be torch.float32 .*float64"),
    (lambda z, lse, s, t: (z, lse, s[:, None], t), ValueError, r"row_scale must have shape \[3\].*\(3, 1\)"),
    (lambda z, lse, s, t: (z, lse, s.to("meta"), t), ValueError, r"row_scale is on meta"),
    (lambda z, lse, s, t: (z, lse, s, t.float()), TypeError, r"targets must be torch.int64"),
    (lambda z, lse, s, t: (z[:1].expand(3, 10), lse, s, t), ValueError, r"z's rows overlap"),
    (lambda z, lse, s, t: (z.requires_grad_(True), lse, s, t), RuntimeError, r"z requires grad"),
    (lambda z, lse, s, t: (z.double(), lse, s, t), TypeError, r"lse must be torch.float64"),
])
def test_softmax_grad_argument_errors(make, error, match):
    from fastpref.backends.triton_rows import softmax_grad_

    with pytest.raises(error, match=match):
        softmax_grad_(*make(*_args()))


def test_cpu_tensors_need_cuda_or_the_interpreter():
    from fastpref.backends import triton_backend
    from fastpref.backends.triton_rows import row_softmax_stats, softmax_grad_

    if triton_backend.interpreting():
        pytest.skip("this process runs the interpreter, where CPU tensors are accepted")
    z, lse, scale, targets = _args()
    with pytest.raises(ValueError, match="z is on cpu.*CUDA.*TRITON_INTERPRET"):
        row_softmax_stats(z, targets)
    before = z.clone()
    with pytest.raises(ValueError, match="z is on cpu.*CUDA"):
        softmax_grad_(z, lse, scale, targets)
    assert torch.equal(z, before)


if __name__ == "__main__":
    run_cases(sys.argv[1])
