"""Backends of ``fused_logprobs``: ``torch_backend`` (CPU and any device) and ``triton_backend`` (CUDA).

Each exposes ``token_stats(prep) -> (token_logps, ref_token_logps, token_kl)``: per-position [N]
tensors, differentiable with respect to ``prep.hidden``, ``prep.weight`` and ``prep.bias``.
"""
