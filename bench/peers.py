"""The implementations fastpref is compared with: eager PyTorch, TRL's chunked log-prob op, Liger-Kernel
and Cut Cross-Entropy.

``eager`` is the naive full-logits computation: the LM head produces the full ``[tokens x V]`` logits,
``log_softmax`` over the vocabulary, ``gather`` of the target column, a masked sum per sequence, and the
loss on top; the reference model's log-probs come from a separate no-grad pass that runs first (so its
logits are freed before the policy's exist; the cheaper order for peak memory). This is how TRL's
``DPOTrainer`` computed log-probs before it moved to a chunked LM head (the 0.x releases gathered from
``log_softmax`` of the model's full logits).

``trl`` is what the pinned TRL release (1.16) does: ``DPOTrainer`` patches the model with a fused LM head
that calls ``trl.kernels.ChunkedLogProbFunction`` (``[4096 x 32768]`` logits tiles, online log-sum-exp,
recomputed in the backward); the policy runs first, asking for the entropy, mean logit and top-1 outputs
its metrics use, then the reference under ``torch.no_grad()`` with log-probs only. SPO's token KL uses
TRL's ``ChunkedDivergenceFunction`` (``beta=1``: KL(student || teacher)).

The small loss heads below are written from docs/losses.md for the eager peer (independently of
``fastpref.losses``, so the comparison also cross-checks the formulas).
"""
from __future__ import annotations

import importlib.util
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# ----------------------------------------------------------------------------------------------
# Optional dependencies (pyproject.toml's extras): none is needed by ``import fastpref``, so a plain
# ``pip install fastpref`` lacks them all; the bench checks for them up front and runs without them.

# module -> the pip extra that installs it
OPTIONAL_MODULES: Dict[str, str] = {
    "memray": "bench", "matplotlib": "bench", "rich": "bench", "liger_kernel": "bench",
    "cut_cross_entropy": "bench", "trl": "trl", "transformers": "trl",
}
# peer implementation -> the modules it imports (TRL's kernels import transformers)
PEER_MODULES: Dict[str, Tuple[str, ...]] = {
    "trl": ("trl", "transformers"), "liger": ("liger_kernel",), "cce": ("cut_cross_entropy",),
}


def is_installed(module: str) -> bool:
    """Whether ``module`` can be found, without importing it (``importlib.util.find_spec``; a module set to
    None in ``sys.modules`` counts as missing, as ``import`` would fail on it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails, or a module without a spec
        return False


def install_hint(module: str) -> str:
    """The pip command that installs ``module`` with fastpref (its extra in pyproject.toml)."""
    return f'pip install "fastpref[{OPTIONAL_MODULES[module]}]"'


# ----------------------------------------------------------------------------------------------
# Eager per-token statistics (materialize the logits)


def eager_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[target] per position, 0 at ignored positions (fp32 math)."""
    logits = (hidden @ weight.t()).float()
    logp = logits.log_softmax(dim=-1)
    valid = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * valid


def eager_seq_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed log-probs per sequence for padded ``[S, T, D]`` hidden states."""
    return eager_token_logps(hidden, weight, targets).sum(dim=-1)


def eager_seq_kl(hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor, ref_weight: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum over positions of the full-vocabulary KL(pi_theta || pi_ref) (SPO's token KL)."""
    with torch.no_grad():
        ref_logp = (ref_hidden @ ref_weight.t()).float().log_softmax(dim=-1)
    logp = (hidden @ weight.t()).float().log_softmax(dim=-1)
    token_kl = (logp.exp() * (logp - ref_logp)).sum(dim=-1)
    return (token_kl * (targets != IGNORE_INDEX)).sum(dim=-1)


# ----------------------------------------------------------------------------------------------
# Loss heads on per-sequence statistics (docs/losses.md); gradients through the policy log-probs only


def dpo_head(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float = 0.1) -> torch.Tensor:
    """-mean log sigmoid(beta * ((S_w - R_w) - (S_l - R_l)))  (Rafailov et al., 2023)."""
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()


