"""How much the backward's gradient filter (``KernelOptions.grad_filter``) skips, and what it costs in accuracy,
on a peaked softmax (a trained model's logit scale) and a flat one (an untrained head), torch backend on CPU.

``python -m fastpref.bench.grad_filter [--out bench/results/grad_filter_cpu.md]``

Per distribution and threshold (off, 2**-12 = the bf16/fp16 default, 2**-7 = bf16's epsilon): the fraction of
(row, 1024-column vocabulary block) slices skipped, the largest relative error of dH and dW against float64
truth (``max |err| / max |truth|``), the filter's error bound checked per row (``max ||ddH_i|| / bound_i``, <= 1
when it holds), the largest skippable softmax mass of a row (of its entries below the threshold: an upper bound
of what the filter skips), and the fwd+bwd time (median). The torch backend drops a row of a vocabulary block
only when at most 3/4 of the block's rows are kept (``torch_online.DENSE_ABOVE``; else the block runs densely,
exactly). The loss is
``sum_i a_i log p_i(target)`` (DPO-like: a log-prob-only gradient), so the float64 logits gradient is
``a_i (onehot - p)`` in closed form. bf16 rows put the default (filter on) next to filter off and to eager
bf16 autograd, all against the same float64 truth (the parity rule: fused error <= eager error + eps/4).

A second table times the backward alone (the forward is run untimed before each timed backward) with bf16 inputs,
filter off vs 2**-12 (the bf16 default) vs 2**-7, on both distributions: interleaved repeats (each repeat runs
every setting once, in a rotated order) and the ratio of medians to "off". A hand-written note at the end of the
``--out`` file (from the line ``## Note``) is kept when the file is regenerated.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from typing import Dict, List, Optional, Tuple

import torch

import fastpref
from fastpref._types import GRAD_FILTER_AUTO, KernelOptions
from fastpref.backends import torch_backend
from fastpref.reference import fused_logprobs as eager_fused_logprobs

THRESHOLDS = {"off": None, "2^-12 (auto)": GRAD_FILTER_AUTO, "2^-7 (bf16 eps)": 2.0 ** -7}
#: The marker of the hand-written note that ``main`` carries over when it rewrites ``--out``.
NOTE_MARK = "## Note"


def make_inputs(kind: str, n: int, d: int, vocab: int, seed: int = 0):
    """(hidden [n, d], weight [V, d], targets [n], a [n]) in float64.

    "peaked": each position leans towards a token drawn from a Zipf law (frequent tokens first), 15 logit units
    above a bulk of std ~2.5, its target that token 60% of the time (a trained model's logit scale);
    "flat": an untrained head, logits of std ~1, random targets."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    if kind == "flat":
        hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
        targets = torch.randint(0, vocab, (n,), generator=g)
    else:
        ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
        lean = torch.multinomial(1.0 / ranks, n, replacement=True, generator=g)
        w = weight[lean]
        hidden = 15.0 * w / w.norm(dim=1, keepdim=True) ** 2 + 2.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
        targets = torch.where(torch.rand(n, generator=g) < 0.6, lean, torch.randint(0, vocab, (n,), generator=g))
    a = torch.randn(n, generator=g, dtype=torch.float64)
    return hidden, weight, targets, a


def fwd_bwd(fn, hidden, weight, targets, a, **kwargs):
    """(dH, dW, seconds) of ``sum_i a_i token_logps_i``."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    start = time.perf_counter()
    stats = fn(h, w, targets, seq_ids=torch.zeros_like(targets), num_seqs=1, **kwargs)
    (stats.token_logps.double() * a).sum().backward()
    return h.grad, w.grad, time.perf_counter() - start


def rel(got: torch.Tensor, truth: torch.Tensor) -> float:
    return float((got.double() - truth).abs().max() / truth.abs().max())


def truth(hidden, weight, targets, a):
    """float64 (dH, dW) and the softmax ``p`` they come from (computed once per input; the thresholds reuse it)."""
    p = torch.softmax(hidden @ weight.t(), dim=1)
    grad = -a[:, None] * p
    grad[torch.arange(len(targets)), targets] += a
    return grad @ weight, grad.t() @ hidden, p


def bound_and_mass(p, weight, targets, a, threshold: Optional[float]):
    """For ``threshold`` (None: (None, None)), each row's bound sum_{p_iv <= t, v != target} |a_i| p_iv ||w_v||
    and skippable softmax mass, from the float64 softmax ``p`` of :func:`truth`."""
    if threshold is None:
        return None, None
    eligible = p <= threshold
    eligible[torch.arange(len(targets)), targets] = False
    return a.abs() * ((p * eligible) @ weight.norm(dim=1)), (p * eligible).sum(1)


def run(n: int, d: int, vocab: int, repeats: int) -> str:
    torch.manual_seed(0)
    lines: List[str] = []
    for kind in ("peaked", "flat"):
        hidden, weight, targets, a = make_inputs(kind, n, d, vocab)
        dh_true, dw_true, p = truth(hidden, weight, targets, a)
        top = p.max(1).values
        entropy = -(p * p.clamp_min(1e-300).log()).sum(1)
        lines += [f"### {kind}: mean max p = {top.mean():.3f}, mean entropy = {entropy.mean():.2f} nats "
                  f"(log V = {math.log(vocab):.2f})", "",
                  "| dtype | threshold | slices skipped | dH rel err | dW rel err | bound ratio (<= 1) "
                  "| max skippable mass | fwd+bwd s |", "|---|---|---|---|---|---|---|---|"]
        h32, w32 = hidden.float(), weight.float()
        fwd_bwd(fastpref.fused_logprobs, h32, w32, targets, a, backend="torch")  # warm-up
        for label, t in THRESHOLDS.items():
            times, res = [], None
            for _ in range(repeats):
                res = fwd_bwd(fastpref.fused_logprobs, h32, w32, targets, a, backend="torch",
                              options=KernelOptions(grad_filter=t))
                times.append(res[2])
            stats = dict(torch_backend.LAST_FILTER_STATS)
            skipped = stats["rows_skipped"] / stats["rows_seen"] if stats["rows_seen"] else 0.0
            bound, mass = bound_and_mass(p, weight, targets, a, t)
            ratio = mass_col = "-"
            if bound is not None:
                err_rows = (res[0].double() - dh_true).norm(dim=1)
                # fp32 round-off of the unfiltered kernel is added to the bound (it holds exactly in fp64)
                ratio = f"{float((err_rows / (bound + 1e-6 * dh_true.norm(dim=1))).max()):.3f}"
                mass_col = f"{float(mass.max()):.2e}"
            lines.append(f"| fp32 | {label} | {skipped:.1%} | {rel(res[0], dh_true):.2e} | {rel(res[1], dw_true):.2e} "
                         f"| {ratio} | {mass_col} | {statistics.median(times):.3f} |")
        hb, wb = hidden.bfloat16(), weight.bfloat16()
        dh_b, dw_b, _ = truth(hb.double(), wb.double(), targets, a)
        for label, fn, kwargs in (("default (auto)", fastpref.fused_logprobs, dict(backend="torch")),
                                  ("off", fastpref.fused_logprobs, dict(backend="torch", options=KernelOptions(
                                      grad_filter=None))),
                                  ("eager bf16 autograd", eager_fused_logprobs, {})):
            res = fwd_bwd(fn, hb, wb, targets, a, **kwargs)
            stats = dict(torch_backend.LAST_FILTER_STATS)
            skipped = stats["rows_skipped"] / stats["rows_seen"] if (stats["rows_seen"] and label != "off"
                                                                       and fn is not eager_fused_logprobs) else 0.0
            lines.append(f"| bf16 | {label} | {skipped:.1%} | {rel(res[0], dh_b):.2e} | {rel(res[1], dw_b):.2e} "
                         f"| - | - | {res[2]:.3f} |")
        lines.append("")
    return "\n".join(lines)


def backward_seconds(hidden, weight, targets, a, threshold: Optional[float]) -> Tuple[float, float]:
    """(seconds of the backward alone, fraction of slices the filter skipped) of ``sum_i a_i token_logps_i``, torch
    backend, filter ``threshold``; the forward runs first, untimed."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    stats = fastpref.fused_logprobs(h, w, targets, seq_ids=torch.zeros_like(targets), num_seqs=1, backend="torch",
                                    options=KernelOptions(grad_filter=threshold))
    loss = (stats.token_logps.double() * a).sum()
    start = time.perf_counter()
    loss.backward()
    seconds = time.perf_counter() - start
    seen, skipped = torch_backend.LAST_FILTER_STATS["rows_seen"], torch_backend.LAST_FILTER_STATS["rows_skipped"]
    return seconds, skipped / seen if seen else 0.0


