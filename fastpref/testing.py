"""Test helpers: case builders, the error metric and the ``fastpref check`` suites.

Imported by the tests and the CLI (``fastpref check``) only, never by the library: ``import fastpref``
does not load this module.

- :func:`rel_err`: the one error metric of every parity check.
- Core op: :func:`make_core_case` builds the inputs and upstream gradients of one
  :func:`fastpref.fused_logprobs` call (:class:`CoreCase`); :func:`run_core` runs an op on a case and
  returns its outputs and gradients; :func:`check_core` is the ``fastpref check`` suite of one backend.
- Loss modules: :func:`make_sequences` and :func:`make_case` build inputs for the classes of
  :data:`fastpref.modules.LOSS_MODULES`; :func:`run_case` runs a module (fused or its eager twin);
  :func:`check_modules` is the ``fastpref check`` suite (each module against its eager twin).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import fastpref
import fastpref.reference as reference
from fastpref.modules import LOSS_MODULES

Tensor = torch.Tensor
#: One ``fastpref check`` row: (case name, max relative error).
Row = Tuple[str, float]


def rel_err(a: Tensor, b: Tensor, *, floor: float = 0.0) -> float:
    """``max |a - b| / max(max |b|, floor)`` in float64: one scale-free number per tensor pair.

    ``b`` is the reference. With the default ``floor=0`` the error is relative to the largest ``|b|``,
    and absolute when ``b`` is all zero. A positive ``floor`` makes it absolute below ``floor``: for
    random problems, whose tiny results (a lone log-prob or KL near 0, the gradient of a saturated
    softmax) are differences of O(1) terms with an absolute round-off. Empty tensors give 0; a NaN in
    either gives NaN, which fails every ``err < tol`` check.
    """
    if b.numel() == 0:
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    diff = (a - b).abs().max().item()
    scale = max(b.abs().max().item(), floor)
    return diff / scale if scale > 0 else diff


# ----------------------------------------------------------------------------------------- core op

#: Outputs that get random upstream gradients (where the op returns them).
UPSTREAM = ("logps", "token_logps", "kl", "token_kl")
#: Outputs of :class:`fastpref.LogprobStats` that :func:`run_core` returns (where not None).
OUTPUTS = ("logps", "lengths", "token_logps", "ref_logps", "kl", "token_kl", "ref_token_logps")


@dataclass
class CoreCase:
    """Inputs of one ``fused_logprobs(hidden, weight, targets, **kwargs)`` call and its upstream gradients.

    ``kwargs`` holds the keywords (bias, seq_ids, num_seqs, ref_hidden, ref_weight, ref_bias, kl,
    temperature, softcap) the case sets; ``upstream`` maps output names (of :data:`UPSTREAM`) to the
    float64 gradient applied to that output.
    """

    hidden: Tensor
    weight: Tensor
    targets: Tensor
    kwargs: Dict[str, Any]
    upstream: Dict[str, Tensor] = field(default_factory=dict)

    @property
    def inputs(self) -> Tuple[Tensor, Tensor, Tensor]:
        """(hidden, weight, targets)."""
        return self.hidden, self.weight, self.targets

    def to(self, dtype: Optional[torch.dtype] = None, device: Any = None) -> "CoreCase":
        """A copy with the floating-point inputs cast to ``dtype`` and every tensor moved to ``device``."""
        def conv(v: Any) -> Any:
            if not isinstance(v, Tensor):
                return v
            return v.to(device=device, dtype=dtype if v.is_floating_point() else None)

        return CoreCase(conv(self.hidden), conv(self.weight), conv(self.targets),
                        {k: conv(v) for k, v in self.kwargs.items()},
                        {k: v.to(device=device) for k, v in self.upstream.items()})


def random_upstream(targets: Tensor, seq_ids: Optional[Tensor], gen: torch.Generator, *,
                    grads_on: Sequence[str] = UPSTREAM, zero_grad_seq: Optional[int] = None) -> Dict[str, Tensor]:
    """Random float64 upstream gradients (CPU) of the outputs named in ``grads_on``.

    Per-sequence outputs get ``[num_seqs]``, per-position ones the shape of ``targets``; every gradient
    of sequence ``zero_grad_seq`` is zero (e.g. an MC-PO candidate that was not sampled).
    """
    targets = targets.cpu()
    num_seqs = targets.shape[0] if seq_ids is None else int(seq_ids.max()) + 1
    up = {}
    for name in UPSTREAM:  # always all four draws: the values do not depend on grads_on
        shape = (num_seqs,) if name in ("logps", "kl") else tuple(targets.shape)
        up[name] = torch.randn(shape, generator=gen, dtype=torch.float64)
    if zero_grad_seq is not None:
        seq_of_position = torch.arange(num_seqs)[:, None].expand(targets.shape) if seq_ids is None else seq_ids.cpu()
        for name in up:
            owner = torch.arange(num_seqs) if name in ("logps", "kl") else seq_of_position
            up[name] = up[name].masked_fill(owner == zero_grad_seq, 0.0)
    return {k: v for k, v in up.items() if k in grads_on}


def make_core_case(dtype: torch.dtype = torch.float64, seed: int = 0, *, layout: str = "padded", S: int = 3,
                   T: int = 11, lengths: Sequence[int] = (7, 1, 13, 4), interleave: bool = True, D: int = 24,
                   V: int = 517, weight_scale: Optional[float] = None, ignore: float = 0.15,
                   ignore_seq: Optional[int] = None, bias: bool = False, ref: Optional[str] = None,
                   D_ref: Optional[int] = None, kl: Optional[str] = None, temperature: Optional[float] = None,
                   softcap: Optional[float] = None, grads_on: Sequence[str] = UPSTREAM,
                   zero_grad_seq: Optional[int] = None, device: Any = "cpu") -> CoreCase:
    """Random inputs of one ``fused_logprobs`` case, drawn in float64 on the CPU from ``seed``, then cast and moved.

    Args:
        layout: "padded" (``[S, T]`` rows) or "packed" (sequences of ``lengths`` flattened to ``[N]`` with
            ``seq_ids``; positions shuffled across sequences when ``interleave``).
        D, V: hidden width and vocabulary size.
        weight_scale: standard deviation of the LM-head entries (default ``2 / sqrt(D)``: logits of O(1)).
        ignore: fraction of positions set to -100 at random; ``ignore_seq``: a sequence with every
            position ignored.
        bias: an LM-head bias (and a reference bias when the reference head is separate).
        ref: None; "shared" (``ref_hidden`` read through the policy head); or "separate" (own
            ``ref_weight`` of width ``D_ref``, default ``D``). The reference is a perturbation of the
            policy where the widths match, independent otherwise.
        kl: None, "forward" or "reverse" (needs ``ref``).
        temperature, softcap: passed to the op only when set.
        grads_on, zero_grad_seq: see :func:`random_upstream`.
        dtype, device: of the returned tensors (integer tensors keep their dtype).
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    if layout == "padded":
        shape, seq_ids = (S, T), None
    elif layout == "packed":
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(list(lengths)))
        seq_ids = ids[torch.randperm(ids.numel(), generator=g)] if interleave else ids
        shape = (ids.numel(),)
    else:
        raise ValueError(f"layout must be 'padded' or 'packed', got {layout!r}")
    targets = torch.randint(0, V, shape, generator=g)
    targets[torch.rand(shape, generator=g) < ignore] = -100
    if ignore_seq is not None:
        targets[ignore_seq if seq_ids is None else seq_ids == ignore_seq] = -100
    scale = 2 * D ** -0.5 if weight_scale is None else weight_scale
    hidden, weight = randn(*shape, D), randn(V, D, scale=scale)
    kwargs: Dict[str, Any] = {} if seq_ids is None else dict(seq_ids=seq_ids, num_seqs=len(lengths))
    if bias:
        kwargs["bias"] = randn(V, scale=0.5)
    if ref is not None:
        width = D if ref == "shared" else (D_ref or D)
        kwargs["ref_hidden"] = hidden + randn(*shape, D, scale=0.5) if width == D else randn(*shape, width)
        if ref == "separate":
            kwargs["ref_weight"] = (weight + randn(V, D, scale=0.25 * scale) if width == D
                                    else randn(V, width, scale=2 * width ** -0.5))
            if bias:
                kwargs["ref_bias"] = randn(V, scale=0.5)
    options = dict(kl=kl, temperature=temperature, softcap=softcap)
    kwargs.update({k: v for k, v in options.items() if v is not None})
    upstream = random_upstream(targets, seq_ids, g, grads_on=grads_on, zero_grad_seq=zero_grad_seq)
    return CoreCase(hidden, weight, targets, kwargs, upstream).to(dtype, device)


