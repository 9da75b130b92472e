"""``FastPrefKTOTrainer``: TRL's ``KTOTrainer`` with the fused KTO loss (:class:`fastpref.FusedKTOLoss`).

Only ``_compute_loss`` changes. TRL prepares the data as usual: paired data is unpaired, each completion gets a
``label`` (desirable or not) and, unless ``loss_type="apo_zero_unpaired"``, a mismatched "KL completion" (the
completions rotated by one within each ``per_device_train_batch_size`` block of the dataset), collated as
``KL_input_ids`` / ``KL_attention_mask`` / ``KL_completion_mask``. Here the policy runs its backbone only; the LM
head, the reference pass and the loss run in one fused module inside the wrapped model's forward, and the reference
point z0 = max(0, mean(S' - R')) over the mismatched pairs comes from a no-grad fused pass of the same module
(the policy's KL rows through a no-grad backbone forward, like TRL's). Options and metrics: docs/trainer.md.
"""
from __future__ import annotations

import contextlib
import types
from typing import Any, Dict, Optional, Tuple

import torch
from trl import KTOTrainer

from ..modules import LOSS_MODULES
from ..modules.base import with_extra_outputs
from ..reference.modules import LOSS_MODULES as EAGER_LOSS_MODULES
from ._trl_batches import Rows, check_loss_kwargs, scored_labels
from ._trl_reference import check_peft_head, head_in_autocast, reference_head, reference_hidden, reference_scope
from ._trl_window import KTOEffectiveBatch
from .distributed import through_sharded
from .transformers import LMHeadInputs, backbone_hidden, enable_hidden_forward, gather_lm_head, head_inputs, hf_model

#: ``KTOConfig.loss_type`` values this trainer runs: ``"kto"`` (z0 from the mismatched pairs) and
#: ``"apo_zero_unpaired"`` (the same sigmoid terms around 0: no KL completions, z0 = 0).
LOSS_TYPES = ("kto", "apo_zero_unpaired")
#: The op's per-sequence reductions behind TRL's ``entropy`` and ``logits/chosen``/``logits/rejected``.
VOCAB_OUTPUTS = ("entropy", "mean_logits")
#: Loss options that come from ``KTOConfig``, not from ``fastpref_loss_kwargs``.
CONFIG_OPTIONS = ("beta", "desirable_weight", "undesirable_weight", "z0")


def check_kto_config(args: Any) -> None:
    """Reject the ``KTOConfig`` options the fused path does not reproduce."""
    if args is None:
        return
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"FastPrefKTOTrainer supports KTOConfig.loss_type in {LOSS_TYPES}, got {args.loss_type!r}")
    if getattr(args, "use_liger_kernel", False):
        raise ValueError("FastPrefKTOTrainer computes the head with its own fused op: set use_liger_kernel=False")