def backward_timing(n: int, d: int, vocab: int, repeats: int) -> str:
    """The backward-time table: bf16 inputs, filter off / 2**-12 / 2**-7, interleaved repeats, ratio of medians."""
    lines = ["### Backward time, filter on vs off (bf16 inputs, torch backend)", "",
             f"Backward alone (forward untimed), {repeats} interleaved repeats per setting after one warm-up; "
             "ratio = median / median of \"off\" of the same distribution. Other jobs shared the machine: the "
             "spread column shows how noisy single runs were; only the ratios are meaningful.", "",
             "| distribution | threshold | slices skipped | backward s (median) | spread (min-max) | ratio to off |",
             "|---|---|---|---|---|---|"]
    settings = list(THRESHOLDS.items())
    for kind in ("peaked", "flat"):
        hidden, weight, targets, a = make_inputs(kind, n, d, vocab)
        hb, wb = hidden.bfloat16(), weight.bfloat16()
        backward_seconds(hb, wb, targets, a, GRAD_FILTER_AUTO)  # warm-up (allocator, thread pool)
        times: Dict[str, List[float]] = {label: [] for label, _ in settings}
        skipped: Dict[str, float] = {}
        for r in range(repeats):
            for label, t in settings[r % len(settings):] + settings[:r % len(settings)]:
                seconds, skipped[label] = backward_seconds(hb, wb, targets, a, t)
                times[label].append(seconds)
        base = statistics.median(times["off"])
        for label, _ in settings:
            med = statistics.median(times[label])
            lines.append(f"| {kind} | {label} | {skipped[label]:.1%} | {med:.3f} | {min(times[label]):.3f}-"
                         f"{max(times[label]):.3f} | {med / base:.2f} |")
    return "\n".join(lines + [""])