def core_leaves(case: "CoreCase") -> Tuple[Dict[str, Tensor], dict]:
    """Fresh grad-requiring copies of ``case``'s hidden, weight and (when given) bias, and the call keywords with
    that bias in place: the leaves a parity run differentiates."""
    kwargs = dict(case.kwargs)
    leaves = {"hidden": case.hidden, "weight": case.weight}
    if kwargs.get("bias") is not None:
        leaves["bias"] = kwargs["bias"]
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    if "bias" in leaves:
        kwargs["bias"] = leaves["bias"]
    return leaves, kwargs


def run_core(fn: Callable[..., Any], case: CoreCase, **extra: Any) -> Dict[str, Tensor]:
    """Run ``fn`` (``fused_logprobs`` or its eager twin) on ``case`` and backpropagate ``case.upstream``.

    Returns the outputs that are not None (names of :data:`OUTPUTS`, detached, in the op's dtypes),
    then the gradients ``d_hidden``, ``d_weight`` and, with a bias, ``d_bias`` (in the input dtype).
    ``extra`` keywords (e.g. ``backend``) go to ``fn``.
    """
    leaves, kwargs = core_leaves(case)
    stats = fn(leaves["hidden"], leaves["weight"], case.targets, **kwargs, **extra)
    out = {k: getattr(stats, k).detach() for k in OUTPUTS if getattr(stats, k) is not None}
    terms = [(getattr(stats, k).double() * up.to(stats.logps.device)).sum()
             for k, up in case.upstream.items() if getattr(stats, k) is not None]
    grads = torch.autograd.grad(sum(terms), list(leaves.values()), allow_unused=True)
    for (name, leaf), grad in zip(leaves.items(), grads):
        out["d_" + name] = torch.zeros_like(leaf) if grad is None else grad
    return out


