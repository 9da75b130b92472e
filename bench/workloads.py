"""Benchmark workloads: inputs for one shape, and one fwd+bwd callable per implementation.

Every workload uses the padded layout ``[S, T, D]`` with every position valid, ``T = N // S``, so the
reported token count is ``S * T`` (at most ``N``). Workloads and their sequence layouts (docs/api.md §3):

- ``logprobs``: the bare op, per-token log-probs of 8 sequences; loss = sum of token log-probs.
- ``dpo``: 4 chosen + 4 rejected sequences, policy and reference hidden states (separate frozen
  reference LM head), beta = 0.1.
- ``var``: B = 8 responses with scalar rewards (diagonal, self-normalized VAR), beta = 1.
- ``mcpo``: B = 2 prompts x (1 preferred + K = 4 candidates), reference hidden states, one sampled
  hard negative per prompt, beta = 0.01.
- ``spo``: 2 chosen + 2 rejected sequences plus 4 online samples whose full-vocabulary token
  KL(pi_theta || pi_ref) enters the loss (alpha = 0.01, KL coefficient 0.01).

The GEMM floor of a workload is the plain matrix products an unfused implementation needs for the
same shapes: ``H W^T`` (logits), ``G W`` (dH) and ``G^T H`` (dW) over the policy tokens, plus
``H_ref W_ref^T`` over the tokens that need reference logits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from fastpref.losses import mcpo_sample_negatives

from . import peers

WORKLOADS = ("logprobs", "dpo", "var", "mcpo", "spo")
IMPLEMENTATIONS = ("eager", "trl", "liger", "cce", "fastpref-torch", "fastpref-triton", "fastpref-torch-4gemm",
                   "fastpref-triton-4gemm")
#: The workloads whose fastpref loss is a sum of per-pair terms: ``KernelOptions(grad_in_forward=True)`` applies.
FOUR_GEMM_WORKLOADS = ("dpo",)

SEQS = {"logprobs": 8, "dpo": 8, "var": 8, "mcpo": 10, "spo": 8}
MCPO_K = 4
DPO_BETA, VAR_BETA, MCPO_BETA, SPO_ALPHA, SPO_KL_COEF = 0.1, 1.0, 0.01, 0.01, 0.01
NEGATIVE_SEED = 1234


@dataclass
class Case:
    """Inputs of one benchmark row; ``params`` are the tensors that receive gradients."""

    workload: str
    tokens: int
    dim: int
    vocab: int
    dtype: torch.dtype
    device: torch.device
    tensors: Dict[str, torch.Tensor]
    params: List[torch.Tensor]
    # The GEMM floor as (rows, kind): "policy" = logits + dH + dW products, "ref" = reference logits only.
    floor: List[Tuple[int, str]] = field(default_factory=list)

    def input_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def grad_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)

    def floor_label(self) -> str:
        return " + ".join(f"{kind}[{rows} tok]" for rows, kind in self.floor)


@dataclass
class Impl:
    """A ready-to-run implementation: ``step()`` returns the scalar loss (caller runs backward)."""

    name: str
    step: Callable[[], torch.Tensor]
    note: str = ""
    compiled: bool = False


@dataclass
class Options:
    """What the runner allows: ``compile=False`` builds Liger uncompiled and leaves CCE out; ``unavailable``
    maps a peer whose package is missing to the reason it is skipped; ``memory=False``: no memory runs."""

    compile: bool = True
    impls: Tuple[str, ...] = IMPLEMENTATIONS
    unavailable: Dict[str, str] = field(default_factory=dict)
    memory: bool = True


def build_case(workload: str, tokens: int, dim: int, vocab: int, dtype: torch.dtype, device: torch.device,
               seed: int = 0) -> Case:
    """Random inputs for one row; weights are scaled so that logits have unit-order spread."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    seqs = SEQS[workload]
    length = max(tokens // seqs, 1)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, grad=False):
        t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    def ids(*shape):
        return torch.randint(0, vocab, shape, generator=g).to(device)

    wscale = dim ** -0.5
    t: Dict[str, torch.Tensor] = {"weight": rnd(vocab, dim, scale=wscale, grad=True)}
    n = seqs * length
    if workload == "spo":
        half = seqs // 2
        t.update(hidden=rnd(half, length, dim, grad=True), targets=ids(half, length),
                 kl_hidden=rnd(half, length, dim, grad=True), kl_ref_hidden=rnd(half, length, dim),
                 kl_targets=ids(half, length), ref_weight=rnd(vocab, dim, scale=wscale))
        floor = [(n, "policy"), (half * length, "ref")]
        params = [t["weight"], t["hidden"], t["kl_hidden"]]
    else:
        t.update(hidden=rnd(seqs, length, dim, grad=True), targets=ids(seqs, length))
        floor = [(n, "policy")]
        if workload in ("dpo", "mcpo"):
            t.update(ref_hidden=rnd(seqs, length, dim), ref_weight=rnd(vocab, dim, scale=wscale))
            floor.append((n, "ref"))
        if workload == "var":
            t["rewards"] = torch.randn(seqs, generator=g).to(device)
        params = [t["weight"], t["hidden"]]
    return Case(workload, n, dim, vocab, dtype, device, t, params, floor)


# ----------------------------------------------------------------------------------------------
# eager: naive full logits (how TRL's DPOTrainer computed log-probs before its chunked LM head)


def _eager(case: Case) -> Callable[[], torch.Tensor]:
    t = case.tensors
    w = case.workload

    def ref_logps() -> torch.Tensor:
        with torch.no_grad():
            return peers.eager_seq_logps(t["ref_hidden"], t["ref_weight"], t["targets"])

    def step() -> torch.Tensor:
        if w == "logprobs":
            return peers.eager_token_logps(t["hidden"], t["weight"], t["targets"]).sum()
        if w == "dpo":
            ref = ref_logps()
            pol = peers.eager_seq_logps(t["hidden"], t["weight"], t["targets"])
            half = pol.shape[0] // 2
            return peers.dpo_head(pol[:half], pol[half:], ref[:half], ref[half:], DPO_BETA)
        if w == "var":
            return peers.var_head(peers.eager_seq_logps(t["hidden"], t["weight"], t["targets"]), t["rewards"], VAR_BETA)
        if w == "mcpo":
            ref = ref_logps().view(-1, MCPO_K + 1)
            pol = peers.eager_seq_logps(t["hidden"], t["weight"], t["targets"]).view(-1, MCPO_K + 1)
            # fastpref's sampler with the same seed as the fused module: both back-propagate the same negatives.
            generator = torch.Generator(device=case.device).manual_seed(NEGATIVE_SEED)
            neg = mcpo_sample_negatives(pol, ref, beta=MCPO_BETA, generator=generator)
            return peers.mcpo_head(pol, ref, neg, MCPO_BETA)
        # spo
        kl = peers.eager_seq_kl(t["kl_hidden"], t["kl_ref_hidden"], t["weight"], t["ref_weight"], t["kl_targets"])
        pol = peers.eager_seq_logps(t["hidden"], t["weight"], t["targets"])
        half = pol.shape[0] // 2
        return peers.spo_head(pol[:half], pol[half:], kl, SPO_ALPHA, SPO_KL_COEF)

    return step


# ----------------------------------------------------------------------------------------------
# trl: TRL 1.16's chunked LM-head kernels, policy first, then the reference under no_grad (DPOTrainer's order)


def _trl(case: Case) -> Callable[[], torch.Tensor]:
    t = case.tensors
    w = case.workload
    token_logps = peers.trl_token_logps_fn()
    seq_kl = peers.trl_seq_kl_fn() if w == "spo" else None

    def seq_logps(hidden, weight, targets, outputs=peers.TRL_LOGPROBS_ONLY) -> torch.Tensor:
        return token_logps(hidden, weight, targets, outputs).sum(dim=-1)

    def ref_logps() -> torch.Tensor:
        with torch.no_grad():
            return seq_logps(t["ref_hidden"], t["ref_weight"], t["targets"])

    def step() -> torch.Tensor:
        if w == "logprobs":
            return token_logps(t["hidden"], t["weight"], t["targets"]).sum()
        if w == "dpo":
            pol = seq_logps(t["hidden"], t["weight"], t["targets"], peers.TRL_DPO_POLICY_OUTPUTS)
            ref = ref_logps()
            half = pol.shape[0] // 2
            return peers.dpo_head(pol[:half], pol[half:], ref[:half], ref[half:], DPO_BETA)
        if w == "var":
            return peers.var_head(seq_logps(t["hidden"], t["weight"], t["targets"]), t["rewards"], VAR_BETA)
        if w == "mcpo":
            pol = seq_logps(t["hidden"], t["weight"], t["targets"]).view(-1, MCPO_K + 1)
            ref = ref_logps().view(-1, MCPO_K + 1)
            generator = torch.Generator(device=case.device).manual_seed(NEGATIVE_SEED)
            neg = mcpo_sample_negatives(pol, ref, beta=MCPO_BETA, generator=generator)
            return peers.mcpo_head(pol, ref, neg, MCPO_BETA)
        # spo
        pol = seq_logps(t["hidden"], t["weight"], t["targets"])
        kl = seq_kl(t["kl_hidden"], t["kl_ref_hidden"], t["weight"], t["ref_weight"], t["kl_targets"])
        half = pol.shape[0] // 2
        return peers.spo_head(pol[:half], pol[half:], kl, SPO_ALPHA, SPO_KL_COEF)

    return step


# ----------------------------------------------------------------------------------------------
# fastpref: the fused modules of docs/api.md §3 (the bare op for ``logprobs``)

_MODULES = {"dpo": "FusedDPOLoss", "var": "FusedVARLoss", "mcpo": "FusedMCPOLoss", "spo": "FusedSPOLoss"}


def _fastpref(case: Case, backend: str, grad_in_forward: bool = False) -> Callable[[], torch.Tensor]:
    """The fused module's step; ``grad_in_forward``: dH/dW formed in the forward (four GEMMs, separable losses)."""
    import fastpref

    t = case.tensors
    w = case.workload
    if w == "logprobs":
        return lambda: fastpref.fused_logprobs(t["hidden"], t["weight"], t["targets"], backend=backend).token_logps.sum()

    kwargs = {"dpo": dict(beta=DPO_BETA), "var": dict(beta=VAR_BETA),
              "mcpo": dict(beta=MCPO_BETA, group_size=MCPO_K + 1), "spo": dict(alpha=SPO_ALPHA, kl_coef=SPO_KL_COEF)}[w]
    options = fastpref.KernelOptions(grad_in_forward=True) if grad_in_forward else None
    module = getattr(fastpref, _MODULES[w])(**kwargs, backend=backend, kernel_options=options)
    if w == "var":
        return lambda: module(t["weight"], t["hidden"], t["targets"], rewards=t["rewards"]).loss
    if w == "spo":
        return lambda: module(t["weight"], t["hidden"], t["targets"], ref_weight=t["ref_weight"],
                              kl_hidden=t["kl_hidden"], kl_ref_hidden=t["kl_ref_hidden"],
                              kl_targets=t["kl_targets"]).loss
    if w == "mcpo":
        # Same negatives every step (a fresh generator per call), as the eager peer does.
        def step() -> torch.Tensor:
            module.generator = torch.Generator(device=case.device).manual_seed(NEGATIVE_SEED)
            return module(t["weight"], t["hidden"], t["targets"], ref_hidden=t["ref_hidden"],
                          ref_weight=t["ref_weight"]).loss
        return step
    return lambda: module(t["weight"], t["hidden"], t["targets"], ref_hidden=t["ref_hidden"],
                          ref_weight=t["ref_weight"]).loss


# ----------------------------------------------------------------------------------------------


def implementations(case: Case, opts: Options) -> Tuple[List[Impl], Dict[str, str]]:
    """The implementations that run for ``case`` and, for the others, why not."""
    t = case.tensors
    cuda = case.device.type == "cuda"
    ready: List[Impl] = []
    skipped: Dict[str, str] = {}
    for name in opts.impls:
        if name in opts.unavailable:
            skipped[name] = opts.unavailable[name]
        elif name == "eager":
            ready.append(Impl(name, _eager(case), note="naive full logits"))
        elif name == "trl":
            try:
                step = _trl(case)
            except ImportError as exc:
                skipped[name] = f"trl not importable ({exc}): {peers.install_hint('trl')}"
                continue
            ready.append(Impl(name, step, note="trl.kernels.ChunkedLogProbFunction"
                              + (" + ChunkedDivergenceFunction" if case.workload == "spo" else "")))
        elif name == "liger":
            if case.workload != "dpo":
                skipped[name] = "no Liger chunked loss for this workload"
                continue
            try:
                run = peers.liger_dpo(DPO_BETA, compiled=opts.compile)
            except ImportError as exc:  # installed but broken: skipped like a missing package
                skipped[name] = f"liger_kernel not importable ({exc}): {peers.install_hint('liger_kernel')}"
                continue
            ready.append(Impl(name, lambda run=run: run(t["weight"], t["hidden"], t["targets"], t["ref_hidden"],
                                                         t["ref_weight"]),
                              note="" if opts.compile else "compiled=False (--no-compile)", compiled=opts.compile))
        elif name == "cce":
            if case.workload != "logprobs":
                skipped[name] = "CCE computes per-token log-probs only"
                continue
            if not opts.compile and not cuda:
                skipped[name] = "CCE on CPU is torch.compile only (--no-compile)"
                continue
            try:
                run, impl = peers.cce_token_logps(case.device)
            except ImportError as exc:
                skipped[name] = f"cut_cross_entropy not importable ({exc}): {peers.install_hint('cut_cross_entropy')}"
                continue
            ready.append(Impl(name, lambda run=run: run(t["hidden"], t["weight"], t["targets"]).sum(),
                              note=f"impl={impl}", compiled=impl == "torch_compile"))
        elif name == "fastpref-torch":
            ready.append(Impl(name, _fastpref(case, "torch")))
        elif name == "fastpref-triton":
            if not cuda:
                skipped[name] = "needs CUDA"
                continue
            ready.append(Impl(name, _fastpref(case, "triton")))
        elif name in ("fastpref-torch-4gemm", "fastpref-triton-4gemm"):
            backend = name.split("-")[1]
            if backend == "triton" and not cuda:
                skipped[name] = "needs CUDA"
            elif case.workload not in FOUR_GEMM_WORKLOADS:
                skipped[name] = "the loss couples the batch or is the bare op: no in-forward gradients"
            else:
                ready.append(Impl(name, _fastpref(case, backend, grad_in_forward=True),
                                  note="KernelOptions(grad_in_forward=True): dH, dW formed in the forward"))
        else:
            raise ValueError(f"unknown implementation {name!r}; choose from {IMPLEMENTATIONS}")
    return ready, skipped


class GemmFloor:
    """The plain matrix products of ``case`` with preallocated outputs (the unfused lower bound)."""

    def __init__(self, case: Case, seed: int = 1):
        d, v, dt, dev = case.dim, case.vocab, case.dtype, case.device
        g = torch.Generator(device=dev).manual_seed(seed)  # drawn on the device: a GPU row's [N x V] in no time
        rows = max(r for r, _ in case.floor)
        self.h = torch.randn(rows, d, generator=g, device=dev).to(dt)
        self.w = torch.randn(v, d, generator=g, device=dev).to(dt)
        self.grad_logits = torch.randn(rows, v, generator=g, device=dev).to(dt)
        self.logits = torch.empty(rows, v, device=dev, dtype=dt)
        self.dh = torch.empty(rows, d, device=dev, dtype=dt)
        self.dw = torch.empty(v, d, device=dev, dtype=dt)
        self.plan = case.floor

    def step(self) -> None:
        for rows, kind in self.plan:
            torch.mm(self.h[:rows], self.w.t(), out=self.logits[:rows])
            if kind == "policy":
                torch.mm(self.grad_logits[:rows], self.w, out=self.dh[:rows])
                torch.mm(self.grad_logits[:rows].t(), self.h[:rows], out=self.dw)


def fmt_dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "").replace("float32", "fp32").replace("bfloat16", "bf16")


def parse_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp64": torch.float64, "float64": torch.float64}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def release(tensors: Optional[List[torch.Tensor]]) -> None:
    """Drop accumulated gradients (so each measured step allocates its own)."""
    for p in tensors or []:
        p.grad = None
