"""Checkpointing of the loss state of :class:`fastpref.integrations.trl.FastPrefDPOTrainer` (a mixin).

The HF Trainer saves the model, optimizer, scheduler, RNG states and ``TrainerState``; the state the fastpref
trainer keeps outside the model is saved here, into the same checkpoint folder, and read back on
``train(resume_from_checkpoint=...)``:

* the loss module's buffers (alpha-DPO's running ``margin_mean`` / ``margin_std`` / ``num_updates``, ...),
* the state of the loss module's own ``torch.Generator`` (MC-PO's ``generator=``; without one MC-PO draws from
  the global RNG, which the HF Trainer restores itself),
* SPO's online-sample cache ``_spo_cache`` (the step it was drawn at and the rows of each accumulation
  micro-batch),
* OnMC-PO's cache of generated groups ``_onmcpo_cache`` (the segment each prompt's group was drawn in),
* the running token count behind the logged ``num_tokens``.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional

import torch

#: The file written into each ``checkpoint-<step>`` folder.
STATE_NAME = "fastpref_state.pt"


class LossStateCheckpoint:
    """Saves and restores the trainer's loss state with each checkpoint; reads ``fastpref_loss_fn``,
    ``_spo_cache``, ``_onmcpo_cache`` and ``_total_train_tokens`` of the trainer. Only the main process writes (the state is
    replicated across ranks); every rank reads."""

    def fastpref_state_dict(self) -> Dict[str, Any]:
        """The loss state as CPU tensors (see the module docstring)."""
        loss_fn = self.fastpref_loss_fn
        generator = getattr(loss_fn, "generator", None)
        cache = self._spo_cache
        return {
            "buffers": {name: b.detach().cpu().clone() for name, b in loss_fn.named_buffers()},
            "generator": generator.get_state() if isinstance(generator, torch.Generator) else None,
            "spo_cache": None if cache is None else (
                cache[0], tuple(tuple(t.detach().cpu().clone() for t in rows) for rows in cache[1])),
            "onmcpo_cache": {key: (segment, [t.detach().cpu().clone() for t in group])
                             for key, (segment, group) in getattr(self, "_onmcpo_cache", {}).items()},
            "total_train_tokens": int(getattr(self, "_total_train_tokens", 0)),
        }

    def load_fastpref_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`fastpref_state_dict`'s output (tensors go back to the buffers' / accelerator's device)."""
        loss_fn = self.fastpref_loss_fn
        buffers = dict(loss_fn.named_buffers())
        if set(state["buffers"]) != set(buffers):
            raise ValueError(f"{STATE_NAME}: loss buffers {sorted(state['buffers'])} do not match the loss module's "
                             f"{sorted(buffers)} (was the checkpoint written with another fastpref_loss?)")
        with torch.no_grad():
            for name, value in state["buffers"].items():
                buffers[name].copy_(value)
        generator = getattr(loss_fn, "generator", None)
        if state["generator"] is not None:
            if not isinstance(generator, torch.Generator):
                raise ValueError(f"{STATE_NAME} holds a loss generator state but the loss module has no generator "
                                 "(pass the same fastpref_loss_kwargs generator= as the saved run)")
            generator.set_state(state["generator"])
        cache = state["spo_cache"]
        device = self.accelerator.device
        self._spo_cache = None if cache is None else (
            cache[0], tuple(tuple(t.to(device) for t in rows) for rows in cache[1]))
        self._onmcpo_cache = dict(state.get("onmcpo_cache", {}))  # CPU tensors, as the trainer keeps them
        self._total_train_tokens = state["total_train_tokens"]

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save(self.fastpref_state_dict(), os.path.join(folder, STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        # Runs on every resume (plain, DDP, FSDP and DeepSpeed alike), after the model is prepared and before the
        # first resumed step; _load_from_checkpoint is skipped under DeepSpeed and _load_rng_state under
        # ignore_data_skip, so the loss state is restored here.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, STATE_NAME)
        if not os.path.isfile(path):
            warnings.warn(f"resume_from_checkpoint={checkpoint!r} has no {STATE_NAME}: the fastpref loss state "
                          "(alpha-DPO's running statistics, SPO's samples, ...) starts afresh, so the resumed run "
                          "differs from an uninterrupted one", stacklevel=2)
            return
        self.load_fastpref_state_dict(torch.load(path, map_location="cpu", weights_only=True))