#: The ``fastpref check`` cases of the core op: name -> :func:`make_core_case` options.
CHECK_CASES: Dict[str, dict] = {
    "padded": dict(ignore_seq=3),
    "softcap": dict(ignore_seq=3, temperature=0.7, softcap=5.0),
    "kl_forward": dict(ignore_seq=3, ref="separate", kl="forward"),
    "kl_reverse": dict(ignore_seq=3, ref="separate", kl="reverse"),
    "packed": dict(layout="packed", lengths=(5, 1, 12, 3), interleave=False, ref="separate", kl="forward"),
}
_CHECK_SHAPE = dict(S=4, T=9, D=32, V=1000, bias=True)


def check_core(backend: str, dtype: torch.dtype, seed: int) -> List[Row]:
    """``fastpref check`` rows of one backend: (case, max :func:`rel_err` over outputs and gradients) of
    ``fastpref.fused_logprobs(backend=backend)`` vs the eager reference on :data:`CHECK_CASES`."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    rows = []
    for i, (name, spec) in enumerate(CHECK_CASES.items()):
        case = make_core_case(dtype, seed + i, device=device, **_CHECK_SHAPE, **spec)
        fused = run_core(fastpref.fused_logprobs, case, backend=backend)
        eager = run_core(reference.fused_logprobs, case)
        same_outputs = set(fused) == set(eager)
        rows.append((name, max(rel_err(fused[k], eager[k]) for k in eager) if same_outputs else float("inf")))
    return rows


# ----------------------------------------------------------------------------------------- loss modules

#: Class names of the loss modules, in the registry's order.
MODULE_NAMES: List[str] = list(LOSS_MODULES)

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

#: Modules that take no reference model.
REFERENCE_FREE = {"FusedSimPOLoss", "FusedSLiCLoss", "FusedORPOLoss", "FusedCPOLoss", "FusedSPOLoss"}


@dataclass
class Sequences:
    """Random sequences: ``hidden`` [S, T, D] (padded) or [N, D] (packed, with ``seq_ids``), a leaf."""

    hidden: Tensor
    targets: Tensor
    seq_ids: Optional[Tensor]
    ref_hidden: Tensor

    def layout(self) -> dict:
        """The layout keywords of a module call: {} (padded) or seq_ids and num_seqs (packed)."""
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
        """The call keywords (everything but weight, hidden and targets)."""
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
    noise = 0.05 * torch.randn(vocab, dim, generator=gen, dtype=torch.float64)
    ref_weight = (weight.detach().double() + noise).to(dtype)
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


def fused_and_reference(name: str, dtype: torch.dtype, *, packed: bool, seed: int,
                        **case_options: Any) -> List[Tuple[Tensor, List[Tensor]]]:
    """Run the fused module and its eager twin on the same case: [(loss, grads), (loss, grads)]."""
    case = make_case(name, dtype, packed=packed, seed=seed, **case_options)
    results = []
    for cls in (getattr(fastpref, name), getattr(reference, name)):
        loss, grads, _ = run_case(cls(**case.ctor), case)
        results.append((loss, grads))
    return results


def check_modules(dtype: torch.dtype, seed: int) -> List[Row]:
    """``fastpref check`` rows: (module/layout, max :func:`rel_err` over loss and gradients) vs the eager twin."""
    rows = []
    for i, name in enumerate(MODULE_NAMES):
        packed = bool(i % 2)  # alternate layouts: every module is checked, both layouts are exercised
        (loss, grads), (ref_loss, ref_grads) = fused_and_reference(name, dtype, packed=packed, seed=seed + i)
        err = max([rel_err(loss, ref_loss)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)])
        short = name.replace("Fused", "").replace("Loss", "")
        rows.append((f"{short}/{'pack' if packed else 'pad'}", err))
    return rows
