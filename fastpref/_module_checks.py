"""Random test cases for the fused loss modules, shared by ``fastpref check`` and the test suite.

:func:`make_case` builds small inputs for one module class name (padded or packed, any float dtype);
:func:`run_case` runs a module (fused or its eager twin) on them and returns the loss and the gradients;
:func:`check_modules` is the ``fastpref check`` suite: each module against its eager twin.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

Tensor = torch.Tensor

MODULE_NAMES = [
    "FusedDPOLoss", "FusedIPOLoss", "FusedSimPOLoss", "FusedSLiCLoss", "FusedDPOPLoss", "FusedKTOLoss",
    "FusedORPOLoss", "FusedCPOLoss", "FusedVARLoss", "FusedAlphaDPOLoss", "FusedMCPOLoss", "FusedSPOLoss",
]

#: Constructor arguments used by the cases (non-default where the default would hide a code path).
CTOR: Dict[str, dict] = {
    "FusedDPOLoss": dict(beta=0.5, label_smoothing=0.1),
    "FusedIPOLoss": dict(tau=0.5),
    "FusedSimPOLoss": dict(beta=2.0, gamma=0.5, sft_weight=0.1),
    "FusedSLiCLoss": dict(delta=20.0, reg_weight=0.1),  # delta large enough that the hinge is active
    "FusedDPOPLoss": dict(beta=0.3, dpop_lambda=5.0),
    "FusedKTOLoss": dict(beta=0.5, desirable_weight=1.0, undesirable_weight=1.3),
    "FusedORPOLoss": dict(orpo_lambda=0.5),
    "FusedCPOLoss": dict(beta=0.2, nll_weight=0.5),
    "FusedVARLoss": dict(beta=1.0),
    "FusedAlphaDPOLoss": dict(beta=2.5, gamma_beta_ratio=0.4, alpha=0.2),
    "FusedMCPOLoss": dict(beta=0.5, group_size=4, num_negatives=1),
    "FusedSPOLoss": dict(alpha=0.1, gamma=0.01, kl_coef=0.1),
}

REFERENCE_FREE = {"FusedSimPOLoss", "FusedSLiCLoss", "FusedORPOLoss", "FusedCPOLoss", "FusedSPOLoss"}


@dataclass
class Sequences:
    hidden: Tensor  # [S, T, D] or [N, D], a leaf (requires grad when asked)
    targets: Tensor
    seq_ids: Optional[Tensor]
    ref_hidden: Tensor

    def layout(self) -> dict:
        return {} if self.seq_ids is None else {"seq_ids": self.seq_ids, "num_seqs": int(self.seq_ids.max()) + 1}


@dataclass
class ModuleCase:
    """Inputs of one module call; ``kwargs()`` builds the call keywords (fresh generator each time)."""

    name: str
    ctor: dict
    weight: Tensor
    bias: Tensor
    main: Sequences
    call: dict
    grad_inputs: List[Tensor]
    make_generator: Optional[Callable[[], torch.Generator]] = None
    extra: Dict[str, Tensor] = field(default_factory=dict)

    def kwargs(self) -> dict:
        kw = dict(self.call)
        if self.make_generator is not None:
            kw["generator"] = self.make_generator()
        return kw


def make_sequences(gen: torch.Generator, num: int, *, dtype: torch.dtype, packed: bool, vocab: int, dim: int,
                   max_len: int = 7, requires_grad: bool = True, ref_noise: float = 0.3) -> Sequences:
    """``num`` random sequences: padded rows with ignored prompt/padding positions, or packed and interleaved."""
    lengths = torch.randint(2, max_len + 1, (num,), generator=gen)
    if packed:
        n = int(lengths.sum())
        seq_ids = torch.repeat_interleave(torch.arange(num), lengths)
        seq_ids = seq_ids[torch.randperm(n, generator=gen)]  # interleaved positions
        hidden = torch.randn(n, dim, generator=gen, dtype=torch.float64)
        targets = torch.randint(0, vocab, (n,), generator=gen)
        targets[0] = -100  # one ignored position inside a sequence (every sequence has >= 2 positions)
    else:
        seq_ids = None
        hidden = torch.randn(num, max_len, dim, generator=gen, dtype=torch.float64)
        targets = torch.randint(0, vocab, (num, max_len), generator=gen)
        for s in range(num):
            start = int(torch.randint(0, max_len - int(lengths[s]) + 1, (1,), generator=gen))
            targets[s, :start] = -100  # prompt
            targets[s, start + int(lengths[s]):] = -100  # padding
    ref_hidden = hidden + ref_noise * torch.randn(hidden.shape, generator=gen, dtype=torch.float64)
    hidden = hidden.to(dtype).requires_grad_(requires_grad)
    return Sequences(hidden, targets, seq_ids, ref_hidden.to(dtype))


def make_case(name: str, dtype: torch.dtype = torch.float32, *, packed: bool = False, seed: int = 0,
              vocab: int = 300, dim: int = 32, ref: str = "hidden") -> ModuleCase:
    """Random inputs for module class ``name``; ``ref``: "hidden" (ref_hidden + own head) or "logps"."""
    gen = torch.Generator().manual_seed(seed)
    weight = (0.3 * torch.randn(vocab, dim, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(vocab, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    ref_weight = (weight.detach().double() + 0.05 * torch.randn(vocab, dim, generator=gen, dtype=torch.float64)).to(dtype)
    seq = dict(dtype=dtype, packed=packed, vocab=vocab, dim=dim)
    num = {"FusedMCPOLoss": 8, "FusedVARLoss": 4, "FusedKTOLoss": 5}.get(name, 6)
    main = make_sequences(gen, num, **seq)
    call: dict = dict(bias=bias, **main.layout())
    if name not in REFERENCE_FREE:
        if ref == "hidden":
            call.update(ref_hidden=main.ref_hidden, ref_weight=ref_weight)
        else:
            call["ref_logps"] = -5.0 - 20.0 * torch.rand(num, generator=gen, dtype=torch.float64)
    grad_inputs = [main.hidden, weight, bias]
    make_generator = None
    if name == "FusedKTOLoss":
        mismatched = make_sequences(gen, 4, requires_grad=False, **seq)
        call.update(labels=torch.tensor([True, False, True, True, False]), kl_hidden=mismatched.hidden,
                    kl_targets=mismatched.targets, kl_ref_hidden=mismatched.ref_hidden,
                    **{f"kl_{k}": v for k, v in mismatched.layout().items()})
    elif name == "FusedVARLoss":
        # Diagonal rewards with ref_hidden; cross-pair [B, B] rewards and reference log-probs otherwise.
        cross = ref == "logps"
        call["rewards"] = torch.randn(*((num, num) if cross else (num,)), generator=gen, dtype=torch.float64)
        if cross:
            call["ref_logps"] = -5.0 - 20.0 * torch.rand(num, num, generator=gen, dtype=torch.float64)
    elif name == "FusedMCPOLoss":
        make_generator = lambda: torch.Generator().manual_seed(seed + 1)  # noqa: E731
    elif name == "FusedSPOLoss":
        online = make_sequences(gen, 3, **seq)
        call.update(kl_hidden=online.hidden, kl_targets=online.targets, kl_ref_hidden=online.ref_hidden,
                    ref_weight=ref_weight, **{f"kl_{k}": v for k, v in online.layout().items()})
        grad_inputs.append(online.hidden)
    return ModuleCase(name=name, ctor=dict(CTOR[name]), weight=weight, bias=bias, main=main, call=call,
                      grad_inputs=grad_inputs, make_generator=make_generator)


def run_case(module: torch.nn.Module, case: ModuleCase) -> Tuple[Tensor, List[Tensor], dict]:
    """(loss, gradients of ``case.grad_inputs``, metrics) of one call of ``module``."""
    out = module(case.weight, case.main.hidden, case.main.targets, **case.kwargs())
    grads = torch.autograd.grad(out.loss, case.grad_inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(case.grad_inputs, grads)]
    return out.loss.detach(), [g.detach() for g in grads], out.metrics


def fused_and_reference(name: str, dtype: torch.dtype, *, packed: bool, seed: int, **case_options):
    """Run the fused module and its eager twin on the same case: ((loss, grads), (loss, grads))."""
    import fastpref
    import fastpref.reference as reference

    case = make_case(name, dtype, packed=packed, seed=seed, **case_options)
    results = []
    for cls in (getattr(fastpref, name), getattr(reference, name)):
        loss, grads, _ = run_case(cls(**case.ctor), case)
        results.append((loss, grads))
    return results


def check_modules(dtype: torch.dtype, seed: int) -> List[Tuple[str, float]]:
    """``fastpref check`` rows: (module/case, max relative error over loss and gradients) vs the eager twin."""
    from .commands.check import rel_err

    rows = []
    for i, name in enumerate(MODULE_NAMES):
        packed = bool(i % 2)  # alternate layouts: every module is checked, both layouts are exercised
        (loss, grads), (ref_loss, ref_grads) = fused_and_reference(name, dtype, packed=packed, seed=seed + i)
        err = max([rel_err(loss, ref_loss)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)])
        short = name.replace('Fused', '').replace('Loss', '')
        rows.append((f"{short}/{'pack' if packed else 'pad'}", err))
    return rows