def var_head(logps: torch.Tensor, rewards: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """VAR, diagonal self-normalized form: w = B * softmax(r / beta) (detached), L = -mean(w * S)."""
    weights = (rewards.float() / beta).softmax(dim=0).detach() * rewards.numel()
    return -(weights * logps).mean()


def mcpo_head(logps: torch.Tensor, ref_logps: torch.Tensor, negatives: torch.Tensor,
              beta: float = 0.01) -> torch.Tensor:
    """MC-PO: -beta r_0 + LSE_{i in {0} u Z}(beta r_i), r = S - R, averaged over prompts."""
    r = logps - ref_logps
    chosen = torch.cat([r[:, :1], r.gather(1, negatives)], dim=1)
    return (-beta * r[:, 0] + torch.logsumexp(beta * chosen, dim=1)).mean()


def spo_head(chosen: torch.Tensor, rejected: torch.Tensor, kl: Optional[torch.Tensor], alpha: float = 0.01,
             kl_coef: float = 0.01) -> torch.Tensor:
    """SPO-basic (gamma = 0, mu = 1): mean softplus(alpha (S_l - S_w)) / alpha + kl_coef * mean(KL)."""
    loss = (F.softplus(alpha * (rejected - chosen)) / alpha).mean()
    return loss if kl is None else loss + kl_coef * kl.mean()


# ----------------------------------------------------------------------------------------------
# TRL's chunked LM-head kernels (trl>=1.16)

# The per-token outputs DPOTrainer asks of the policy's fused LM head (trl 1.16, dpo_trainer.py: entropy, mean
# logit and top-1 feed its logged metrics); the reference model's head is patched with the default (log-probs).
TRL_DPO_POLICY_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
TRL_LOGPROBS_ONLY = ("log_probs",)


def trl_token_logps_fn():
    """``f(hidden [S, T, D], weight, targets [S, T], outputs) -> token log-probs [S, T]`` (0 at ignored
    positions) through ``trl.kernels.ChunkedLogProbFunction``, called the way TRL's fused LM head calls it:
    every position with clamped labels where TRL's Triton fold is unused (CPU), only the valid ones on CUDA."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.kernels.chunked_logprob import _use_triton
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    def run(hidden, weight, targets, outputs=TRL_LOGPROBS_ONLY):
        mask = targets != IGNORE_INDEX
        compact = _use_triton(hidden.device)
        flat_h = hidden[mask] if compact else hidden.reshape(-1, hidden.shape[-1])
        flat_y = targets[mask] if compact else targets.clamp(min=0).reshape(-1)
        logps = ChunkedLogProbFunction.apply(flat_h, weight, None, flat_y, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None,
                                             1.0, outputs)[0]
        if compact:
            return logps.new_zeros(mask.shape).masked_scatter(mask, logps)
        return logps.view(mask.shape).masked_fill(~mask, 0)

    return run


def trl_seq_kl_fn():
    """Per-sequence sum of the token KL(pi_theta || pi_ref) through TRL's ``ChunkedDivergenceFunction``
    (``beta=1.0``: KL(student || teacher); the gradient flows to the student only)."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    def run(hidden, ref_hidden, weight, ref_weight, targets):
        mask = targets != IGNORE_INDEX
        d = hidden.shape[-1]
        kl, _ = ChunkedDivergenceFunction.apply(hidden.reshape(-1, d), weight, None, ref_hidden.reshape(-1, d),
                                                ref_weight, None, 1.0, 1.0)
        return (kl.view(mask.shape) * mask).sum(dim=-1)

    return run


# ----------------------------------------------------------------------------------------------
# Liger-Kernel and Cut Cross-Entropy


def liger_dpo(beta: float, compiled: bool):
    """Liger-Kernel's chunked fused-linear DPO loss (summed log-probs, with a reference model)."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    module = LigerFusedLinearDPOLoss(beta=beta, compiled=compiled, use_ref_model=True, average_log_prob=False)

    def run(weight, hidden, targets, ref_hidden, ref_weight):
        return module(weight, hidden, targets, ref_input=ref_hidden, ref_weight=ref_weight)[0]

    return run


def cce_token_logps(device: torch.device):
    """Per-token log-probs from Cut Cross-Entropy: ``-linear_cross_entropy(..., reduction="none")``.

    On CPU only CCE's ``torch_compile`` implementation runs (its ``cce`` kernels are Triton/CUDA).
    """
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if device.type == "cuda" else "torch_compile"

    def run(hidden, weight, targets):
        flat = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                    ignore_index=IGNORE_INDEX, reduction="none", impl=impl)
        return -flat.view(targets.shape)

    return run, impl


def logits_bytes(tokens: int, vocab: int) -> int:
    """Bytes of one fp32 [tokens x V] logits tensor (what eager allocates several times)."""
    return 4 * tokens * vocab


def gib(num_bytes: float) -> float:
    return num_bytes / 2**30


def mib(num_bytes: float) -> float:
    return num_bytes / 2**20

