"""``FastPrefDPOTrainer``: TRL's ``DPOTrainer`` with any fastpref fused loss.

Only ``_compute_loss`` changes: the policy runs its backbone, and the LM head, the reference pass and the
loss run in one fused module inside the wrapped model's forward. Which loss needs which data columns, the
metrics, the head options read from the model config, what is not supported and the distributed setups
are in docs/trainer.md.
"""
from __future__ import annotations

import contextlib
import types
from typing import Any, Dict, Optional, Tuple

import torch
from trl import DPOTrainer

from ..modules import LOSS_MODULES
from ..modules.base import _PairwiseLoss, with_extra_outputs
from ..reference.modules import LOSS_MODULES as EAGER_LOSS_MODULES
from ._trl_batches import (
    REWARD_COLUMNS,
    FastPrefCollator,
    Rows,
    cat_rows,
    check_config,
    check_loss_kwargs,
    pack_rows,
    scored_labels,
    select_group_rows,
    tokenize_candidates,
    unpack_hidden,
)
from ._trl_config import check_family_fields, loss_class_and_kwargs
from ._trl_metrics import TRL_METRIC_NAMES, VOCAB_METRIC_OUTPUTS, store_metrics
from ._trl_onmcpo import OnlineMCPO
from ._trl_reference import check_peft_head, head_in_autocast, reference_head, reference_hidden, reference_scope
from ._trl_spo import SPOSamples
from ._trl_state import LossStateCheckpoint
from ._trl_var import VARTrainer
from ._trl_window import EffectiveBatchStatistics
from .distributed import through_sharded
from .transformers import (
    LMHeadInputs,
    enable_hidden_forward,
    gather_lm_head,
    head_inputs,
    hf_model,
    is_peft,
)


def _trainer_name(class_name: str) -> str:
    """The ``fastpref_loss`` name of a registry class: ``"FusedSimPOLoss"`` -> ``"simpo"`` (alpha-DPO keeps
    its word break: ``"alpha_dpo"``)."""
    core = class_name[len("Fused"):-len("Loss")].lower()
    return {"alphadpo": "alpha_dpo"}.get(core, core)


#: Losses of :data:`fastpref.modules.LOSS_MODULES` this trainer does not run, and why.
UNSUPPORTED = {"kto": "KTO trains on unpaired data: use TRL's KTOTrainer"}
# All derived from the registry: fastpref_loss name -> class name (the fused class, or its eager twin).
LOSSES = {_trainer_name(n): n for n in LOSS_MODULES if _trainer_name(n) not in UNSUPPORTED}
#: The losses of the pairwise layout (chosen rows, then rejected rows), SPO aside (it adds a KL batch).
PAIRWISE = {name: n for name, n in LOSSES.items() if issubclass(LOSS_MODULES[n], _PairwiseLoss)}
OTHER = {name: n for name, n in LOSSES.items() if name not in PAIRWISE}



