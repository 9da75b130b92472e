"""Trainer-step benchmark: one optimizer step of FastPrefDPOTrainer against TRL's DPOTrainer (plain and with
``use_liger_kernel=True``) for DPO, and against its eager twin (``fastpref_eager=True``, full logits) for the
seed losses VAR, MC-PO and SPO, which have no TRL implementation.

    python -m fastpref.bench.trainer_step [--quick] [--out DIR] [--threads 2]

Every trainer gets the same small Llama (same seed: policy = reference at step 1), the same tokenized data and
the same batches in the same order. A step is what ``Trainer.train`` runs per optimizer step without gradient
accumulation: ``training_step`` (TRL's or fastpref's loss, backward), gradient clipping, AdamW, scheduler,
``zero_grad``; batches are collated beforehand, so data loading is not timed. Warm-up steps, then timed steps
interleaved round-robin across all trainers (the order rotates each round); median, best and spread of the timed
steps. Peak memory: memray, one step of each trainer in its own tracked region after its timed steps (the
suite's CPU method, bench/measure.py; without memray the report says memory was not measured). Parameters, AdamW
state and the reference model are alive before the region and the same size for every trainer, so the peak counts
what the step itself allocates: activations, logits or their tiles, the fresh gradients (``zero_grad`` frees them),
the optimizer's temporaries. Writes ``trainer_step.json`` and ``trainer_step.md`` first, then ``trainer_step.png``
(skipped with a note without matplotlib).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

from . import measure, peers, runner  # noqa: E402
from .trainer_step_report import evaluate_targets, key, markdown, rows_of, write_plot  # noqa: E402


@dataclass(frozen=True)
class Size:
    """Model, data and repeats of one run."""
    vocab: int = 32000
    hidden: int = 256
    intermediate: int = 512
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    prompt_len: int = 48  # tokens; completions take prompt_len + completion_len up to max_length
    completion_len: int = 80
    pairs: int = 4  # prompts per batch (DPO: 4 chosen + 4 rejected rows)
    candidates: int = 3  # MC-PO's K non-preferred responses per prompt
    warmup: int = 2
    repeats: int = 7

    @property
    def max_length(self) -> int:
        return self.prompt_len + self.completion_len


FULL = Size()
QUICK = Size(warmup=1, repeats=3)
# (loss, trainer, peer): "trl+liger" is TRL's DPOTrainer with use_liger_kernel=True; "eager" the eager twin.
TRAINERS = (("dpo", "fastpref", "trl"), ("dpo", "fastpref-4gemm", "trl"), ("dpo", "trl", None), ("dpo", "trl+liger", None),
            ("var", "fastpref", "eager"), ("var", "eager", None), ("mcpo", "fastpref", "eager"),
            ("mcpo", "eager", None), ("spo", "fastpref", "eager"), ("spo", "eager", None))
# Loss options of the seed losses (VAR's beta is required; SPO reads the batch's chosen responses, so that no
# generation lands inside a timed step: the paper's in-dataset token-KL variant).
LOSS_KWARGS = {"dpo": {}, "var": dict(beta=1.0), "mcpo": dict(beta=0.5, num_negatives=1),
               "spo": dict(alpha=0.01, kl_coef=0.1)}
PROFILED = ("dpo/fastpref", "dpo/trl")
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::linear")


# ---------------------------------------------------------------------------------------------------------------
# model, tokenizer, data


def word_tokenizer(vocab: int):
    """A word-level tokenizer with ``vocab`` entries (3 specials + words ``w0``...): one token per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "</s>"]
    words = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(vocab - len(specials))])}
    core = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def llama(size: Size, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.kv_heads, max_position_embeddings=size.max_length + 8,
                         pad_token_id=0, eos_token_id=2, bos_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def preference_rows(size: Size, loss: str, rows: int, seed: int):
    """Random words: prompts of ``prompt_len``, responses of 3/4 to all of ``completion_len - 1`` words (EOS
    fills the last token). VAR gets reward columns, MC-PO ``candidates`` (``rejected`` = the first one)."""
    from datasets import Dataset

    rng = random.Random(seed)
    words = size.vocab - 3
    text = lambda n: " ".join(f"w{rng.randrange(words)}" for _ in range(n))  # noqa: E731
    response = lambda: " " + text(rng.randint(3 * (size.completion_len - 1) // 4, size.completion_len - 1))  # noqa: E731
    data: Dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(rows):
        data["prompt"].append(text(size.prompt_len))
        data["chosen"].append(response())
        data["rejected"].append(response())
        if loss == "var":
            data.setdefault("chosen_reward", []).append(1.0 + rng.random())
            data.setdefault("rejected_reward", []).append(rng.random() - 1.0)
        if loss == "mcpo":
            data.setdefault("candidates", []).append([data["rejected"][-1]] + [response()
                                                                              for _ in range(size.candidates - 1)])
    return Dataset.from_dict(data)


def build_trainer(loss: str, impl: str, size: Size, data, tokenizer, out_dir: str, seed: int, steps: int):
    """One trainer, its optimizer and scheduler created as ``Trainer.train`` creates them."""
    from trl import DPOConfig

    args = DPOConfig(output_dir=out_dir, per_device_train_batch_size=size.pairs, max_steps=steps,
                     learning_rate=1e-4, report_to="none", use_cpu=True, bf16=False, fp16=False, seed=seed,
                     save_strategy="no", logging_steps=1, dataloader_num_workers=0, beta=0.1,
                     disable_dropout=True, max_length=size.max_length, use_liger_kernel=impl == "trl+liger")
    common = dict(model=llama(size, seed), ref_model=llama(size, seed), args=args, train_dataset=data,
                  processing_class=tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's deprecation notice for use_liger_kernel
        if impl.startswith("trl"):
            from trl import DPOTrainer

            trainer = DPOTrainer(**common)
        else:
            from fastpref.integrations.trl import FastPrefDPOTrainer

            kwargs = dict(LOSS_KWARGS[loss])
            if impl == "fastpref-4gemm":  # dH, dW formed in the loss's forward (docs/api.md §3.1)
                from fastpref import KernelOptions

                kwargs["kernel_options"] = KernelOptions(grad_in_forward=True)
            trainer = FastPrefDPOTrainer(**common, fastpref_loss=loss, fastpref_loss_kwargs=kwargs,
                                         fastpref_eager=impl == "eager", spo_samples="dataset")
    patches = liger_patches(trainer) if args.use_liger_kernel else {}
    ready(trainer, steps)
    return trainer, patches


def ready(trainer, steps: int) -> None:
    """Set up ``trainer`` for :func:`optimizer_step` as ``Trainer.train`` does before its loop: optimizer and
    scheduler for ``steps`` steps, no gradient accumulation."""
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop; training_step divides by it
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)


def liger_patches(trainer) -> Dict[str, Any]:
    """Apply Liger's kernels as ``Trainer.train`` does first. Besides the model's own modules, Liger replaces
    globals of ``modeling_llama`` (``apply_rotary_pos_emb``, the norm and MLP classes), which would swap Liger
    into every other trainer of this process: those globals are put back and returned, to be set again only
    around this trainer's steps (:func:`swapped`)."""
    from transformers.integrations.liger import apply_liger_kernel
    from transformers.models.llama import modeling_llama

    before = dict(vars(modeling_llama))
    apply_liger_kernel(trainer.model, trainer.args.liger_kernel_config)
    patched = {k: v for k, v in vars(modeling_llama).items() if before.get(k) is not v}
    for name in patched:
        setattr(modeling_llama, name, before[name])
    return patched


@contextlib.contextmanager
def swapped(values: Dict[str, Any]):
    """``modeling_llama``'s globals set to ``values`` for the block (nothing to do for an empty dict)."""
    if not values:
        yield
        return
    from transformers.models.llama import modeling_llama

    saved = {k: getattr(modeling_llama, k) for k in values}
    vars(modeling_llama).update(values)
    try:
        yield
    finally:
        vars(modeling_llama).update(saved)


def batches(trainer, per_batch: int, count: int) -> List[dict]:
    """``count`` collated batches of ``per_batch`` consecutive rows of the trainer's dataset (wrapping around; the
    same rows for every trainer built on the same data)."""
    rows = len(trainer.train_dataset)
    return [trainer.data_collator([trainer.train_dataset[(i * per_batch + j) % rows] for j in range(per_batch)])
            for i in range(count)]


def optimizer_step(trainer, batch: dict) -> float:
    """One optimizer step as Trainer.train runs it (no gradient accumulation); returns the loss."""
    loss = trainer.training_step(trainer.model, batch)
    if trainer.args.max_grad_norm:
        trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.model.zero_grad(set_to_none=True)
    trainer.state.global_step += 1
    return float(loss)


def scored_tokens(batch: dict) -> int:
    """Non-padding tokens (prompt + response) of the rows the loss scores: chosen and rejected, or MC-PO's
    group of chosen + K candidates per prompt."""
    return int(batch.get("group_attention_mask", batch["attention_mask"]).sum())


# ---------------------------------------------------------------------------------------------------------------
# measuring


@dataclass
class Entry:
    loss: str
    impl: str
    peer: Optional[str]
    trainer: Any = None
    patches: Dict[str, Any] = dataclasses.field(default_factory=dict)  # Liger's modeling_llama globals
    batches: List[dict] = dataclasses.field(default_factory=list)
    losses: List[float] = dataclasses.field(default_factory=list)
    error: Optional[str] = None

    @property
    def name(self) -> str:
        return key(self.loss, self.impl)

    def step(self) -> bool:
        """One optimizer step on the next batch (batch ``i`` at the ``i``-th step: a step that fails ends the
        trainer, so the steps taken are the losses recorded); False if this trainer cannot run. TRL + Liger may
        fail at its first step (Liger's layer kernels are Triton, which needs a GPU driver): the reason is
        recorded for the report instead of a number. Any other failure is a bug: raised."""
        if self.error is not None:
            return False
        try:
            with swapped(self.patches):
                self.losses.append(optimizer_step(self.trainer, self.batches[len(self.losses) % len(self.batches)]))
        except Exception as exc:  # noqa: BLE001 - recorded for the report, re-raised for every other trainer
            if self.impl != "trl+liger" or self.losses:
                raise
            self.error, self.trainer = _first_line(exc), None
            return False
        return True


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()


def build_all(size: Size, seed: int, tmp: str, losses: Sequence[str]) -> List[Entry]:
    tokenizer = word_tokenizer(size.vocab)
    steps = size.warmup + size.repeats + 2
    entries = []
    for loss, impl, peer in TRAINERS:
        if loss not in losses:
            continue
        entry = Entry(loss, impl, peer)
        data = preference_rows(size, loss, rows=size.pairs * steps, seed=seed)
        entry.trainer, entry.patches = build_trainer(loss, impl, size, data, tokenizer, os.path.join(tmp, loss, impl),
                                                     seed, steps)
        entry.batches = batches(entry.trainer, size.pairs, steps)
        entries.append(entry)
    return entries


def profile_step(entry: Entry, top: int = 10) -> dict:
    """torch.profiler (CPU) of one more step: the ``top`` ops by self time and the GEMM share."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        entry.step()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
    ops = [{"op": e.key, "calls": e.count, "self_s": round(e.self_cpu_time_total / 1e6, 3),
            "share": round(e.self_cpu_time_total / total, 3)}
           for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]]
    return {"step_s": round(wall, 3), "self_s": round(total / 1e6, 3), "gemm_share": round(gemm / total, 3),
            "ops": ops}


def measure_all(entries: List[Entry], size: Size, show: bool, profile: bool) -> dict:
    """Warm-up, interleaved timed rounds, one memray step each, then (``profile``) one profiled step each."""
    from tqdm.auto import tqdm

    total = len(entries) * (size.warmup + size.repeats + 1) + (len(PROFILED) if profile else 0)
    profiles: Dict[str, dict] = {}
    with tqdm(total=total, disable=not show, desc="trainer steps", file=sys.stderr) as bar:
        for _ in range(size.warmup):
            for e in entries:
                bar.set_postfix_str(f"warm-up {e.name}")
                e.step()
                bar.update()
        live = [e for e in entries if e.error is None]  # a trainer that failed in warm-up is not timed
        bar.set_postfix_str("timed rounds")
        timed = measure.time_interleaved({e.name: e.step for e in live}, size.repeats, torch.device("cpu"),
                                         on_step=lambda name: bar.update())
        # without warm-up, TRL + Liger fails at its first timed step: what was timed is its failure, dropped
        live = [e for e in live if e.error is None]
        times = {e.name: timed[e.name].times_s for e in live}
        tokens = {e.name: [scored_tokens(e.batches[(size.warmup + r) % len(e.batches)]) for r in range(size.repeats)]
                  for e in live}
        bar.set_postfix_str("memory")
        memory = measure.cpu_step_peaks({e.name: e.step for e in live})
        bar.update(len(live))
        for e in live:
            if profile and e.name in PROFILED:
                bar.set_postfix_str(f"profile {e.name}")
                profiles[e.name] = profile_step(e)
                bar.update()
    return {"times": times, "tokens": tokens, "memory": memory, "profiles": profiles}


# ---------------------------------------------------------------------------------------------------------------
# driver


def run(size: Size, out: str, mode: str, seed: int = 0, threads: int = 2, show: bool = True,
        profile: bool = True, losses: Sequence[str] = ("dpo", "var", "mcpo", "spo")) -> dict:
    """Measure, then write ``trainer_step.json`` and ``.md`` under ``out``, then the plot; returns the results."""
    torch.set_num_threads(threads)
    meta = runner.environment(runner.Config(threads=threads))
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastpref-trainer-step-") as tmp:
        entries = build_all(size, seed, tmp, losses)
        measured = measure_all(entries, size, show, profile)
    meta["load_avg_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    meta["elapsed_s"] = round(time.perf_counter() - began, 1)
    rows = rows_of(entries, measured)
    settings = {loss: dict(LOSS_KWARGS[loss]) for loss in losses}
    settings.get("mcpo", {})["candidates"] = size.candidates
    settings.get("spo", {})["spo_samples"] = "dataset (the batch's chosen responses: no generation in a timed step)"
    results = dict(mode=mode, size=dataclasses.asdict(size), meta=meta, seed=seed, rows=rows, settings=settings,
                   targets=evaluate_targets(rows), profiles=measured["profiles"],
                   memory_note=None if peers.is_installed("memray") else runner.MEMORY_NOT_MEASURED)
    os.makedirs(out, exist_ok=True)
    paths = {ext: os.path.join(out, f"trainer_step.{ext}") for ext in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1)
    md = markdown(results)
    with open(paths["md"], "w") as f:
        f.write(md)
    plot = write_plot(results, paths["png"])
    if show:
        print(md)
        print(f"wrote {paths['json']}, {paths['md']}" + (f", {plot}" if plot else " (no plot: matplotlib missing)"))
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK.warmup} warm-up + {QUICK.repeats} timed steps")
    parser.add_argument("--out", default=os.path.join("bench", "out"))
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler steps")
    parser.add_argument("--render", metavar="JSON", help="only rewrite trainer_step.md and .png under --out from "
                        "a trainer_step.json (no measuring)")
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            results = json.load(f)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "trainer_step.md"), "w") as f:
            f.write(markdown(results))
        write_plot(results, os.path.join(args.out, "trainer_step.png"))
        return 0
    run(QUICK if args.quick else FULL, args.out, "quick" if args.quick else "full", seed=args.seed,
        threads=args.threads, profile=not args.no_profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