class FastPrefKTOTrainer(KTOEffectiveBatch, KTOTrainer):
    """TRL ``KTOTrainer`` whose loss is :class:`fastpref.FusedKTOLoss` (LM head, reference and KL point fused).

    ``beta``, ``desirable_weight``, ``undesirable_weight``, ``loss_type``, ``precompute_ref_log_probs`` and
    ``max_length`` are read from ``KTOConfig`` as TRL reads them.

    Args (in addition to ``KTOTrainer``'s):
        fastpref_loss_kwargs: constructor options of the fused module other than the loss's hyper-parameters
            (``ignore_index=``, ``backend=``, ``stats_group=``); not ``temperature``/``softcap``, which come from
            the model config.
        fastpref_eager: use the eager twin from ``fastpref.reference`` (full logits) instead, e.g. to debug.
    """

    _tag_names = ["trl", "kto", "fastpref"]
    _name = "FastPref KTO"

    def __init__(self, *args: Any, fastpref_loss_kwargs: Optional[Dict[str, Any]] = None,
                 fastpref_eager: bool = False, **kwargs: Any) -> None:
        loss_kwargs = dict(fastpref_loss_kwargs or {})
        check_loss_kwargs(loss_kwargs)
        given = [k for k in CONFIG_OPTIONS if k in loss_kwargs]
        if given:
            raise ValueError(f"fastpref_loss_kwargs must not set {', '.join(given)}: FastPrefKTOTrainer reads beta, "
                             "desirable_weight and undesirable_weight from KTOConfig, and z0 from the KL completions")
        check_kto_config(kwargs.get("args", args[2] if len(args) > 2 else None))
        super().__init__(*args, **kwargs)
        self._check_model()
        cls = (EAGER_LOSS_MODULES if fastpref_eager else LOSS_MODULES)["FusedKTOLoss"]
        loss_kwargs = with_extra_outputs(loss_kwargs, VOCAB_OUTPUTS)  # the reductions behind TRL's vocabulary metrics
        self.fastpref_loss_fn = cls(beta=self.beta, desirable_weight=self.desirable_weight,
                                    undesirable_weight=self.undesirable_weight, **loss_kwargs)
        self.fastpref_loss_fn.to(self.accelerator.device)
        enable_hidden_forward(hf_model(self.model))
        if self.ref_model is not None:
            enable_hidden_forward(hf_model(self.ref_model))

    def _check_model(self) -> None:
        if self.loss_type not in LOSS_TYPES:  # args=None: TRL's default config
            raise ValueError(f"FastPrefKTOTrainer supports loss_type in {LOSS_TYPES}, got {self.loss_type!r}")
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError(
                "FastPrefKTOTrainer does not reproduce the MoE router auxiliary loss (router_aux_loss_coef="
                f"{self.router_aux_loss_coef} for {type(hf_model(self.model)).__name__}): set "
                "KTOConfig(router_aux_loss_coef=0.0) to train without it")
        if self._is_vision_dataset:
            raise NotImplementedError("FastPrefKTOTrainer does not support vision datasets (the backbone call takes "
                                      "text inputs only)")
        check_peft_head(self.model, "FastPrefKTOTrainer")

    # -- the loss -------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        loss_fn = self.fastpref_loss_fn
        loss_fn.train(mode == "train")
        device = self.accelerator.device
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
        rows = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        kl_rows: Optional[Rows] = None
        kl_hidden = None
        if self.calculate_KL and self.window_z0() is None:  # else z0 is the step's (_trl_window)
            missing = [k for k in ("KL_input_ids", "KL_attention_mask", "KL_completion_mask") if k not in batch]
            if missing:
                raise ValueError(f"loss_type={self.loss_type!r} needs the KL completions: the batch lacks {missing} "
                                 "(use TRL's DataCollatorForUnpairedPreference)")
            kl_rows = (batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
            with torch.no_grad():  # the policy on the mismatched pairs: no grad, as TRL's KL forward
                kl_hidden = backbone_hidden(model(input_ids=kl_rows[0], attention_mask=kl_rows[1],
                                                  fastpref_hidden=True))

        def head_loss(hidden: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
            # inside the wrapped model's forward (DDP's unused-parameter search, FSDP2 roots), as FastPrefDPOTrainer
            head = hf_model(model).get_output_embeddings()
            return through_sharded(head, lambda: self._fused_loss(model, hidden, rows, kl_rows, kl_hidden, batch))

        loss, metrics = model(input_ids=rows[0], attention_mask=rows[1], fastpref_head_fn=head_loss)
        self._log_metrics(mode, metrics, batch)
        if return_outputs:
            return loss, types.SimpleNamespace(logits=None, metrics=metrics)
        return loss

    def _head_inputs(self, model, hidden, input_ids, completion_mask, head) -> LMHeadInputs:
        """Packed head inputs of the completion tokens of ``input_ids`` with the gathered ``head``."""
        labels, keep = scored_labels(input_ids, completion_mask, self.fastpref_loss_fn.ignore_index)
        hidden, weight, bias = head_in_autocast(self.accelerator, hidden, *head)
        return head_inputs(model, hidden, labels, logits_to_keep=keep, ignore_index=self.fastpref_loss_fn.ignore_index,
                           weight=weight, bias=bias)

    def _fused_loss(self, model, hidden, rows: Rows, kl_rows: Optional[Rows], kl_hidden: Optional[torch.Tensor],
                    batch: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``(loss, metrics)`` of the fused KTO loss on the policy's final hidden states."""
        call: Dict[str, Any] = {"labels": batch["label"].to(torch.bool)}
        with contextlib.ExitStack() as stack:
            head = stack.enter_context(gather_lm_head(model))  # the policy's head, before the reference scope opens
            main = self._head_inputs(model, hidden, rows[0], rows[2], head)
            kl = None if kl_rows is None else self._head_inputs(model, kl_hidden, kl_rows[0], kl_rows[2], head)
            if kl is not None:
                call.update(kl_hidden=kl.hidden, kl_targets=kl.targets, kl_seq_ids=kl.seq_ids, kl_num_seqs=kl.num_seqs)
            else:  # the step's z0 under accumulation, or apo_zero_unpaired's 0 (the sigmoid terms around 0)
                call["z0"] = 0.0 if self.window_z0() is None else self.window_z0()
            if self.precompute_ref_logps:
                call["ref_logps"] = batch["ref_logps"]
                if kl is not None:
                    call["kl_ref_logps"] = batch["ref_KL_logps"]
            else:
                call.update(self._reference_call(model, stack, rows, kl_rows, kl))
            out = self.fastpref_loss_fn(main.weight, main.hidden, main.targets, **main.head_kwargs(), **call)
        return out.loss, out.metrics

    def _reference_call(self, model, stack: contextlib.ExitStack, rows: Rows, kl_rows: Optional[Rows],
                        kl: Optional[LMHeadInputs]) -> Dict[str, Any]:
        """The loss keywords of the reference: its head and its hidden states on the batch and on the KL rows.

        Both are read in the reference scope (a PEFT policy's adapters off), which closes before the loss runs:
        PEFT's adapter switch also clears ``requires_grad`` of ``modules_to_save`` copies, so a head copy used
        inside it would get no gradient. The reference head's gather stays open on ``stack`` until the loss is done.
        """
        ref_model = self.ref_model
        ref_head = stack.enter_context(reference_head(model, ref_model))
        with reference_scope(model, ref_model):

            def packed(input_ids, attention_mask, completion_mask) -> LMHeadInputs:
                with self.accelerator.autocast():  # the patched forward skips accelerate's autocast wrapper
                    ref_hidden = reference_hidden(model, ref_model, input_ids=input_ids, attention_mask=attention_mask)
                return self._head_inputs(model, ref_hidden, input_ids, completion_mask, ref_head)

            ref = packed(*rows)  # its weight/bias: the reference head in the head's dtype
            call = dict(ref_hidden=ref.hidden, ref_weight=ref.weight, ref_bias=ref.bias)
            if kl is not None:
                call["kl_ref_hidden"] = packed(*kl_rows).hidden
        return call

    # -- logging --------------------------------------------------------------------------------------

    def _log_metrics(self, mode: str, metrics: Dict[str, torch.Tensor], batch: Dict[str, Any]) -> None:
        """TRL's KTO metrics from the fused pass: ``kl`` (z0), ``rewards/*`` and ``logps/*`` (sums over the global
        batch divided by its desirable / undesirable counts), ``rewards/margins`` and ``num_tokens``."""
        gather = self.accelerator.gather
        store = self._metrics[mode]
        labels = batch["label"].to(torch.bool)
        store["kl"].append(float(metrics["z0"]))
        if mode == "train":
            self._total_train_tokens += int(gather(batch["attention_mask"].sum()).sum().item()) // self._tp_size
        store["num_tokens"] = [self._total_train_tokens]
        logps = metrics["logps"].detach().float()
        rewards = metrics["rewards"].detach().float()
        for side, mask in (("chosen", labels), ("rejected", ~labels)):
            count = gather(mask.sum()).sum().item()
            if count > 0:
                store[f"rewards/{side}"].append(gather(rewards[mask].nansum()).nansum().item() / count)
                store[f"logps/{side}"].append(gather(logps[mask].nansum()).nansum().item() / count)
        if gather(labels.sum()).sum().item() > 0 and gather((~labels).sum()).sum().item() > 0:
            store["rewards/margins"].append(store["rewards/chosen"][-1] - store["rewards/rejected"][-1])
        self._log_vocab_metrics(store, metrics, batch["completion_mask"][:, 1:].sum(dim=1), labels)

    def _log_vocab_metrics(self, store, metrics: Dict[str, torch.Tensor], tokens: torch.Tensor,
                           labels: torch.Tensor) -> None:
        """``entropy`` (over every scored token of the global batch) and ``logits/chosen`` / ``logits/rejected``
        (the vocabulary-mean logit over the desirable / undesirable scored tokens), from the op's per-sequence
        sums, token-weighted across processes."""
        gather = self.accelerator.gather
        if "entropy" in metrics:
            total = gather(tokens.sum()).sum().item()
            store["entropy"].append(gather(metrics["entropy"].float().sum()).sum().item() / total if total else 0.0)
        if "mean_logits" in metrics:
            for side, mask in (("chosen", labels), ("rejected", ~labels)):
                count = gather(tokens[mask].sum()).sum().item()
                if count > 0:
                    store[f"logits/{side}"].append(gather(metrics["mean_logits"][mask].float().sum()).sum().item()
                                                   / count)


__all__ = ["FastPrefKTOTrainer", "LOSS_TYPES", "VOCAB_OUTPUTS", "check_kto_config"]
