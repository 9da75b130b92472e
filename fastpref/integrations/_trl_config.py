"""Config side of :class:`fastpref.integrations.trl.FastPrefDPOTrainer`: which ``DPOConfig`` fields reach which
fused loss, with TRL's meaning, and the options a loss cannot honour (refused, never ignored).

- ``fastpref_loss="dpo"`` (the default) is TRL's whole DPO family: ``loss_type`` (a name or a list),
  ``loss_weights``, ``beta``, ``label_smoothing``, ``f_divergence_type``, ``f_alpha_divergence_coef``,
  ``discopop_tau``, ``ld_alpha`` and ``use_weighting`` all go to :class:`fastpref.modules.FusedDPOLoss`.
- ``fastpref_loss="ipo"`` is TRL's ``loss_type="ipo"`` (tau = ``DPOConfig.beta``, or ``fastpref_loss_kwargs``'
  ``tau``), so its rewards are logged as TRL logs them.
- ``DPOConfig.beta`` reaches every other loss with a beta (:data:`BETA_ARGUMENT`; ORPO's lambda is TRL's
  ``ORPOConfig.beta``); a value in ``fastpref_loss_kwargs`` wins. The losses without one say why
  (:data:`NO_BETA`) and refuse a non-default ``beta``.
- TRL's DPO-only fields with another ``fastpref_loss`` raise.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

#: DPOConfig's default beta: a loss without a beta refuses any other value.
TRL_DEFAULT_BETA = 0.1
#: fastpref_loss -> the constructor argument that DPOConfig.beta sets.
BETA_ARGUMENT = {"dpo": "beta", "ipo": "beta", "simpo": "beta", "dpop": "beta", "cpo": "beta", "alpha_dpo": "beta",
                 "mcpo": "beta", "var": "beta", "orpo": "orpo_lambda"}
#: fastpref_loss -> why DPOConfig.beta has no meaning there.
NO_BETA = {
    "slic": "SLiC-HF's calibration loss has no beta: its margin is delta and its regularizer reg_weight "
            "(fastpref_loss_kwargs)",
    "spo": "SPO has no beta: its coefficients are alpha (the weight of the self-play term) and kl_coef "
           "(fastpref_loss_kwargs)",
}
#: DPOConfig fields of TRL's DPO family and their defaults: only fastpref_loss="dpo" reads them.
DPO_FAMILY_DEFAULTS: Dict[str, Any] = {"loss_type": ["sigmoid"], "loss_weights": None, "ld_alpha": None,
                                       "use_weighting": False, "f_divergence_type": "reverse_kl",
                                       "label_smoothing": 0.0}
_FAMILY_PASSTHROUGH = ("f_alpha_divergence_coef", "discopop_tau", "ld_alpha", "use_weighting")


def _value(args: Any, name: str) -> Any:
    value = getattr(args, name, DPO_FAMILY_DEFAULTS.get(name))
    value = getattr(value, "value", value)  # an Enum field
    return list(value) if isinstance(value, (list, tuple)) else value


def _is_default(name: str, value: Any) -> bool:
    default = DPO_FAMILY_DEFAULTS[name]
    if name == "loss_weights":
        return value is None or [float(w) for w in value] == [1.0]
    return value == default


def loss_type_list(args: Any) -> list:
    """``DPOConfig.loss_type`` as a list (TRL stores a list; a string is one type)."""
    value = _value(args, "loss_type")
    return [value] if isinstance(value, str) else list(value)


def check_family_fields(args: Any, loss: str) -> None:
    """Refuse TRL's DPO-family fields for a loss other than ``"dpo"``/``"ipo"`` (they would be ignored)."""
    if args is None or loss == "dpo":
        return
    if loss == "ipo":
        if loss_type_list(args) not in (["sigmoid"], ["ipo"]):
            raise ValueError(f"fastpref_loss='ipo' is TRL's loss_type='ipo'; got DPOConfig.loss_type="
                             f"{loss_type_list(args)}: leave it at its default or use fastpref_loss='dpo'")
        fields = [f for f in DPO_FAMILY_DEFAULTS if f != "loss_type" and not _is_default(f, _value(args, f))]
    else:
        fields = [f for f in DPO_FAMILY_DEFAULTS if not _is_default(f, _value(args, f))]
    if fields:
        given = ", ".join(f"{f}={_value(args, f)!r}" for f in fields)
        raise ValueError(f"DPOConfig.{fields[0]} belongs to TRL's DPO loss family, which fastpref_loss={loss!r} "
                         f"does not read (got {given}): use fastpref_loss='dpo' (it takes every TRL loss_type, "
                         "lists with loss_weights, f_divergence_type, label_smoothing, ld_alpha and use_weighting), "
                         "or leave these fields at their defaults")


def loss_class_and_kwargs(loss: str, args: Any, given: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """``(registry name override or "", constructor kwargs)`` of ``loss`` from ``DPOConfig`` and the user's
    ``fastpref_loss_kwargs`` (which win). ``"ipo"`` returns ``"dpo"``: it is built as TRL's ipo loss type."""
    kwargs = dict(given)
    if args is None:
        return "", kwargs
    if loss == "ipo":
        if kwargs.pop("length_normalize", True) is not True:
            raise ValueError("fastpref_loss='ipo' is TRL's length-normalized IPO; for the unnormalized form use "
                             "fastpref.modules.FusedIPOLoss(length_normalize=False) outside the trainer")
        kwargs.setdefault("beta", kwargs.pop("tau", args.beta))
        kwargs["loss_type"] = "ipo"
        return "dpo", kwargs
    if loss in NO_BETA:
        if args.beta != TRL_DEFAULT_BETA:
            raise ValueError(f"DPOConfig.beta={args.beta} does not apply to fastpref_loss={loss!r}: {NO_BETA[loss]}")
        return "", kwargs
    kwargs.setdefault(BETA_ARGUMENT[loss], args.beta)
    if loss == "dpo":
        types = loss_type_list(args)
        kwargs.setdefault("loss_type", types[0] if len(types) == 1 else types)
        kwargs.setdefault("loss_weights", _value(args, "loss_weights"))
        kwargs.setdefault("f_divergence_type", _value(args, "f_divergence_type"))
        for name in _FAMILY_PASSTHROUGH:
            kwargs.setdefault(name, _value(args, name))
        # TRL's label_smoothing: used by robust / exo_pair / aot / aot_unpaired, ignored by its sigmoid (our
        # sigmoid's cDPO smoothing is then off; fastpref_loss_kwargs' label_smoothing keeps it).
        if "label_smoothing" not in kwargs:
            kwargs["label_smoothing"] = float(_value(args, "label_smoothing"))
            kwargs["smooth_sigmoid"] = False
    return "", kwargs
