"""The core-op case list shared by the torch-backend and Triton-backend parity tests.

``make_case(name, dtype)`` builds inputs for ``fused_logprobs``; ``run_with_grads`` runs a
``fused_logprobs``-like function under fixed random upstream gradients on every output and returns the
outputs and the gradients of hidden, weight and bias.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

CASES = [
    "padded",            # padded rows with some ignored positions
    "packed",            # packed unequal-length sequences, interleaved
    "bias",              # LM-head bias
    "temp_softcap",      # temperature + softcap
    "kl_forward",        # separate reference head, forward KL
    "kl_reverse",        # separate reference head, reverse KL
    "shared_ref_head",   # reference from ref_hidden with the policy head
    "kl_temp_softcap",   # forward KL with bias, temperature and softcap through the shared head
    "kl_reverse_shared", # reverse KL through the shared head and its bias
    "fully_ignored",     # a sequence whose positions are all ignored
    "one_token",         # one-token sequences
    "vocab_4099",        # V not a multiple of the vocab block
    "n_equals_1",        # a single position
]


def make_case(name: str, dtype: torch.dtype = torch.float64, seed: int = 0, device="cpu") -> Tuple[tuple, Dict]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    D, V = 24, 4099 if name == "vocab_4099" else 517
    kwargs: Dict = {}
    if name in ("packed", "one_token", "n_equals_1"):
        lengths = {"packed": [7, 1, 13, 4], "one_token": [1, 1, 1], "n_equals_1": [1]}[name]
        n = sum(lengths)
        seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        if name == "packed":
            seq = seq[torch.randperm(n, generator=g)]  # interleaved positions of unequal sequences
        hidden = rnd(n, D)
        targets = torch.randint(0, V, (n,), generator=g)
        if name == "packed":
            targets[3] = -100
        kwargs["seq_ids"] = seq.to(device)
    else:
        S, T = (3, 11)
        hidden = rnd(S, T, D)
        targets = torch.randint(0, V, (S, T), generator=g)
        targets[0, :4] = -100
        if name == "fully_ignored":
            targets[1, :] = -100
    weight = rnd(V, D, scale=0.4)
    if name in ("bias", "temp_softcap", "kl_forward", "packed", "kl_temp_softcap", "kl_reverse_shared"):
        kwargs["bias"] = rnd(V, scale=0.5)
    if name in ("temp_softcap", "kl_temp_softcap"):
        kwargs.update(temperature=0.6, softcap=4.0)
    if name in ("kl_forward", "kl_reverse", "packed", "fully_ignored", "one_token"):
        kwargs["ref_hidden"] = hidden + rnd(*hidden.shape, scale=0.5)
        kwargs["ref_weight"] = weight + rnd(V, D, scale=0.1)
        kwargs["kl"] = "reverse" if name == "kl_reverse" else "forward"
        if name == "kl_forward":
            kwargs["ref_bias"] = rnd(V, scale=0.5)
    if name in ("shared_ref_head", "kl_temp_softcap", "kl_reverse_shared"):
        # No ref_weight: the reference reads the policy head (detached) and its bias.
        kwargs["ref_hidden"] = hidden + rnd(*hidden.shape, scale=0.5)
        if name != "shared_ref_head":
            kwargs["kl"] = "forward" if name == "kl_temp_softcap" else "reverse"
    return (hidden, weight, targets.to(device)), kwargs


def run_with_grads(fn, inputs: tuple, kwargs: Dict, seed: int = 1, **extra) -> Tuple[List[torch.Tensor], List]:
    """Outputs [logps, token_logps, lengths, ref_logps?, kl?, token_kl?] and grads [dH, dW, db?]."""
    hidden, weight, targets = (t.detach().clone() for t in inputs)
    hidden.requires_grad_()
    weight.requires_grad_()
    kw = dict(kwargs)
    leaves = [hidden, weight]
    if kw.get("bias") is not None:
        kw["bias"] = kw["bias"].detach().clone().requires_grad_()
        leaves.append(kw["bias"])
    stats = fn(hidden, weight, targets, **kw, **extra)
    g = torch.Generator().manual_seed(seed)

    def upstream(t):
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t)

    loss = (stats.logps * upstream(stats.logps)).sum() + (stats.token_logps * upstream(stats.token_logps)).sum()
    outs = [stats.logps, stats.token_logps, stats.lengths]
    if stats.ref_logps is not None:
        outs.append(stats.ref_logps)
    if stats.kl is not None:
        loss = loss + (stats.kl * upstream(stats.kl)).sum() + (stats.token_kl * upstream(stats.token_kl)).sum()
        outs += [stats.kl, stats.token_kl]
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs], list(grads)


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (absolute when b is all zero)."""
    a, b = a.double(), b.double()
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def max_err_floored(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-2) -> float:
    """max |a - b| relative to max(max |b|, floor).

    For random problems: a tensor whose entries are all tiny (a lone log-prob or KL near 0, the
    gradient of a nearly saturated softmax) is a difference of O(1) terms, so its round-off is eps of
    those terms, not of the small result; below ``floor`` the comparison becomes absolute.
    """
    if not b.numel():
        return 0.0
    a, b = a.double(), b.double()
    return (a - b).abs().max().item() / max(b.abs().max().item(), floor)
