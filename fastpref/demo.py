"""End-to-end demo: ``python -m fastpref.demo`` (offline, CPU, about a minute).

1. Builds a tiny Llama from a config (no download) and a synthetic preference task shipped with the package
   (``fastpref/data/progressions.jsonl``): the prompt is the start of an arithmetic progression modulo 24, the
   chosen response continues it correctly, the rejected one has wrong terms. Every response carries a reward
   (the fraction of correct terms), which VAR uses.
2. Trains it with ``fastpref.FusedDPOLoss`` and then, from the same start, with ``fastpref.FusedVARLoss``, feeding
   the losses through :func:`fastpref.integrations.transformers.lm_head_inputs` (backbone only, no logits), and
   prints loss and the implicit-reward accuracy on held-out pairs, i.e. the fraction of pairs with
   ``log pi(y_w)/pi_ref(y_w) > log pi(y_l)/pi_ref(y_l)``. It starts at chance and rises as the rule is learnt.
3. Measures the peak memory of one DPO loss forward + backward at a Llama-sized vocabulary, fused vs the eager
   reference (``fastpref.reference.FusedDPOLoss``, which builds the full logits). On CPU the peak is measured with
   memray (every heap allocation of the step, inputs excluded); without memray the demo prints the size of the
   logits the eager path must hold instead, and says so.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ._types import IGNORE_INDEX

MODULUS = 24  # progression values live in Z_24
PAD, BOS, EOS, SEP = 0, 1, 2, 3
OFFSET = 4  # token id of value v is OFFSET + v
VOCAB = OFFSET + MODULUS
DATA_FILE = "progressions.jsonl"


# ------------------------------------------------------------------------------------------------------
# data


def progression(start: int, step: int, count: int) -> List[int]:
    return [(start + k * step) % MODULUS for k in range(count)]


def generate_rows(count: int, seed: int) -> List[Dict]:
    """The synthetic task (this wrote ``fastpref/data/progressions.jsonl`` with count=1200, seed=0).

    Prompt: 3-5 terms of ``x_k = (a + k d) mod 24``, d in 1..5. Chosen: the next 4 terms. Rejected: the next 4
    terms computed with a wrong step, or with 1-3 terms replaced by random values. Reward of a response: the
    fraction of its terms that follow the rule.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        start, step, shown = rng.randrange(MODULUS), rng.randint(1, 5), rng.randint(3, 5)
        terms = progression(start, step, shown + 4)
        prompt, chosen = terms[:shown], terms[shown:]
        if rng.random() < 0.5:
            wrong = rng.choice([s for s in range(1, 6) if s != step])
            rejected = progression((prompt[-1] + wrong) % MODULUS, wrong, 4)
        else:
            rejected = list(chosen)
            for pos in rng.sample(range(4), rng.randint(1, 3)):
                rejected[pos] = rng.choice([v for v in range(MODULUS) if v != chosen[pos]])
        reward = sum(a == b for a, b in zip(rejected, chosen)) / 4
        if rejected == chosen:  # cannot happen with the rules above; keep pairs strict anyway
            continue
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                     "chosen_reward": 1.0, "rejected_reward": reward})
    return rows


def load_rows() -> List[Dict]:
    """The shipped task file."""
    text = resources.files("fastpref").joinpath("data", DATA_FILE).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [S, T]
    attention_mask: torch.Tensor  # [S, T]
    labels: torch.Tensor  # [S, T], IGNORE_INDEX outside responses


def encode(rows: Sequence[Dict], which: Sequence[str]) -> Batch:
    """Right-padded rows ``[BOS] prompt [SEP] response [EOS]``: for each name in ``which``, one row per example."""
    seqs, scored = [], []
    for name in which:
        for row in rows:
            prompt = [BOS] + [OFFSET + v for v in row["prompt"]] + [SEP]
            response = [OFFSET + v for v in row[name]] + [EOS]
            seqs.append(prompt + response)
            scored.append([False] * len(prompt) + [True] * len(response))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (seq, keep) in enumerate(zip(seqs, scored)):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, : len(seq)] = torch.where(torch.tensor(keep), torch.tensor(seq), torch.tensor(IGNORE_INDEX))
    return Batch(ids, mask, labels)


# ------------------------------------------------------------------------------------------------------
# model and training


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def _head_inputs(model, batch: Batch, keep: torch.Tensor):
    from .integrations.transformers import lm_head_inputs

    return lm_head_inputs(model, batch.input_ids, batch.attention_mask, batch.labels, logits_to_keep=keep)


