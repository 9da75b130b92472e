"""Cases of the device check: shapes, inputs, the fp64 truth and the eager-error rule.

Every parity row draws one ``fastpref.testing.make_core_case`` in float64 on the device, casts it to the
row's dtype, and compares three runs against the **truth**: the eager reference
(``fastpref.reference.fused_logprobs``) in float64 on exactly the cast inputs. The **rule**: for every
output and gradient, the fused error (``fastpref.testing.rel_err`` vs the truth) is at most the eager
reference's own error in the row's precision plus :data:`SLACK`. fp32 rows get the same rule (eager fp32
is then within ~1e-6 of the truth, so the slack is the bound).

Shapes (:data:`SHAPES`): ``cuda`` holds realistic sizes (2-4k positions, D = 1-4k, V = 32k-128k, most
vocabularies not a multiple of any block, N not a multiple of any block); ``tiny`` the same structure
at interpreter sizes (N = 24, D = 32, V = 200-300) for the CPU smoke.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch

import fastpref.reference as reference
from fastpref.testing import OUTPUTS, CoreCase, make_core_case, rel_err

Tensor = torch.Tensor
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Allowed excess of the fused error over the eager error in the row's precision ("tf32": fp32 with TF32 on).
SLACK = {"bf16": 1e-3, "fp16": 1e-3, "fp32": 1e-4, "tf32": 1e-3}

_TINY_PACKED = dict(layout="packed", lengths=(7, 1, 9, 7), D=32, D_ref=40, V=200)
_TINY_PADDED = dict(layout="padded", S=4, T=6, D=32, V=200, ignore_seq=1)
#: name -> make_core_case shape options, per scale.
SHAPES: Dict[str, Dict[str, dict]] = {
    "cuda": {
        "sweep": dict(layout="packed", lengths=(700, 1, 512, 840), D=2048, D_ref=1536, V=32011),  # N=2053
        "medium": dict(layout="packed", lengths=(700, 1, 512, 840), D=1024, V=32011),
        "long": dict(layout="packed", lengths=(1500, 1, 1300, 1295), D=1024, V=32011),  # N=4096
        "wide": dict(layout="padded", S=4, T=512, D=2048, V=50257, ignore_seq=1),
        "large_vocab": dict(layout="padded", S=4, T=512, D=4096, V=128256, ignore_seq=1),
    },
    "tiny": {
        "sweep": _TINY_PACKED,
        "medium": dict(_TINY_PACKED, D_ref=32),
        "long": dict(_TINY_PACKED, D_ref=32, V=300),
        "wide": _TINY_PADDED,
        "large_vocab": dict(_TINY_PADDED, V=300),
    },
}


@dataclass(frozen=True)
class Spec:
    """One parity row: ``case`` options on top of a named shape, a dtype and the precision settings."""

    name: str
    dtype: str  # "bf16", "fp16", "fp32"
    shape: str
    case: Dict[str, Any]
    tf32: bool = False  # fp32 with torch.backends.cuda.matmul.fp32_precision = "tf32"
    ref_dtype: Optional[str] = None  # a reference head in another dtype than the policy's
    bias_view: Optional[str] = None  # "strided" (randn(2V)[::2]) or "expanded" (randn(1).expand(V))

    @property
    def precision(self) -> str:
        """The column of :data:`SLACK` (and of the kernels' config tables, "half" aside)."""
        return "tf32" if self.dtype == "fp32" and self.tf32 else self.dtype


_KL_SEPARATE = dict(bias=True, ref="separate", kl="forward", softcap=30.0)
#: The config sweep: one case per precision column of the tables (most code paths at once).
SWEEP: Dict[str, Spec] = {
    "half": Spec("sweep_half", "bf16", "sweep", _KL_SEPARATE),
    "fp32": Spec("sweep_fp32", "fp32", "sweep", _KL_SEPARATE),
    "tf32": Spec("sweep_tf32", "fp32", "sweep", _KL_SEPARATE, tf32=True),
}
PARITY = [
    Spec("bf16_kl_forward_large_vocab", "bf16", "large_vocab", dict(ref="separate", kl="forward")),
    Spec("bf16_packed_softcap_temperature", "bf16", "long", dict(bias=True, temperature=0.7, softcap=30.0)),
    Spec("fp16_kl_reverse_shared_head", "fp16", "wide", dict(bias=True, ref="shared", kl="reverse")),
    Spec("fp32_kl_reverse_separate_head", "fp32", "medium", dict(ref="separate", kl="reverse")),
]
BIAS = [
    Spec("bias_strided_bf16", "bf16", "medium", dict(bias=True, ref="separate", kl="forward"), bias_view="strided"),
    Spec("bias_strided_fp32", "fp32", "medium", dict(bias=True, ref="separate"), bias_view="strided"),
    Spec("bias_expanded_bf16", "bf16", "medium", dict(bias=True, ref="shared", kl="reverse"), bias_view="expanded"),
]
PRECISION = [
    Spec("fp32_tf32_off", "fp32", "medium", dict(bias=True, ref="separate", kl="forward")),
    Spec("fp32_tf32_on", "fp32", "medium", dict(bias=True, ref="separate", kl="forward"), tf32=True),
    Spec("bf16_policy_fp32_ref_head", "bf16", "medium", dict(ref="separate", kl="forward"), ref_dtype="fp32"),
]


@contextlib.contextmanager
def matmul_precision(tf32: bool) -> Iterator[None]:
    """fp32 matmuls in TF32 (``tf32=True``) or IEEE for the block, through the API transformers uses
    (``torch.backends.cuda.matmul.fp32_precision``); the previous setting is restored."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        before = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = before
    else:  # torch < 2.9: the legacy flag
        before = matmul.allow_tf32
        matmul.allow_tf32 = tf32
        try:
            yield
        finally:
            matmul.allow_tf32 = before


def build(spec: Spec, scale: str, seed: int, device: Any) -> Tuple[CoreCase, CoreCase]:
    """(case in the row's dtypes, the same inputs upcast exactly to float64)."""
    options = dict(SHAPES[scale][spec.shape], **spec.case)
    if options.get("ref") != "separate":
        options.pop("D_ref", None)
    case64 = make_core_case(torch.float64, seed, device=device, **options)
    low = case64.to(DTYPES[spec.dtype])
    if spec.ref_dtype is not None:
        for key in ("ref_hidden", "ref_weight", "ref_bias"):
            if key in case64.kwargs:
                low.kwargs[key] = case64.kwargs[key].to(DTYPES[spec.ref_dtype])
    return low, low.to(torch.float64)


def _bias_leaf(bias: Tensor, view: Optional[str]) -> Tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
    """(leaf, the bias argument built from it, grad of the leaf -> the reported d_bias)."""
    if view is None:
        leaf = bias.detach().clone().requires_grad_()
        return leaf, leaf, lambda g: g
    if view == "strided":
        base = torch.full((2 * bias.numel(),), 1e4, dtype=bias.dtype, device=bias.device)  # odd slots: poison
        base[::2] = bias.detach()
        leaf = base.requires_grad_()
        return leaf, leaf[::2], lambda g: g[::2]
    if view == "expanded":
        leaf = bias.detach()[:1].clone().requires_grad_()
        return leaf, leaf.expand(bias.numel()), lambda g: g
    raise ValueError(f"bias_view must be None, 'strided' or 'expanded', got {view!r}")


def run(fn: Callable[..., Any], case: CoreCase, *, bias_view: Optional[str] = None, **extra: Any) -> Dict[str, Tensor]:
    """Outputs and gradients of ``fn`` on ``case`` with its random upstream gradients applied (as
    ``fastpref.testing.run_core``), passing the bias (and the reference bias) as ``bias_view`` views."""
    kwargs = dict(case.kwargs)
    leaves = {"hidden": case.hidden.detach().clone().requires_grad_(),
              "weight": case.weight.detach().clone().requires_grad_()}
    pick = None
    if kwargs.get("bias") is not None:
        leaves["bias"], kwargs["bias"], pick = _bias_leaf(kwargs["bias"], bias_view)
    if bias_view is not None and kwargs.get("ref_bias") is not None:
        kwargs["ref_bias"] = _bias_leaf(kwargs["ref_bias"], bias_view)[1].detach()
    stats = fn(leaves["hidden"], leaves["weight"], case.targets, **kwargs, **extra)
    out = {k: getattr(stats, k).detach() for k in OUTPUTS if getattr(stats, k) is not None}
    terms = [(getattr(stats, k).double() * up.to(stats.logps.device)).sum()
             for k, up in case.upstream.items() if getattr(stats, k) is not None]
    grads = torch.autograd.grad(sum(terms), list(leaves.values()), allow_unused=True)
    for (name, leaf), grad in zip(leaves.items(), grads):
        grad = torch.zeros_like(leaf) if grad is None else grad
        if name == "bias" and bias_view == "strided":
            out["bias_gaps"] = grad[1::2]  # the odd slots are not part of the bias: zero gradient
        out["d_" + name] = pick(grad) if name == "bias" else grad
    return out


def errors(result: Dict[str, Tensor], truth: Dict[str, Tensor]) -> Dict[str, float]:
    """rel_err of every output and gradient against the truth (inf for a missing key)."""
    errs = {k: (rel_err(result[k], truth[k]) if k in result else float("inf")) for k in truth if k != "bias_gaps"}
    if "bias_gaps" in result:
        errs["bias_gaps"] = float(result["bias_gaps"].abs().max()) if result["bias_gaps"].numel() else 0.0
    return errs


def eager(case: CoreCase, bias_view: Optional[str]) -> Dict[str, Tensor]:
    """The eager reference on ``case`` (the truth when ``case`` is float64)."""
    return run(reference.fused_logprobs, case, bias_view=bias_view)


def judge(fused: Dict[str, float], eager_errs: Dict[str, float], precision: str) -> Tuple[bool, str, float, float]:
    """The eager-error rule: (passed, worst key, its fused error, its eager error)."""
    slack = SLACK[precision]
    worst, margin = "", -float("inf")
    for key, err in fused.items():
        base = 0.0 if key == "bias_gaps" else eager_errs.get(key, 0.0)
        excess = err - base if err == err else float("inf")  # NaN is the worst
        if excess > margin:
            worst, margin = key, excess
    passed = margin <= slack
    if passed and margin <= 0 and fused:  # fused no worse than eager anywhere: show its largest error
        worst = max(fused, key=lambda k: fused[k])
    return passed, worst, fused.get(worst, float("nan")), eager_errs.get(worst, 0.0)