def kept_note(path: Optional[str]) -> str:
    """The hand-written note (from the line starting with :data:`NOTE_MARK`) of an existing report, or ""."""
    if not path or not os.path.exists(path):
        return ""
    with open(path) as f:
        text = f.read()
    at = text.find("\n" + NOTE_MARK)
    return text[at:] if at >= 0 else ""


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="positions")
    parser.add_argument("--d", type=int, default=256, help="hidden size")
    parser.add_argument("--v", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting of the accuracy table")
    parser.add_argument("--time-repeats", type=int, default=7, help="interleaved repeats of the backward timing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the Markdown report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    header = [
        "# Gradient filter (KernelOptions.grad_filter), torch backend on CPU",
        "",
        f"`python -m fastpref.bench.grad_filter` -- N={args.n} positions, D={args.d}, V={args.v}, torch backend tiles "
        f"{torch_backend.BLOCK_N} x {torch_backend.BLOCK_V} (a slice: one row of one vocabulary block), "
        f"{args.threads} CPU threads on {platform.processor() or platform.machine()} (CPU timings only; "
        f"torch {torch.__version__}). Errors are max |err| / max |truth| against float64 math on the same inputs "
        "(the bf16 rows: on the bf16-rounded inputs). Bound ratio: max over rows of ||ddH_i|| / (bound_i + fp32 "
        "round-off), the bound being sum over skippable entries of |a_i| p_iv ||w_v||. The machine is shared by "
        "other jobs: one configuration's time varied 0.4-4 s between runs, so the seconds are indicative only; "
        "the skipped fractions and errors are deterministic.",
        "",
    ]
    report = "\n".join(header) + "\n" + run(args.n, args.d, args.v, args.repeats) + "\n" + \
        backward_timing(args.n, args.d, args.v, args.time_repeats)
    report = report.rstrip("\n") + "\n" + kept_note(args.out)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