def _keep(batch: Batch) -> torch.Tensor:
    from .integrations.transformers import shift_labels

    return shift_labels(batch.labels) != IGNORE_INDEX  # only scored positions reach the LM head (packed layout)


@torch.no_grad()
def reward_accuracy(policy, ref, rows: Sequence[Dict]) -> Tuple[float, float]:
    """Held-out implicit-reward accuracy and mean margin of log pi/pi_ref, chosen vs rejected."""
    batch = encode(rows, ("chosen", "rejected"))
    keep = _keep(batch)
    pol, rf = _head_inputs(policy, batch, keep), _head_inputs(ref, batch, keep)
    stats = pol.logprobs(ref_hidden=rf.hidden, ref_weight=rf.weight)
    ratio = stats.logps - stats.ref_logps
    chosen, rejected = ratio.chunk(2)
    # ties (e.g. policy == reference at step 0) count one half: chance level is 0.5
    wins = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    return float(wins.mean()), float((chosen - rejected).mean())


def train(method: str, policy, ref, train_rows: Sequence[Dict], eval_rows: Sequence[Dict], *, steps: int,
          batch_size: int, lr: float, seed: int, report_every: int,
          log: Callable[[str], None] = print) -> List[Dict]:
    """Train ``policy`` in place with FusedDPOLoss (``method="dpo"``) or FusedVARLoss (``"var"``)."""
    import fastpref

    if method == "dpo":
        loss_fn = fastpref.FusedDPOLoss(beta=0.1)
        which = ("chosen", "rejected")
    elif method == "var":
        loss_fn = fastpref.FusedVARLoss(beta=0.25)  # rewards in [0, 1]: r / beta spreads over O(1)
        which = ("chosen", "rejected")  # every response is one VAR sample with its own reward
    else:
        raise ValueError(f"method must be 'dpo' or 'var', got {method!r}")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    history = []
    acc, margin = reward_accuracy(policy, ref, eval_rows)
    history.append({"step": 0, "loss": float("nan"), "accuracy": acc, "margin": margin})
    log(f"  {0:>5}  {'':>8}  {acc:>9.3f}  {margin:>8.3f}")
    running: List[float] = []
    policy.train()
    for step in range(1, steps + 1):
        rows = rng.sample(list(train_rows), batch_size)
        batch = encode(rows, which)
        keep = _keep(batch)
        pol = _head_inputs(policy, batch, keep)
        kwargs = dict(bias=pol.bias, seq_ids=pol.seq_ids, num_seqs=pol.num_seqs)
        if method == "dpo":
            with torch.no_grad():
                rf = _head_inputs(ref, batch, keep)
            out = loss_fn(pol.weight, pol.hidden, pol.targets, ref_hidden=rf.hidden, ref_weight=rf.weight, **kwargs)
        else:
            rewards = torch.tensor([r[f"{name}_reward"] for name in which for r in rows])
            out = loss_fn(pol.weight, pol.hidden, pol.targets, rewards=rewards, **kwargs)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        running.append(out.loss.item())
        if step % report_every == 0 or step == steps:
            policy.eval()
            acc, margin = reward_accuracy(policy, ref, eval_rows)
            policy.train()
            loss = sum(running) / len(running)
            running = []
            history.append({"step": step, "loss": loss, "accuracy": acc, "margin": margin})
            log(f"  {step:>5}  {loss:>8.4f}  {acc:>9.3f}  {margin:>8.3f}")
    policy.eval()
    return history


# ------------------------------------------------------------------------------------------------------
# memory


def _peak_bytes(step: Callable[[], None]) -> Optional[int]:
    """Peak heap bytes allocated while ``step`` runs (memray), or None without memray."""
    try:
        import memray
    except ImportError:
        return None
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fastpref-demo-") as tmp:
        path = os.path.join(tmp, "step.bin")
        with memray.Tracker(path, native_traces=False, file_format=memray.FileFormat.AGGREGATED_ALLOCATIONS):
            step()
        return int(memray.FileReader(path).metadata.peak_memory)


def memory_comparison(tokens: int, hidden: int, vocab: int, seed: int = 0) -> Dict[str, Optional[int]]:
    """Peak bytes of one DPO loss forward + backward over ``tokens`` positions, fused vs eager."""
    import fastpref
    from fastpref import reference

    g = torch.Generator().manual_seed(seed)
    seqs = 8
    shape = (seqs, tokens // seqs, hidden)
    h = (torch.randn(shape, generator=g) * 0.5).requires_grad_()
    ref_h = torch.randn(shape, generator=g) * 0.5
    w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).requires_grad_()
    targets = torch.randint(0, vocab, shape[:2], generator=g)
    result: Dict[str, Optional[int]] = {}
    for name, cls in (("eager", reference.FusedDPOLoss), ("fused", fastpref.FusedDPOLoss)):
        loss_fn = cls(beta=0.1)

        def step() -> None:
            h.grad = w.grad = None
            loss_fn(w, h, targets, ref_hidden=ref_h).loss.backward()

        step()  # warm-up: one-time allocations (thread pools, kernels' caches) are not the loss's memory
        h.grad = w.grad = None
        result[name] = _peak_bytes(step)
    result["logits_bytes"] = tokens * vocab * 4
    result["weight_grad_bytes"] = vocab * hidden * 4  # part of both peaks: the step creates weight.grad
    return result


