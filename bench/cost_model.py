"""Cost model of one forward+backward step: FLOPs and bytes moved, turned into a time at a card's published peak.

Pure functions, no torch: ``predict(impl, workload, tokens, dim, vocab, dtype, card)`` returns a
:class:`Prediction` that the GPU benchmark (``bench/gpu.py``) prints beside each measured row, so a first
measured run is read against what was expected. The model is a roofline with perfect overlap:
``time = max(flops / peak_flops, bytes / peak_bandwidth)``, where ``flops`` counts only the
``[tokens x D] x [D x V]`` products (``G = 2 * tokens * D * V`` each) and ``bytes`` is

- the operands of every product read once and its non-logits output written once (``(tokens + V) * D``
  elements per product, in the input dtype): perfect cache reuse, so this is a lower bound; plus
- the traffic over ``[tokens x V]`` logits-sized tensors that the implementation materializes, counted as
  bytes per logits element (``LOGITS_BYTES``), a rough count of the passes each one makes.

Per implementation (``logprobs``: policy only; ``dpo``: policy with gradient + a frozen reference head):

==================  ====================================  =============================================
implementation      products                              logits-sized traffic (bytes per element)
==================  ====================================  =============================================
gemm-floor          logits, dH, dW (+ ref logits)         each product reads or writes its logits
                                                          operand once: 3 e (+ e)
fastpref-triton     fwd logits (+ ref), bwd recomputed     deterministic backward: dz written once, read
                    logits, dH, dW                        by the dH and dW GEMMs: 3 e
fastpref-triton-    logits, dH, dW in the forward          fp32 logits written by cuBLAS, read by the
4gemm (DPO only)    (+ ref, fused: no logits)             statistics kernel, read and written by the
                                                          gradient kernel, cast to e, read by dH and dW:
                                                          20 + 3 e
eager               logits, dH, dW (+ ref logits)         fp32 upcast, log_softmax and its backward,
                                                          cast back: 40 + 5 e (+ 16 + 2 e)
liger               logits, dH, dW in the forward (+ ref)  chunked, compiled: 5 e (+ 2 e)
cce                 fwd logits, recomputed logits, dH, dW  none (tiles stay on chip)
trl                 fwd logits, recomputed logits, dH, dW  chunked fp32 logits: 7 * 4 (+ 2 * 4)
                    (+ ref logits)
==================  ====================================  =============================================

``e`` is the input element size. Published dense peaks (bf16/fp16 tensor cores, HBM bandwidth) are in
:data:`CARDS`; :func:`card_for` matches ``torch.cuda.get_device_name()``, and an unknown card or a dtype
without a published peak here gives a prediction of None with a note.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class Card:
    """A GPU's published peaks: dense bf16/fp16 tensor-core FLOP/s and memory bandwidth in bytes/s."""

    name: str
    half_flops: float
    bandwidth: float


#: Published peaks (dense, no sparsity): NVIDIA data sheets.
CARDS: Dict[str, Card] = {
    "H100 SXM": Card("H100 SXM", 989e12, 3.35e12),
    "H200": Card("H200", 989e12, 4.8e12),
    "A100": Card("A100", 312e12, 2.0e12),
}

#: Element sizes of the dtypes the model covers (the peaks are bf16/fp16 tensor-core peaks).
HALF_DTYPES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}

WORKLOADS = ("logprobs", "dpo")
IMPLS = ("gemm-floor", "fastpref-triton", "fastpref-triton-4gemm", "eager", "liger", "cce", "trl")


def card_for(device_name: Optional[str]) -> Optional[Card]:
    """The :data:`CARDS` entry for a ``torch.cuda.get_device_name()`` string, None if unknown.

    "H100" alone is the SXM part; the PCIe and NVL parts have other peaks and are not in the table.
    """
    name = (device_name or "").lower()
    if "h200" in name:
        return CARDS["H200"]
    if "h100" in name:
        return None if ("pcie" in name or "nvl" in name) else CARDS["H100 SXM"]
    if "a100" in name:
        return CARDS["A100"]
    return None


def _products(impl: str, workload: str) -> Tuple[int, int]:
    """(products of the policy with its gradient, reference products) for one step."""
    ref = 1 if workload == "dpo" else 0
    policy = {"gemm-floor": 3, "fastpref-triton": 4, "fastpref-triton-4gemm": 3, "eager": 3, "liger": 3, "cce": 4,
              "trl": 4}[impl]
    return policy, ref


def _logits_bytes(impl: str, workload: str, e: int) -> float:
    """Bytes moved per ``[tokens x V]`` element over logits-sized tensors (policy + reference)."""
    policy, ref = {
        "gemm-floor": (3 * e, e),
        "fastpref-triton": (3 * e, 0),
        "fastpref-triton-4gemm": (20 + 3 * e, 0),
        "eager": (40 + 5 * e, 16 + 2 * e),
        "liger": (5 * e, 2 * e),
        "cce": (0, 0),
        "trl": (7 * 4, 2 * 4),
    }[impl]
    return policy + (ref if workload == "dpo" else 0)


@dataclass(frozen=True)
class Prediction:
    """FLOPs and bytes of one step and the times they take at the card's peaks (None without a card)."""

    flops: float
    bytes: float
    card: Optional[str]
    flops_s: Optional[float]
    bytes_s: Optional[float]
    time_s: Optional[float]
    bound: Optional[str]
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def predict(impl: str, workload: str, tokens: int, dim: int, vocab: int, dtype: str,
            card: Optional[Card]) -> Prediction:
    """The cost model's FLOPs, bytes and predicted time of ``impl`` on one ``workload`` step.

    Args:
        impl: one of :data:`IMPLS`.
        workload: "logprobs" (policy only) or "dpo" (policy + frozen reference head, as many tokens).
        tokens, dim, vocab: N, D, V (per model).
        dtype: "bf16"/"fp16" (others get flops and bytes with 2-byte elements assumed, and no time).
        card: from :func:`card_for`; None gives no time.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    for name, value in (("tokens", tokens), ("dim", dim), ("vocab", vocab)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    e = HALF_DTYPES.get(dtype)
    policy, ref = _products(impl, workload)
    products = policy + ref
    flops = 2.0 * tokens * dim * vocab * products
    elem = e or 2
    nbytes = products * (tokens + vocab) * dim * elem + tokens * vocab * _logits_bytes(impl, workload, elem)
    if card is None:
        return Prediction(flops, nbytes, None, None, None, None, None, "unknown card: no prediction")
    if e is None:
        return Prediction(flops, nbytes, card.name, None, None, None, None,
                          f"no published peak for {dtype} in the model (bf16/fp16 only)")
    flops_s, bytes_s = flops / card.half_flops, nbytes / card.bandwidth
    bound = "compute" if flops_s >= bytes_s else "memory"
    return Prediction(flops, nbytes, card.name, flops_s, bytes_s, max(flops_s, bytes_s), bound)
