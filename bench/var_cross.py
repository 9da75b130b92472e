"""Cost of VAR's Alg. 1 cross pairs in FastPrefDPOTrainer: one optimizer step with ``fastpref_loss="var"`` for
``var_pairs="diagonal"`` (dataset reward columns) and ``var_pairs="cross"`` with ``var_responses="chosen"`` and
``"both"`` (a reward model), at several micro-batch sizes B.

    python -m fastpref.bench.var_cross [--quick] [--out DIR] [--threads 1]

Model and data: the offline toy parts of fastpref.integrations.toy (a 2-layer Llama with hidden size 32 and 43 words,
a 2-layer sequence-classification reward model, prompts of 3-5 words, responses of 2-4). At this size a step is
mostly fixed per-forward overhead, so the times show how the number of forwards and rows grows, not what a real
model would spend. What the step does is counted, not assumed: forward hooks on the reference's backbone, the
policy's backbone and the reward model count the rows each runs per step; the report puts the counts next to the
formula (cross pairs: P x S reference sequences, B^2 with "chosen", 2 B^2 with "both"; the diagonal form with
``normalize="self"`` runs no reference at all). Times: warm-up steps, then timed steps interleaved round-robin over
every trainer (the order rotates each round); median and fastest. Peak memory: memray, one step of each trainer in
its own region after the timed ones (bench/measure.py; skipped with a note when memray is missing or with
``--no-memory``). Writes ``var_cross.json`` and ``var_cross.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from . import measure, peers, report, runner  # noqa: E402
from .trainer_step import batches, optimizer_step, ready  # noqa: E402

# form name -> (var_pairs, var_responses); "diagonal" trains on chosen and rejected rows like "cross/both"
FORMS = {"diagonal": ("diagonal", "both"), "cross/chosen": ("cross", "chosen"), "cross/both": ("cross", "both")}
BETA = 1.0
PROMPTS_PER_CHUNK = 1  # var_prompts_per_chunk, the trainer's default: one prompt (S sequences) per reference forward


@dataclass(frozen=True)
class Size:
    """Micro-batch sizes and repeats of one run."""
    batches: Sequence[int] = (2, 4, 8)
    warmup: int = 1
    repeats: int = 5
    memory: bool = True


FULL = Size()
QUICK = Size(batches=(2, 3), warmup=1, repeats=2, memory=False)


def expected(form: str, b: int) -> Dict[str, int]:
    """Per-step counts of one form at B prompts per micro-batch, from _trl_var.py's code path: the cross form scores
    every (prompt i, in-batch response j), P = B prompts x S responses (S = B with "chosen", 2B with "both"), through
    the reference in ceil(P / var_prompts_per_chunk) forwards, and the same P x S pairs with the reward model; the
    diagonal form (normalize="self") reads r_ii from the dataset and needs no reference (the weights are
    S softmax(r / beta)). The policy's forward runs the S rows it trains on (with "chosen" the trainer drops the
    rejected rows before it)."""
    var_pairs, responses = FORMS[form]
    s = b if responses == "chosen" else 2 * b
    cross = var_pairs == "cross"
    return dict(ref_rows=b * s if cross else 0, ref_forwards=math.ceil(b / PROMPTS_PER_CHUNK) if cross else 0,
                reward_pairs=b * s if cross else 0, policy_rows=s)


class Counts:
    """Rows seen by forward hooks on the reference backbone, the policy backbone and the reward model."""

    def __init__(self, trainer: Any) -> None:
        self.values = dict(ref_rows=0, ref_forwards=0, policy_rows=0, reward_pairs=0, reward_forwards=0)
        trainer.ref_model.model.register_forward_hook(self._hook("ref_rows", "ref_forwards"))
        trainer.model.model.register_forward_hook(self._hook("policy_rows", None))
        reward = trainer.fastpref_reward_model
        if reward is not None:
            reward.model.register_forward_hook(self._hook("reward_pairs", "reward_forwards"))

    def _hook(self, rows: str, calls: Optional[str]):
        def count(module, args, out) -> None:
            # the backbones return last_hidden_state [rows, T, D], the reward model logits [rows, 1]
            tensor = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits
            self.values[rows] += int(tensor.shape[0])
            if calls:
                self.values[calls] += 1
        return count

    def snapshot(self) -> Dict[str, int]:
        return dict(self.values)


@dataclass
class Entry:
    form: str
    b: int
    trainer: Any = None
    counts: Optional[Counts] = None
    batches: List[dict] = dataclasses.field(default_factory=list)
    step_counts: List[Dict[str, int]] = dataclasses.field(default_factory=list)
    times: List[float] = dataclasses.field(default_factory=list)
    losses: List[float] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return f"B={self.b} {self.form}"

    def step(self) -> None:
        """One optimizer step on the next batch (batch ``i`` at the ``i``-th step); records what the hooks
        counted during it."""
        before = self.counts.snapshot()
        self.losses.append(optimizer_step(self.trainer, self.batches[len(self.losses) % len(self.batches)]))
        after = self.counts.snapshot()
        self.step_counts.append({k: after[k] - before[k] for k in after})


def build(form: str, b: int, steps: int, out_dir: str, seed: int) -> Entry:
    """One trainer for ``form`` at B = ``b``, its optimizer and ``steps`` batches of consecutive rows."""
    from trl import DPOConfig

    from fastpref.integrations.toy import toy_llama, toy_preferences, toy_reward_model, toy_tokenizer
    from fastpref.integrations.trl import FastPrefDPOTrainer

    var_pairs, responses = FORMS[form]
    args = DPOConfig(output_dir=out_dir, per_device_train_batch_size=b, max_steps=steps, learning_rate=1e-4,
                     report_to="none", use_cpu=True, bf16=False, fp16=False, seed=seed, save_strategy="no",
                     logging_steps=1, dataloader_num_workers=0, disable_dropout=True)
    tokenizer = toy_tokenizer()
    reward = (toy_reward_model(seed + 2), toy_tokenizer()) if var_pairs == "cross" else None
    trainer = FastPrefDPOTrainer(model=toy_llama(seed), ref_model=toy_llama(seed), args=args,
                                 train_dataset=toy_preferences(b * steps, seed=seed), processing_class=tokenizer,
                                 fastpref_loss="var", fastpref_loss_kwargs=dict(beta=BETA), reward_model=reward,
                                 var_pairs=var_pairs, var_responses=responses,
                                 var_prompts_per_chunk=PROMPTS_PER_CHUNK)
    ready(trainer, steps)
    return Entry(form, b, trainer, Counts(trainer), batches=batches(trainer, b, steps))


def measure_all(entries: List[Entry], size: Size) -> Dict[str, Optional[int]]:
    """Warm-up, interleaved timed rounds, then (``size.memory`` and memray present) one memray step each;
    returns the peaks in bytes by entry name (None: not measured)."""
    for _ in range(size.warmup):
        for e in entries:
            e.step()
    timed = measure.time_interleaved({e.name: e.step for e in entries}, size.repeats, torch.device("cpu"))
    for e in entries:
        e.times = timed[e.name].times_s
    if not size.memory:
        return {e.name: None for e in entries}
    return measure.cpu_step_peaks({e.name: e.step for e in entries})


def rows_of(entries: List[Entry], peaks: Dict[str, Optional[int]]) -> List[dict]:
    """One row per (B, form): the counts of every step (they must not vary), the formula, times, ratios to the
    diagonal form at the same B, memory."""
    diagonal = {e.b: e for e in entries if e.form == "diagonal"}
    rows = []
    for e in entries:
        counts = e.step_counts[0]
        median = measure.median_of(e.times)
        base = diagonal.get(e.b)
        base_median = measure.median_of(base.times) if base else None
        peak = peaks[e.name]
        rows.append(dict(
            b=e.b, form=e.form, var_pairs=FORMS[e.form][0], var_responses=FORMS[e.form][1], counts=counts,
            counts_constant=all(c == counts for c in e.step_counts), expected=expected(e.form, e.b),
            matches_formula=all(counts[k] == v for k, v in expected(e.form, e.b).items()),
            times_s=[round(t, 5) for t in e.times], median_s=median, best_s=min(e.times),
            x_diagonal=round(median / base_median, 3) if base_median else None,
            x_diagonal_best=round(min(e.times) / min(base.times), 3) if base else None,
            peak_mib=round(peak / 2**20, 2) if peak is not None else None, losses=e.losses))
    return rows


def run(size: Size, out: str, mode: str, seed: int = 0, threads: int = 1, show: bool = True) -> dict:
    """Measure, then write ``var_cross.json`` and ``var_cross.md`` under ``out``; returns the results."""
    torch.set_num_threads(threads)
    import datasets

    datasets.disable_progress_bars()  # TRL's dataset preparation per trainer
    meta = runner.environment(runner.Config(threads=threads))
    began = time.perf_counter()
    steps = size.warmup + size.repeats + 1
    with tempfile.TemporaryDirectory(prefix="fastpref-var-cross-") as tmp:
        entries = [build(form, b, steps, os.path.join(tmp, f"{b}-{form.replace('/', '-')}"), seed)
                   for b in size.batches for form in FORMS]
        peaks = measure_all(entries, size)
    meta["load_avg_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    meta["elapsed_s"] = round(time.perf_counter() - began, 1)
    memory_note = None if size.memory and peers.is_installed("memray") else (
        runner.MEMORY_NOT_MEASURED if size.memory else "not measured (--quick / --no-memory)")
    results = dict(mode=mode, size=dataclasses.asdict(size), meta=meta, seed=seed, beta=BETA,
                   prompts_per_chunk=PROMPTS_PER_CHUNK, memory_note=memory_note, rows=rows_of(entries, peaks))
    os.makedirs(out, exist_ok=True)
    paths = {ext: os.path.join(out, f"var_cross.{ext}") for ext in ("json", "md")}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1)
    md = markdown(results)
    with open(paths["md"], "w") as f:
        f.write(md)
    if show:
        print(md)
        print(f"wrote {paths['json']}, {paths['md']}")
    return results


def _cell(x: Any, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


FORMULA = {"diagonal": "0", "cross/chosen": "B^2", "cross/both": "2 B^2"}


def markdown(results: dict) -> str:
    """The report: the table first, then the cost in words, then how it was measured."""
    size, meta, rows = results["size"], results["meta"], results["rows"]
    lines = [f"### VAR cross pairs: cost of one FastPrefDPOTrainer step ({results['mode']}, cpu, toy Llama, fp32)", "",
             report.machine_line(meta, {"repeats": f"{size['warmup']} warm-up + {size['repeats']}"}), "",
             "| B | form | reference rows / step | formula | reference forwards | reward-model pairs (forwards) | "
             "policy rows | step ms | best ms | x diagonal | peak MiB |",
             "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c = r["counts"]
        ok = "" if r["matches_formula"] and r["counts_constant"] else " (differs from the formula!)"
        lines.append(f"| {r['b']} | {r['form']} | {c['ref_rows']} | {FORMULA[r['form']]} = {r['expected']['ref_rows']}"
                     f"{ok} | {c['ref_forwards']} | {c['reward_pairs']} ({c['reward_forwards']}) | {c['policy_rows']} | "
                     f"{r['median_s'] * 1e3:.1f} | {r['best_s'] * 1e3:.1f} | "
                     f"{_cell(r['x_diagonal'])} ({_cell(r['x_diagonal_best'])}) | {_cell(r['peak_mib'], '{:.1f}')} |")
    lines += ["", "**Cost.** Alg. 1 (`var_pairs=\"cross\"`) scores every prompt of the micro-batch with every in-batch "
              "response: the reference forwards grow as B^2 sequences per micro-batch with `var_responses=\"chosen\"` "
              "and 2 B^2 with `\"both\"` (B = `per_device_train_batch_size`), in ceil(B / `var_prompts_per_chunk`) "
              "no-grad forwards, plus as many reward-model scores; the policy's own forward runs S = B or 2B rows, "
              "so the reference scores B times as many sequences as the policy. The diagonal form (dataset reward columns, "
              "`normalize=\"self\"`) runs no reference and no reward model. Measured per B (median step time / the "
              "diagonal form's at the same B; fastest steps in brackets):", ""]
    for b in sorted({r["b"] for r in rows}):
        parts = [f"{r['form']} {r['counts']['ref_rows']} reference sequences, {_cell(r['x_diagonal'])}x "
                 f"({_cell(r['x_diagonal_best'])}x)" for r in rows if r["b"] == b and r["form"] != "diagonal"]
        lines.append(f"- B = {b}: " + "; ".join(parts) + ".")
    lines += ["", "How it was measured: one optimizer step (training_step: loss + backward, clipping, AdamW, scheduler, "
              "zero_grad) per trainer, batches collated beforehand; every trainer has its own copy of the same toy "
              "policy (= reference) and, for the cross forms, the same toy reward model (`(model, tokenizer)`). "
              "`reference rows`, `reward-model pairs`, `policy rows`: rows counted by forward hooks on the reference "
              "backbone, the reward model and the policy backbone during each step (the same on every step: "
              f"{all(r['counts_constant'] for r in rows)}); `formula`: what _trl_var.py's code path should run. "
              "`x diagonal`: this form's median / the diagonal form's median at the same B. The toy model is tiny "
              "(hidden 32, 2 layers), so step times are dominated by per-forward overhead; where compute dominates, "
              "the extra time is that of the B^2 (2 B^2) no-grad reference forwards next to the policy's S forwards "
              "and backwards (about B / 3 times the policy's own compute, before the reward model's). "
              f"loss: var, beta={results['beta']}, normalize=\"self\"; var_prompts_per_chunk="
              f"{results['prompts_per_chunk']}. `peak MiB`: memray peak of one step above what is alive before it "
              f"(bench/measure.py){'; ' + results['memory_note'] if results['memory_note'] else ''}.", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"B in {QUICK.batches}, {QUICK.repeats} timed steps, "
                        "no memory")
    parser.add_argument("--out", default=os.path.join("bench", "out"))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: tiny model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the memray step")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    if args.no_memory:
        size = dataclasses.replace(size, memory=False)
    run(size, args.out, "quick" if args.quick else "full", seed=args.seed, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