class FastPrefDPOTrainer(VARTrainer, OnlineMCPO, EffectiveBatchStatistics, LossStateCheckpoint, SPOSamples, DPOTrainer):
    """TRL ``DPOTrainer`` whose loss is a fastpref fused loss (see the module docstring for the losses and data).

    Args (in addition to ``DPOTrainer``'s):
        fastpref_loss: one of ``fastpref.integrations.trl.LOSSES`` (``"dpo"``, ``"var"``, ``"alpha_dpo"``,
            ``"mcpo"``, ``"spo"``, ``"ipo"``, ``"simpo"``, ``"slic"``, ``"dpop"``, ``"orpo"``, ``"cpo"``).
        fastpref_loss_kwargs: constructor arguments of the fused module (``beta=``, ``alpha=``, ``kl_coef=``,
            ``num_negatives=``, ``ignore_index=``, ``backend=``, ...); not ``temperature``/``softcap``, which
            come from the model config.
        fastpref_eager: use the eager twin from ``fastpref.reference`` (full logits) instead, e.g. to debug.
        var_responses: ``"both"`` (chosen and rejected responses) or ``"chosen"``; ``var_pairs``: ``"cross"``
            (Alg. 1 with ``reward_model``, the default when one is given) or ``"diagonal"`` (reward columns);
            ``var_prompts_per_chunk``: prompts per cross-pair reference forward. docs/trainer.md, VAR.
        reward_model: a ``RewardModel``, ``(model, tokenizer)`` or a callable ``(prompts, completions) -> scores``
            (stored as ``fastpref_reward_model``).
        mcpo_online: OnMC-PO (generate ``mcpo_num_generations`` completions per prompt with the policy, rank them with
            ``reward_model``: best = y0, the rest candidates; regenerated every ``mcpo_regenerate_every`` steps;
            ``mcpo_max_new_tokens`` None: from the data). docs/trainer.md, OnMC-PO.
        spo_samples: ``"online"`` or ``"dataset"``; ``spo_num_samples`` (per prompt), ``spo_resample_every``,
            ``spo_max_new_tokens`` (None: from the data) tune the online sampling; ``spo_mode``: ``"pairs"``,
            ``"best_of_n"`` or ``"ranked"`` (``responses`` + ``ranks``/``scores`` data). docs/trainer.md, SPO.
    """

    _tag_names = ["trl", "dpo", "fastpref"]
    _name = "FastPref DPO"

    def __init__(self, *args: Any, fastpref_loss: str = "dpo", fastpref_loss_kwargs: Optional[Dict[str, Any]] = None,
                 fastpref_eager: bool = False, var_responses: str = "both", spo_samples: str = "online",
                 spo_num_samples: int = 1, spo_resample_every: int = 1, spo_max_new_tokens: Optional[int] = None,
                 spo_mode: str = "pairs", var_pairs: Optional[str] = None, reward_model: Any = None,
                 var_prompts_per_chunk: int = 1, mcpo_online: bool = False, mcpo_num_generations: int = 4,
                 mcpo_regenerate_every: int = 1, mcpo_max_new_tokens: Optional[int] = None, **kwargs: Any) -> None:
        if fastpref_loss not in LOSSES:
            why = f" ({UNSUPPORTED[fastpref_loss]})" if fastpref_loss in UNSUPPORTED else ""
            raise ValueError(f"fastpref_loss must be one of {sorted(LOSSES)}, got {fastpref_loss!r}{why}")
        loss_kwargs = dict(fastpref_loss_kwargs or {})
        check_loss_kwargs(loss_kwargs)
        self.fastpref_loss = fastpref_loss

        args_ = kwargs.get("args", args[2] if len(args) > 2 else None)
        train_dataset = kwargs.get("train_dataset", args[4] if len(args) > 4 else None)
        loss_kwargs = self._spo_configure(loss_kwargs, train_dataset, spo_samples, spo_num_samples,
                                          spo_resample_every, spo_max_new_tokens, spo_mode)  # _trl_spo
        self._var_setup(fastpref_loss, reward_model, var_pairs, var_responses, var_prompts_per_chunk, args_)
        self._onmcpo_setup(fastpref_loss, mcpo_online, mcpo_num_generations, mcpo_regenerate_every,
                           mcpo_max_new_tokens)  # _trl_onmcpo
        check_config(args_, train_dataset, fastpref_loss, reward_columns=fastpref_loss == "var" and self.var_pairs
                     == "diagonal", candidates=fastpref_loss == "mcpo" and not mcpo_online)
        check_family_fields(args_, fastpref_loss)
        # DPOConfig(padding_free=True): TRL 1.16 turns it off with a warning; fastpref packs the rows itself
        self.fastpref_padding_free = bool(getattr(args_, "padding_free", False))
        if self.fastpref_padding_free:
            args_.padding_free = False
        try:
            super().__init__(*args, **kwargs)
        finally:
            if self.fastpref_padding_free:
                args_.padding_free = True
        self._check_model()
        self.fastpref_loss_fn = self._build_loss(loss_kwargs, fastpref_eager)
        self.fastpref_loss_fn.to(self.accelerator.device)
        self._needs_reference = self._uses_reference()
        self._check_reference()
        self._var_ready()
        enable_hidden_forward(hf_model(self.model))
        if self.ref_model is not None:
            # The reference runs through its own (possibly wrapped) forward: FSDP / DeepSpeed hooks on the reference
            # root gather what it owns (embeddings, final norm) only around that forward.
            enable_hidden_forward(hf_model(self.ref_model))
        self.data_collator = FastPrefCollator(
            base=self.data_collator, pad_token_id=self._tokenizer.pad_token_id,
            reward_columns=REWARD_COLUMNS if fastpref_loss == "var" and self.var_pairs == "diagonal" else (),
            candidates=fastpref_loss == "mcpo" and not mcpo_online, max_length=self.args.max_length,
            responses=spo_mode != "pairs")

    # -- construction ---------------------------------------------------------------------------------

    def _check_model(self) -> None:
        if getattr(self, "aux_loss_enabled", False):
            # TRL adds router_aux_loss_coef * outputs.aux_loss (the MoE load-balancing loss), which the *ForCausalLM
            # forward computes from the router logits; fastpref runs the backbone only, so it would silently drop it.
            raise ValueError(
                "FastPrefDPOTrainer does not reproduce the MoE router auxiliary loss (router_aux_loss_coef="
                f"{self.router_aux_loss_coef} for {type(hf_model(self.model)).__name__}): set "
                "DPOConfig(router_aux_loss_coef=0.0) to train without it")
        check_peft_head(self.model, "FastPrefDPOTrainer")
        if self._is_vision_dataset:
            raise NotImplementedError("FastPrefDPOTrainer does not support vision datasets (the backbone call takes "
                                      "text inputs only)")

    def _check_reference(self) -> None:
        name, peft = self.fastpref_loss, is_peft(self.model)
        if self._needs_reference and not self.precompute_ref_logps and self.ref_model is None and not peft:
            raise ValueError(f"fastpref_loss={name!r} needs a reference model")
        needs_ref_model = name == "mcpo" or (name == "spo" and self.fastpref_loss_fn.kl_coef > 0)
        if needs_ref_model and self.ref_model is None and not peft:
            raise ValueError(f"fastpref_loss={name!r} needs ref_model (its reference log-probs cannot be "
                             "precomputed by TRL): pass ref_model and precompute_ref_log_probs=False")

    def _build_loss(self, kwargs: Dict[str, Any], eager: bool) -> torch.nn.Module:
        """The fused loss from ``DPOConfig`` (TRL's fields, :mod:`._trl_config`) and ``fastpref_loss_kwargs``,
        asked for the op's vocabulary reductions behind TRL's ``entropy``/``logits/*``/``mean_token_accuracy``."""
        name = self.fastpref_loss
        as_name, kwargs = loss_class_and_kwargs(name, self.args, kwargs)
        kwargs = with_extra_outputs(kwargs, VOCAB_METRIC_OUTPUTS)
        return (EAGER_LOSS_MODULES if eager else LOSS_MODULES)[LOSSES[as_name or name]](**kwargs)

    def _uses_reference(self) -> bool:
        fn = self.fastpref_loss_fn
        if self.fastpref_loss == "var":
            return getattr(fn, "normalize", "self") != "self"
        return fn.reference_mode == "required"

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if self.fastpref_loss != "mcpo" or self.mcpo_online or "candidate_ids" in dataset.column_names:
            return dataset
        return tokenize_candidates(dataset, processing_class, self._tokenizer.eos_token, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = ["candidate_ids", *REWARD_COLUMNS]
        self._signature_columns = list(self._signature_columns) + [c for c in extra
                                                                   if c not in self._signature_columns]

    # -- the loss -------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        name = self.fastpref_loss
        self.fastpref_loss_fn.train(mode == "train")
        mcpo_full = None
        if name == "mcpo":  # the dataset's candidate lists, or OnMC-PO's ranked generations (_trl_onmcpo)
            rows, mcpo_extra, mcpo_full = self._mcpo_select(model, *self._mcpo_groups(model, inputs))
        else:  # SPO's best-of-n / ranked groups come as these rows too (FastPrefCollator)
            rows = (inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
        num_pairs = inputs["input_ids"].shape[0] // 2
        if name == "var" and self.var_responses == "chosen":
            rows = tuple(t[:num_pairs] for t in rows)
        num_main = rows[0].shape[0]
        kl_rows = self._spo_kl_rows(model, rows, inputs) if name == "spo" else None
        if kl_rows is not None and self.spo_samples == "online":
            rows = cat_rows(rows, kl_rows, self._tokenizer.pad_token_id)

        input_ids, attention_mask, completion_mask = rows
        # only the scored positions reach the head (packed layout)
        labels, keep = scored_labels(input_ids, completion_mask, self.fastpref_loss_fn.ignore_index)
        extra: Dict[str, Any] = {}
        if name == "var":  # dataset columns, or Alg. 1's cross pairs (_trl_var)
            extra.update(self._var_loss_inputs(inputs, rows, num_main))
        elif name == "mcpo":
            extra.update(mcpo_extra)
        elif name == "spo":
            extra.update(self._spo_call(inputs))

        def head_loss(hidden: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
            # Runs inside the (wrapped) model's forward, so DDP sees the head used by the output (the HF Trainer
            # turns on find_unused_parameters without gradient checkpointing; a head read after the forward then
            # fails in backward), and FSDP2's root keeps its parameters unsharded. A head that FSDP2 sharded on its
            # own is still a DTensor here: through_sharded runs the loss as the head's forward, where FSDP gathers
            # it and reduces its gradient (a full_tensor() gather would give wrong head gradients).
            head = hf_model(model).get_output_embeddings()
            hidden = unpack_hidden(hidden, packed)
            return through_sharded(head, lambda: self._fused_loss(
                model, hidden, input_ids, attention_mask, labels, keep, num_main, kl_rows, inputs, extra))

        model_inputs, packed = self._model_inputs(input_ids, attention_mask)
        loss, metrics = model(**model_inputs, fastpref_head_fn=head_loss)
        if mcpo_full is not None:  # report the full groups: all K + 1 log-probs, negatives as column indices
            metrics = {**metrics, **mcpo_full}
        self._log_metrics(mode, metrics, inputs, keep[:num_main].sum(dim=1))
        if return_outputs:
            return loss, types.SimpleNamespace(logits=None, metrics=metrics)
        return loss

    def _head_inputs(self, model, hidden, labels, keep, head) -> LMHeadInputs:
        """:func:`head_inputs` with this trainer's ``ignore_index`` and a gathered ``head = (weight, bias)``, in the
        policy's autocast dtype under mixed precision (:func:`head_in_autocast`)."""
        hidden, weight, bias = head_in_autocast(self.accelerator, hidden, *head)
        return head_inputs(model, hidden, labels, logits_to_keep=keep, ignore_index=self.fastpref_loss_fn.ignore_index,
                           weight=weight, bias=bias)

    def _fused_loss(self, model, hidden, input_ids, attention_mask, labels, keep, num_main, kl_rows, inputs,
                    extra) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``(loss, metrics)`` of the fused loss on the policy's final hidden states (head, reference, KL)."""
        call: Dict[str, Any] = dict(self.window_call())  # the step's batch statistic (_trl_window)
        with contextlib.ExitStack() as stack:
            head = stack.enter_context(gather_lm_head(model))
            main = self._head_inputs(model, hidden[:num_main], labels[:num_main], keep[:num_main], head)
            ref_head = None
            extra = self._var_cross_reference(model, extra)  # VAR's cross pairs: log pi_ref(y_j | x_i), [S, S]
            ref_given = "ref_logps" in extra  # MC-PO: from the no-grad pass over all K + 1 responses
            if (self._needs_reference and not ref_given) or kl_rows is not None:
                ref_head = stack.enter_context(self._reference_head())
            if self._needs_reference and not ref_given:
                if self.precompute_ref_logps:
                    ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
                    call["ref_logps"] = ref[:num_main]
                else:
                    ref_hidden = self._reference_hidden(input_ids[:num_main], attention_mask[:num_main])
                    ref = self._head_inputs(model, ref_hidden, labels[:num_main], keep[:num_main], ref_head)
                    call.update(ref_hidden=ref.hidden, ref_weight=ref.weight, ref_bias=ref.bias)
            if kl_rows is not None:
                kl_inputs = self._spo_kl_inputs(model, hidden, input_ids, attention_mask, labels, keep, num_main,
                                                head, ref_head)
                call.update(ref_weight=kl_inputs.pop("ref_weight"), ref_bias=kl_inputs.pop("ref_bias"))
                extra = {**extra, **kl_inputs}
            # the head's keywords (bias, temperature, softcap from the config, packing) travel with the head
            out = self.fastpref_loss_fn(main.weight, main.hidden, main.targets, **main.head_kwargs(), **call, **extra)
        return out.loss, out.metrics

    def _mcpo_select(self, model, rows: Rows, group_size: int):
        """MC-PO's no-grad pass: statistics of all K + 1 responses, MC-kernel negatives, and the rows to train on.

        Policy and reference run without grad on every row of the groups (the policy through its wrapped
        forward); the negatives are drawn from those statistics (``FusedMCPOLoss.sample_negatives``). Returns
        ``(rows, extra, full)``: the ``1 + M`` rows per prompt that get the forward with grad (the preferred one, then
        the M selected ones in order; trailing all-padding columns dropped), the loss keywords for them
        (``group_size=1 + M``, ``negatives=[1..M]``, their ``ref_logps``), and the full groups' ``logps`` [B, K + 1]
        and ``negatives`` [B, M] (column indices) for logging. Unselected responses thus cost one no-grad forward and
        no forward with grad, no backward. Loss and gradients equal one forward with grad over all K + 1 rows with
        the same negatives.
        """
        loss_fn = self.fastpref_loss_fn
        input_ids, attention_mask, completion_mask = rows
        num_groups = input_ids.shape[0] // group_size
        labels, keep = scored_labels(input_ids, completion_mask, loss_fn.ignore_index)

        def statistics(hidden: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            hidden = unpack_hidden(hidden, packed)
            with gather_lm_head(model, detach=True) as head, self._reference_head() as ref_head:
                pol = self._head_inputs(model, hidden, labels, keep, head)
                ref = self._head_inputs(model, self._reference_hidden(input_ids, attention_mask), labels, keep,
                                        ref_head)
                stats = loss_fn.fused_logprobs(pol.hidden, pol.weight, pol.targets, ref_hidden=ref.hidden,
                                               ref_weight=ref.weight, ref_bias=ref.bias, **pol.head_kwargs(),
                                               **loss_fn.logprob_options())
            return stats.logps, stats.ref_logps

        with torch.no_grad():
            model_inputs, packed = self._model_inputs(input_ids, attention_mask)
            logps, ref_logps = model(**model_inputs, fastpref_head_fn=statistics)
            logps, ref_logps = logps.view(num_groups, group_size), ref_logps.view(num_groups, group_size)
            negatives = loss_fn.sample_negatives(logps, ref_logps)
        m = negatives.shape[1]
        columns = torch.cat([torch.zeros_like(negatives[:, :1]), negatives], dim=1)  # [B, 1 + M]
        extra = dict(group_size=1 + m, ref_logps=ref_logps.gather(1, columns).reshape(-1),
                     negatives=torch.arange(1, m + 1, device=negatives.device).expand(num_groups, m).contiguous())
        full = dict(logps=logps, negatives=negatives, sampling_weights=loss_fn.sampling_weights(logps, ref_logps))
        return select_group_rows(rows, columns), extra, full

    @contextlib.contextmanager
    def _reference_head(self):
        # detach=True: the reference head gets no gradient, so a sharded one may be gathered outright. PEFT without
        # ref_model: read with the adapter off (a modules_to_save head gives its original weight there).
        with reference_head(self.model, self.ref_model) as head:
            yield head

    def _reference_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states of the reference model, no grad (:func:`reference_hidden`: a separate ``ref_model``
        through its own forward, so whatever wraps or shards it runs; PEFT without one: the policy's backbone with
        its adapter off), padded or packed like the policy's rows. Under the policy's autocast: the reference's
        forward (patched by enable_hidden_forward) skips the autocast wrapper accelerate put on it, and the head
        function runs with autocast off."""
        model_inputs, packed = self._model_inputs(input_ids, attention_mask)
        with self.accelerator.autocast(), reference_scope(self.model, self.ref_model):
            hidden = reference_hidden(self.model, self.ref_model, **model_inputs)
        return unpack_hidden(hidden, packed)

    def _model_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """``(model keywords, packing mask)``: the padded rows, or with ``DPOConfig(padding_free=True)`` the rows
        packed into one without padding (:func:`pack_rows`; the head reads them back with :func:`unpack_hidden`)."""
        if not self.fastpref_padding_free:
            return dict(input_ids=input_ids, attention_mask=attention_mask), None
        return pack_rows(input_ids, attention_mask)

    # -- logging --------------------------------------------------------------------------------------

    def _log_metrics(self, mode: str, metrics: Dict[str, torch.Tensor], inputs: Dict[str, Any],
                     token_counts: torch.Tensor) -> None:
        store = self._metrics[mode]
        pairwise = self.fastpref_loss in PAIRWISE or (self.fastpref_loss == "spo" and self.spo_mode == "pairs")
        store_metrics(store, metrics, token_counts, pairwise, self.accelerator.gather)
        if mode == "train":
            self._total_train_tokens += int(self.accelerator.gather(inputs["attention_mask"].sum()).sum().item())
        store["num_tokens"] = [self._total_train_tokens]


__all__ = ["FastPrefDPOTrainer", "FastPrefCollator", "LOSSES", "PAIRWISE", "TRL_METRIC_NAMES"]
