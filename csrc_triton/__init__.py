"""Triton kernels of fastpref (``@triton.jit`` only: no autograd, no launches).

- ``tiles.py``: the logits tile ``softcap((h @ w.T + b) / T)`` shared by forward and backward.
- ``logprobs_fwd.py``: online log-sum-exp over vocabulary tiles, target gather, reference and KL.
- ``logprobs_bwd.py``: recomputes the tiles and accumulates dH, dW, db.
- ``configs.py``: autotune configurations for sm_80 (A100) and sm_90a (H100).

Launches and autograd glue live in ``fastpref/backends/triton_backend.py``.
"""
