"""Triton kernels of fastpref (``@triton.jit`` only: no autograd, no launches), installed as ``fastpref.kernels``.

- ``tiles.py``: the logits tile ``softcap((h @ w.T + b) / T)`` shared by forward and backward, the
  online log-sum-exp start and the forward epilogue ``write_row_results``.
- ``logprobs_fwd.py``: online log-sum-exp over vocabulary tiles, target gather, reference and KL.
- ``logprobs_combine.py``: merges the partial states of a split-vocabulary forward.
- ``logprobs_bwd.py``: recomputes the tiles and accumulates dH, dW, db.
- ``logits_rows.py``: row-wise log-sum-exp / target logit and the in-place softmax gradient over a dense logits
  buffer ``[R, V]`` (fp32/fp64; launchers in ``fastpref/backends/triton_rows.py``).
- ``configs.py``: the autotune plumbing; each kernel lists its configurations beside it.

Launchers live in ``fastpref/backends/triton_backend.py``; the autograd Function in ``fastpref/ops.py``.
Importing this package reads ``TRITON_INTERPRET``, so the library imports it lazily (never from
``fastpref/__init__.py``).
"""