# ------------------------------------------------------------------------------------------------------
# entry point


def _mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2 ** 20:8.1f} MiB"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastpref.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per loss (default 300)")
    parser.add_argument("--batch-size", type=int, default=16, help="preference pairs per step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-pairs", type=int, default=128, help="held-out pairs for the reward accuracy")
    parser.add_argument("--report-every", type=int, default=None, help="steps between table rows")
    parser.add_argument("--quick", action="store_true", help="few steps and a small memory case (smoke test)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory comparison")
    parser.add_argument("--memory-vocab", type=int, default=32000, help="vocabulary of the memory case")
    parser.add_argument("--memory-tokens", type=int, default=2048, help="positions of the memory case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the histories and memory figures to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 40)
        args.memory_vocab, args.memory_tokens = min(args.memory_vocab, 8000), min(args.memory_tokens, 512)
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1")
    report_every = args.report_every or max(1, args.steps // 6)

    # One thread: this model is so small that a second thread only adds synchronisation (and on a busy 2-core
    # machine a spinning worker makes each step 10x slower). The memory case below uses up to two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args, report_every)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, report_every: int) -> int:
    began = time.perf_counter()
    rows = load_rows()
    eval_rows, train_rows = rows[: args.eval_pairs], rows[args.eval_pairs:]
    if len(train_rows) < args.batch_size:
        raise SystemExit(f"--eval-pairs leaves {len(train_rows)} training pairs, fewer than --batch-size")
    base = tiny_llama(args.seed)
    params = sum(p.numel() for p in base.parameters())
    print(f"fastpref demo: tiny Llama ({params / 1e3:.0f}k parameters, vocab {VOCAB}) learning which continuation "
          f"of an arithmetic progression mod {MODULUS} is preferred")
    print(f"  {len(train_rows)} training pairs, {len(eval_rows)} held-out pairs, {args.steps} steps x "
          f"{args.batch_size} pairs per loss; acc = held-out implicit-reward accuracy, margin = mean "
          "log-ratio margin\n")
    report: Dict = {"steps": args.steps, "histories": {}}
    for method, title in (("dpo", "FusedDPOLoss(beta=0.1)"), ("var", "FusedVARLoss(beta=0.25), rewards = fraction "
                                                                     "of correct terms")):
        policy, ref = copy.deepcopy(base), copy.deepcopy(base).eval().requires_grad_(False)
        print(f"{title}")
        print(f"  {'step':>5}  {'loss':>8}  {'acc':>9}  {'margin':>8}")
        start = time.perf_counter()
        report["histories"][method] = train(method, policy, ref, train_rows, eval_rows, steps=args.steps,
                                            batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                            report_every=report_every)
        print(f"  ({time.perf_counter() - start:.1f} s)\n")

    if not args.no_memory:
        d = 256
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        mem = memory_comparison(args.memory_tokens, d, args.memory_vocab, seed=args.seed)
        report["memory"] = mem
        print(f"Peak memory of one DPO loss forward+backward, {args.memory_tokens} positions x vocab "
              f"{args.memory_vocab} x d {d} (policy + reference pass):")
        if mem["eager"] is None:
            print("  memray is not installed: no measurement. The eager loss must hold the "
                  f"[positions x vocab] fp32 logits, {_mib(mem['logits_bytes'])}, and more for softmax and grads;")
            print("  the fused loss holds none of them.")
        else:
            ratio = mem["eager"] / max(mem["fused"], 1)
            print(f"  eager reference (full logits)  {_mib(mem['eager'])}")
            print(f"  fastpref fused                 {_mib(mem['fused'])}   ({ratio:.0f}x less)")
            print("  (memray: peak heap allocated during the step, inputs excluded, the "
                  f"{_mib(mem['weight_grad_bytes']).strip()} weight gradient included; one fp32 logits tensor is "
                  f"{_mib(mem['logits_bytes']).strip()})")
    print(f"\ndone in {time.perf_counter() - began:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
