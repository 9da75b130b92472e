"""Four GEMMs for separable losses: ``dH``, ``dW`` and ``db`` formed in the module's forward
(``KernelOptions(grad_in_forward=True)``, docs/api.md §3).

The recompute path runs five products of ``[positions x D x V]``: the policy and reference logits in the
forward, then the policy logits again, ``dH`` and ``dW`` in the backward, because the per-sequence upstream
gradient is unknown until every sequence's forward is done. When the loss is a sum of independent per-pair
terms, a pair's upstream gradient is known as soon as that pair's forward is: so each group of whole pairs
is projected once into a ``[rows x V]`` buffer, log-softmaxed in place, its per-position gradient
``dL/dz = a (onehot - p) / T`` formed in the same buffer and multiplied out into ``dH`` and ``dW`` while the
buffer is still hot. The backward scales the three stored gradients by the (scalar) upstream gradient.

``a`` (``dL/dtoken_logps`` of the group's positions) comes from the module's own :meth:`compute_loss` on the
batch's per-position log-probs with the groups not yet projected held at a placeholder: for a separable
loss the gradient of one pair's terms reads only that pair's values, so ``a`` is exact. The loss value and
the metrics come from one more :meth:`compute_loss` on the finished batch, the same call the recompute path
makes. Memory: the group's logits (at most ``KernelOptions.workspace_bytes``; a pair that does not fit falls
back), plus ``dH`` and ``dW`` (fp32 for half inputs) held from the forward to the backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import ops
from .._prepare import build_prepared, check_call
from .._types import LogprobStats, Prepared, reduce_per_sequence
from ..backends.torch_online import ExtraSums, online_update

# Not importing .base: base's forward calls into this module. ``head`` is a base.LMHead, the result a LossOutput.
LMHead = LossOutput = Any

Tensor = torch.Tensor

#: Which path the last module call with ``grad_in_forward=True`` took (for tests and benchmarks): ``path``
#: ("in_forward" or "recompute"), ``groups`` (pair groups projected) and ``reason`` (why it fell back).
LAST_PATH: Dict[str, Any] = {"path": None, "groups": 0, "reason": ""}
#: log pi of a position not yet projected, while a group's gradient is taken (any finite log-prob works
#: for a separable loss; a negative one keeps losses that read log(1 - p) finite).
_PLACEHOLDER_LOGP = -1.0


def _fallback(reason: str) -> None:
    LAST_PATH.update(path="recompute", groups=0, reason=reason)
    return None


def _why_not(module: Any, head: LMHead, hidden: Tensor, ref_hidden: Optional[Tensor], loss_specific: dict
             ) -> Optional[str]:
    """Why this call cannot take the in-forward path (None: it can)."""
    if not module.separable_call(loss_specific):
        return "the loss couples the batch (not a sum of per-pair terms)"
    if any(isinstance(v, torch.Tensor) and v.requires_grad for v in loss_specific.values()):
        return "a call keyword tensor needs a gradient (the path hands out dH, dW and db only)"
    if type(module).fused_logprobs is not ops.fused_logprobs:
        return "the module's log-prob op is not the fused one (eager twin)"
    if not torch.is_grad_enabled():
        return "no gradient: grad mode is off"
    if not any(t is not None and t.requires_grad for t in (hidden, head.weight, head.bias)):
        return "no gradient: neither hidden, weight nor bias requires one"
    if module.vocab_parallel_group is not None:
        return "vocabulary-parallel head"
    if head.softcap is not None:
        return "softcap (its slope would need the logits kept next to their exponentials)"
    if module.sequence_kl is not None and ref_hidden is not None:
        return "the module computes a KL in its pass"
    return None


def _groups(prep: Prepared, units: Tensor, budget_rows: int) -> Optional[List[Tuple[Tensor, int]]]:
    """(sequence indices, valid positions) of consecutive unit groups whose valid positions fit
    ``budget_rows``; None if a single unit does not fit."""
    lengths = reduce_per_sequence(prep, prep.valid.to(torch.int64)).cpu()
    unit_rows = lengths[units.cpu()].sum(dim=1).tolist()
    groups, current, rows = [], [], 0
    for u, n in enumerate(unit_rows):
        if n > budget_rows:
            return None
        if rows + n > budget_rows and current:
            groups.append((units[current].reshape(-1), rows))
            current, rows = [], 0
        current.append(u)
        rows += n
    if current:
        groups.append((units[current].reshape(-1), rows))
    return groups


class _TorchRows:
    """The row-wise passes over a group's logits buffer, in torch ops (any device): the torch backend's online
    statistics (``online_update``, ``ExtraSums``) with the whole vocabulary as one tile."""

    def stats(self, z: Tensor, targets: Tensor, extras: Tuple[str, ...] = ()) -> Tuple[Tensor, Tensor, dict]:
        """(lse, target logit, requested extras) per row; leaves ``exp(z - max)`` in ``z`` (no second buffer).
        The extras carry no gradient here: the modules' losses never read them (metrics only)."""
        target = z.gather(1, targets.unsqueeze(1)).squeeze(1)
        rows = z.shape[0]
        m0, self.sum_exp = torch.full((rows,), float("-inf"), dtype=z.dtype, device=z.device), z.new_zeros(rows)
        if not extras:
            _, m, _, _ = online_update(z, m0, self.sum_exp, z)
            return m + self.sum_exp.log(), target, {}
        # The extras' sums need the logits next to their exponentials: a few rows at a time into a scratch tile.
        sums, m = ExtraSums.zeros(rows, z.dtype, z.device), torch.empty_like(m0)
        step = max(1, (1 << 22) // z.shape[1])
        scratch = z.new_empty(min(step, rows), z.shape[1])
        for r0 in range(0, rows, step):
            chunk = z[r0:r0 + step]
            e, m[r0:r0 + step], _, rescale = online_update(chunk, m0[r0:r0 + step], self.sum_exp[r0:r0 + step],
                                                           scratch[: chunk.shape[0]])
            sums.rows(r0, r0 + step).update(chunk, e, rescale)  # overwrites the chunk ...
            chunk.copy_(e)  # ... which then holds exp(z - max), as without extras
        return m + self.sum_exp.log(), target, sums.finalize(extras, m, self.sum_exp, target, z.shape[1])

    def grad_(self, z: Tensor, lse: Tensor, row_scale: Tensor, targets: Tensor) -> Tensor:
        """``z <- row_scale * (onehot - p)`` in place (``z`` holds ``exp(z - max)``: ``p = z / sum``)."""
        z.mul_((-row_scale / self.sum_exp).unsqueeze(1))
        return z.index_put_((torch.arange(z.shape[0], device=z.device), targets), row_scale, accumulate=True)


class _TritonRows:
    """The same passes as Triton kernels (``csrc_triton/logits_rows.py``): one read for the statistics, one
    read-write for the gradient."""

    def stats(self, z: Tensor, targets: Tensor, extras: Tuple[str, ...] = ()) -> Tuple[Tensor, Tensor, dict]:
        from ..backends.triton_rows import row_softmax_stats

        return (*row_softmax_stats(z, targets), {})

    def grad_(self, z: Tensor, lse: Tensor, row_scale: Tensor, targets: Tensor) -> Tensor:
        from ..backends.triton_rows import softmax_grad_

        return softmax_grad_(z, lse, row_scale, targets)


def _product(a: Tensor, b: Tensor, cd: torch.dtype) -> Tensor:
    """``a @ b`` in the compute dtype ``cd``. Half operands: on CUDA one cuBLAS GEMM with fp32 output
    (``out_dtype``: tensor cores, fp32 accumulation, ``a`` rounded to ``b``'s dtype as the deterministic Triton
    backward rounds ``dz``); elsewhere fp32 copies (the CPU has no such kernel)."""
    if a.dtype == cd and b.dtype == cd:
        return a @ b
    if a.is_cuda:
        return torch.mm(a.to(b.dtype), b, out_dtype=cd)
    return a.to(cd) @ b.to(cd)


def _slices(weight: Tensor):
    """Vocabulary slices of a half head, each cast on its own (a bounded temporary, never a full fp32 copy)."""
    step = max(1, (1 << 24) // max(1, weight.shape[1]))
    return [slice(v0, v0 + step) for v0 in range(0, weight.shape[0], step)]


def _project(h: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float, out: Tensor) -> Tensor:
    """``out = (h @ weight.T + bias) / T`` in ``out``'s (compute) dtype."""
    cd = out.dtype
    if weight.dtype == cd and h.dtype == cd:
        torch.mm(h, weight.t(), out=out)
    else:
        for cols in _slices(weight):
            out[:, cols] = _product(h, weight[cols].t(), cd)
    if bias is not None:
        out.add_(bias.to(cd))
    if temperature != 1.0:
        out.div_(temperature)
    return out


def _multiply_out(dz: Tensor, h: Tensor, weight: Tensor, grads: "_Grads", rows: Tensor) -> None:
    """``dH[rows] = dz @ W``, ``dW += dz^T @ h``, ``db += sum(dz)``, in the compute dtype of ``dz``."""
    cd = dz.dtype
    same = weight.dtype == cd and h.dtype == cd
    if grads.hidden is not None:
        if same:
            dh = dz @ weight
        else:
            dh = torch.zeros(dz.shape[0], weight.shape[1], dtype=cd, device=dz.device)
            for cols in _slices(weight):
                dh += _product(dz[:, cols], weight[cols], cd)
        grads.hidden.index_copy_(0, rows, dh)
    if grads.weight is not None:
        if same:
            grads.weight.addmm_(dz.t(), h)
        else:
            for cols in _slices(weight):
                grads.weight[cols] += _product(dz[:, cols].t(), h, cd)
    if grads.bias is not None:
        grads.bias.add_(dz.sum(dim=0))


class _Grads:
    """The gradients formed in the forward, in the compute dtype, for the inputs that need one."""

    def __init__(self, prep: Prepared, hidden: Tensor, head: LMHead, cd: torch.dtype):
        def new(t: Optional[Tensor], shape) -> Optional[Tensor]:
            return None if t is None or not t.requires_grad else torch.zeros(shape, dtype=cd, device=t.device)

        self.hidden = new(hidden, prep.hidden.shape)
        self.weight = new(head.weight, head.weight.shape)
        self.bias = new(head.bias, () if head.bias is None else head.bias.shape)


class _ScaledGrads(torch.autograd.Function):
    """Returns ``loss``; its backward hands out the stored gradients times the upstream gradient."""

    @staticmethod
    def forward(ctx, loss: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], grads: _Grads
                ) -> Tensor:
        ctx.grads, ctx.shape = grads, hidden.shape
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, upstream: Tensor):
        grads, (dh_t, dw_t, db_t) = ctx.grads, ctx.dtypes
        if torch.is_grad_enabled():  # create_graph=True: the handed-out gradients would silently carry none
            raise RuntimeError("KernelOptions(grad_in_forward=True) forms gradients that are not differentiable: "
                               "create_graph=True (double backward, gradient penalties) needs grad_in_forward=False "
                               "(whose op raises on a second backward too)")
        if grads is None:
            raise RuntimeError("a module call with KernelOptions(grad_in_forward=True) hands out its gradients once; "
                               "a second backward through it (retain_graph=True) needs grad_in_forward=False")
        ctx.grads = None  # scaled in place and handed out: no second copy of dW

        def scaled(g: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
            return None if g is None else g.mul_(upstream.to(g.dtype)).to(dtype)

        dh = scaled(grads.hidden, dh_t)
        return None, None if dh is None else dh.view(ctx.shape), scaled(grads.weight, dw_t), \
            scaled(grads.bias, db_t), None


def forward_with_grads(module: Any, head: LMHead, hidden: Tensor, targets: Tensor, *, ref_hidden: Optional[Tensor],
                       ref_weight: Optional[Tensor], ref_bias: Optional[Tensor], ref_logps: Optional[Tensor],
                       seq_ids: Optional[Tensor], num_seqs: Optional[int], loss_specific: dict
                       ) -> Optional[LossOutput]:
    """The module's call on the in-forward path, or None (the caller then takes the recompute path)."""
    module._check_reference_args(ref_hidden, ref_weight, ref_bias, ref_logps)
    reason = _why_not(module, head, hidden, ref_hidden, loss_specific)
    if reason is not None:
        return _fallback(reason)
    opts = module.kernel_options
    call = check_call(hidden, head.weight, targets, bias=head.bias, seq_ids=seq_ids, num_seqs=num_seqs,
                      temperature=head.temperature, ignore_index=module.ignore_index, backend=module.backend,
                      options=opts)
    prep = build_prepared(call)
    if prep.backend == "triton":
        from ..backends.triton_backend import check_supported

        check_supported(prep)  # the op's own refusals (float64 ...), as on the recompute path
    if module.extra_outputs and prep.backend == "triton":
        return _fallback("extra outputs with the Triton backend (its row kernels compute log-probs only)")
    units = module.separable_units(prep.num_seqs, loss_specific)
    if units is None:
        return _fallback("the loss couples the batch (not a sum of per-pair terms)")
    cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    vocab = head.weight.shape[0]
    groups = _groups(prep, units.to(prep.seq_ids.device), opts.workspace_bytes // (vocab * cd.itemsize))
    if groups is None:
        return _fallback("one pair's logits exceed KernelOptions.workspace_bytes")

    with torch.autocast(hidden.device.type, enabled=False):  # the op ignores autocast; so does this path
        loss, metrics, batch, grads = _run_groups(_Call(module, head, head.reference(ref_weight, ref_bias), hidden,
                                                        targets, seq_ids, num_seqs, ref_hidden, ref_logps,
                                                        loss_specific, prep, cd), groups)
    LAST_PATH.update(path="in_forward", groups=len(groups), reason="")
    loss = _ScaledGrads.apply(loss, hidden, head.weight, head.bias, grads)
    return module.finish(batch, loss, metrics)


@dataclass
class _Call:
    """One module call on the in-forward path: what :func:`_run_groups` reads."""

    module: Any
    head: LMHead
    ref_head: LMHead
    hidden: Tensor
    targets: Tensor
    seq_ids: Optional[Tensor]
    num_seqs: Optional[int]
    ref_hidden: Optional[Tensor]
    ref_logps: Optional[Tensor]
    loss_specific: dict
    prep: Prepared
    cd: torch.dtype


def _run_groups(c: _Call, groups: List[Tuple[Tensor, int]]) -> Tuple[Tensor, dict, Any, _Grads]:
    """The reference pass, then each group projected, log-softmaxed, differentiated and multiplied out; the loss,
    metrics and batch of the finished call and the gradients formed."""
    module, prep, head, cd = c.module, c.prep, c.head, c.cd
    vocab = head.weight.shape[0]
    ref_stats = None
    if c.ref_hidden is not None:  # the reference pass: no gradient, no logits kept (the fused op)
        with torch.no_grad():
            ref_stats = ops.fused_logprobs(c.ref_hidden, c.ref_head.weight, c.targets, bias=c.ref_head.bias,
                                           seq_ids=c.seq_ids, num_seqs=c.num_seqs, temperature=head.temperature,
                                           **module.logprob_options())
    lengths = reduce_per_sequence(prep, prep.valid.to(cd))
    token_logps = torch.where(prep.valid, _PLACEHOLDER_LOGP, 0.0).to(cd)
    token_extras = {name: torch.zeros_like(token_logps) for name in module.extra_outputs}

    def loss_of(values: Tensor) -> Tuple[Tensor, dict, Any]:
        extras = {}
        for name, per_position in token_extras.items():
            extras[name] = reduce_per_sequence(prep, per_position)
            extras["token_" + name] = (per_position.bool() if name == "is_top1" else per_position).view(prep.target_shape)
        stats = LogprobStats(logps=reduce_per_sequence(prep, values), lengths=lengths,
                             token_logps=values.view(prep.target_shape),
                             ref_logps=None if ref_stats is None else ref_stats.logps,
                             ref_token_logps=None if ref_stats is None else ref_stats.token_logps, **extras)
        ref = stats.ref_logps if ref_stats is not None else module.given_ref_logps(c.ref_logps, stats.logps)
        batch = module.sequence_batch(stats, ref, head, c.ref_head, targets=c.targets, seq_ids=c.seq_ids)
        loss, metrics = module.compute_loss(batch, **c.loss_specific)
        return loss, metrics, batch

    grads = _Grads(prep, c.hidden, head, cd)
    rows_pass = _TritonRows() if prep.backend == "triton" else _TorchRows()
    buffer = torch.empty(max((n for _, n in groups), default=0) * vocab, dtype=cd, device=c.hidden.device)
    weight, bias = head.weight.detach(), None if head.bias is None else head.bias.detach()
    for seqs, _ in groups:
        rows = (torch.isin(prep.seq_ids, seqs) & prep.valid).nonzero().squeeze(1)
        h = prep.hidden.detach().index_select(0, rows)
        h = h if h.is_cuda else h.to(cd)  # CUDA: half operands go to cuBLAS as they are (_product)
        tgt = prep.targets.index_select(0, rows)
        z = _project(h, weight, bias, head.temperature, buffer[: rows.numel() * vocab].view(-1, vocab))
        lse, target_logit, row_extras = rows_pass.stats(z, tgt, module.extra_outputs)
        token_logps.index_copy_(0, rows, target_logit - lse)
        for name, values in row_extras.items():
            token_extras[name].index_copy_(0, rows, values)
        leaf = token_logps.detach().requires_grad_(True)
        with torch.enable_grad():
            (a,) = torch.autograd.grad(loss_of(leaf)[0], leaf, allow_unused=True)
        a = torch.zeros_like(leaf) if a is None else a
        dz = rows_pass.grad_(z, lse, a.index_select(0, rows) / head.temperature, tgt)
        _multiply_out(dz, h, weight, grads, rows)
    del buffer
    with torch.no_grad():
        loss, metrics, batch = loss_of(token_logps)
    if not bool(torch.isfinite(loss)):  # as the recompute path would: a non-finite loss gives non-finite gradients
        for g in (grads.hidden, grads.weight, grads.bias):
            if g is not None:
                g.fill_(float("nan"))
    return loss, metrics, batch, grads
