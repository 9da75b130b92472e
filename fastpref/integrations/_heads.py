"""The elementwise logit map of every ``transformers`` causal LM's head, read from each model class's code.

``fused_logprobs`` scores ``softcap * tanh((hidden @ W.T + b) / temperature / softcap)`` (temperature first, then
the soft-cap). A model's forward does one of a few things to ``lm_head(hidden)``; each class of the installed
``transformers`` is listed here with what its forward does (surveyed from its code, checked against the model's
own logits by ``tests/test_every_model_head.py``):

- nothing (:data:`PLAIN`);
- a rule (:data:`RULES`) giving a :class:`HeadMap`: a multiplier ``m`` of the logits is ``temperature = 1/m``, a
  division by ``s`` is ``temperature = s``, a Gemma-style ``c * tanh(logits / c)`` is ``softcap = c``; a scale of
  the hidden states before a bias-free head folds into the temperature too; keeping the first ``n`` vocabulary
  entries is the first ``n`` rows of the head;
- a head the op cannot express (:data:`REFUSED`, with what it does): :func:`head_map` raises.

A class missing from all three (a newer ``transformers``, remote code, a user's model) is taken as a plain head
unless its config sets one of the fields the listed models use for a logit map (:data:`MAP_FIELDS`), in which case
:func:`head_map` raises rather than guess where that value enters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["HeadMap", "PLAIN", "REFUSED", "RULES", "MAP_FIELDS", "UnsupportedHeadError", "head_map",
           "model_class_name"]


class UnsupportedHeadError(ValueError):
    """The model's head is not ``hidden @ W.T (+ b)`` followed by a map ``fused_logprobs`` can express."""


@dataclass(frozen=True)
class HeadMap:
    """What a model's forward does around its ``lm_head`` Linear, in ``fused_logprobs`` terms.

    Attributes:
        softcap: ``c`` of ``c * tanh(z / c)`` applied last, or None.
        temperature: the logits are divided by it (before the soft-cap); includes ``hidden_scale``.
        hidden_scale: the factor the model applies to the hidden states *before* its head (1.0 if none). It is
            folded into ``temperature``, which is exact only for a head without bias.
        vocab: the model keeps only ``logits[..., :vocab]`` (the head's first ``vocab`` rows), or None.
    """

    softcap: Optional[float] = None
    temperature: float = 1.0
    hidden_scale: float = 1.0
    vocab: Optional[int] = None

    def fit(self, weight: Any, bias: Any, name: str) -> Tuple[Any, Any]:
        """The head ``(weight, bias)`` this map applies to: its first ``vocab`` rows. Raises for a hidden-state
        scale before a head with a bias (``(s * h) @ W.T + b`` is no temperature of ``h @ W.T + b``)."""
        if self.hidden_scale != 1.0 and bias is not None:
            raise UnsupportedHeadError(f"{name}: its forward scales the hidden states by {self.hidden_scale} before "
                                       "a head with a bias, which no temperature reproduces")
        if self.vocab is not None and weight.shape[0] > self.vocab:
            weight, bias = weight[:self.vocab], (None if bias is None else bias[:self.vocab])
        return weight, bias


def _names(text: str) -> frozenset:
    return frozenset(text.split())


# Classes whose forward computes ``logits = head(hidden)`` and nothing else (a cast to fp32 at most: the fused op
# computes log-softmax in fp32 or fp64 anyway).
PLAIN = _names("""
AXK1ForCausalLM AXK2ForCausalLM AfmoeForCausalLM Apertus1p5TextForCausalLM ApertusForCausalLM ArceeForCausalLM
AriaTextForCausalLM BailingHybridForCausalLM BambaForCausalLM BartForCausalLM BigBirdPegasusForCausalLM
BioGptForCausalLM BitNetForCausalLM BlenderbotForCausalLM BlenderbotSmallForCausalLM BloomForCausalLM
BltForCausalLM CTRLLMHeadModel CodeGenForCausalLM CpmAntForCausalLM CwmForCausalLM DbrxForCausalLM
DeepseekV2ForCausalLM DeepseekV32ForCausalLM DeepseekV3ForCausalLM DeepseekV4ForCausalLM DiffLlamaForCausalLM
DogeForCausalLM Dots1ForCausalLM Dots3NoteForCausalLM Emu3ForCausalLM Ernie4_5ForCausalLM Ernie4_5_MoeForCausalLM
Exaone4ForCausalLM ExaoneMoeForCausalLM FalconForCausalLM FalconMambaForCausalLM FlexOlmoForCausalLM
FlintForCausalLM FuyuForCausalLM GPT2LMHeadModel GPTBigCodeForCausalLM GPTJForCausalLM GPTNeoForCausalLM
GPTNeoXForCausalLM GPTNeoXJapaneseForCausalLM GemmaForCausalLM Gemma3ForConditionalGeneration GlmForCausalLM
Glm4ForCausalLM Glm4MoeForCausalLM Glm4MoeLiteForCausalLM GlmMoeDsaForCausalLM GotOcr2ForConditionalGeneration
GptOssForCausalLM HYV3ForCausalLM HYV4ForCausalLM HeliumForCausalLM HrmTextForCausalLM HunYuanDenseV1ForCausalLM
HunYuanMoEV1ForCausalLM Jais2ForCausalLM JambaForCausalLM JetMoeForCausalLM KimiLinearForCausalLM
Kolibri1ForCausalLM LagunaForCausalLM LaraMiniForCausalLM Lfm2ForCausalLM Lfm2MoeForCausalLM Lfm3ForCausalLM
LlamaForCausalLM Llama4ForCausalLM LongcatFlashForCausalLM MBartForCausalLM MambaForCausalLM Mamba2ForCausalLM
MarianForCausalLM MellumForCausalLM MiMoV2FlashForCausalLM MiniMaxForCausalLM MiniMaxM2ForCausalLM
MiniMaxM3VLForCausalLM MinistralForCausalLM Ministral3ForCausalLM Mistral4ForCausalLM MistralForCausalLM
MixtralForCausalLM MllamaForCausalLM MoshiForCausalLM MossTranscribeDiarizeForConditionalGeneration MptForCausalLM
MvpForCausalLM NemotronForCausalLM NemotronHForCausalLM OPTForCausalLM OlmoForCausalLM Olmo2ForCausalLM
Olmo3ForCausalLM OlmoHybridForCausalLM OlmoeForCausalLM OpenAIGPTLMHeadModel PLBartForCausalLM
PegasusForCausalLM PersimmonForCausalLM Phi3ForCausalLM Phi4MultimodalForCausalLM PhiForCausalLM
PhimoeForCausalLM Qwen2ForCausalLM Qwen2MoeForCausalLM Qwen3ForCausalLM Qwen3MoeForCausalLM Qwen3NextForCausalLM
Qwen3_5ForCausalLM Qwen3_5MoeForCausalLM Qwen4ExpForCausalLM RwkvForCausalLM SeedOssForCausalLM
SmolLM3ForCausalLM SolarOpenForCausalLM StableLmForCausalLM Starcoder2ForCausalLM TrOCRForCausalLM
WhisperForCausalLM XGLMForCausalLM BertGenerationDecoder ReformerModelWithLMHead XLNetLMHeadModel
YoutuForCausalLM ZambaForCausalLM Zamba2ForCausalLM ZayaForCausalLM
""")

_TRANSFORM = ("its head is a prediction head (dense layer, activation and LayerNorm) before the vocabulary "
              "projection, so the backbone's hidden states are not the projection's input")
# Classes whose head fused_logprobs cannot reproduce, with what the model's forward does.
REFUSED: Dict[str, str] = {
    **{name: _TRANSFORM for name in _names("""
        BertLMHeadModel BigBirdForCausalLM CamembertForCausalLM Data2VecTextForCausalLM ElectraForCausalLM
        ErnieForCausalLM MegatronBertForCausalLM ModernBertDecoderForCausalLM RemBertForCausalLM RoCBertForCausalLM
        RoFormerForCausalLM RobertaForCausalLM RobertaPreLayerNormForCausalLM XLMRobertaForCausalLM
        XLMRobertaXLForCausalLM XmodForCausalLM BlipTextLMHeadModel""")},
    "DoryForCausalLM": "its head multiplies each vocabulary entry's logit by its own learned scale (logit_scale)",
    "GitForCausalLM": "its logits drop the image-token positions before the shift",
    "MusicgenForCausalLM": "it has one head per audio codebook (several logit sets per position)",
    "MusicgenMelodyForCausalLM": "it has one head per audio codebook (several logit sets per position)",
    "ProphetNetForCausalLM": "its logits come from the n-gram predicting streams, not the backbone's hidden states",
    "ClvpForCausalLM": "it applies a final LayerNorm (final_norm) between the backbone and lm_head",
    "CsmDepthDecoderForCausalLM": "each position is scored by its own codebook's head weights (codebooks_head)",
    "Gemma4AssistantForCausalLM": "it projects the hidden states (post_projection) and may score through an "
                                  "ordered masked embedding",
    "Gemma4UnifiedAssistantForCausalLM": "it projects the hidden states (post_projection) and may score through an "
                                         "ordered masked embedding",
}


def _text(config: Any) -> Any:
    try:
        return config.get_text_config() if hasattr(config, "get_text_config") else config
    except ValueError:  # several text configs (e.g. encoder and decoder): the fields sit on the top config
        return config


def _number(value: Any, what: str) -> float:
    value = float(value)
    if not value or value != value or value in (float("inf"), float("-inf")):
        raise UnsupportedHeadError(f"{what} = {value} cannot be reproduced (it must be finite and non-zero)")
    return value


def _from(model: Any, path: str, config_value: Any) -> Any:
    """The attribute ``path`` of ``model`` when a model is given (what its forward reads), else the config's."""
    if model is None:
        return config_value
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _softcap(field: str, text: bool = False) -> Callable[[Any, Any], HeadMap]:
    def rule(config, model):
        value = getattr(_text(config) if text else config, field, None)
        return HeadMap(softcap=None if value is None else _number(value, field))
    return rule


def _times(field: str, attr: Optional[str] = None, text: bool = False, softcap: bool = False,
           default: Optional[float] = None) -> Callable[[Any, Any], HeadMap]:
    """``logits * m`` (read from ``config.field``, or the model attribute ``attr`` the forward uses), optionally
    followed by the config's soft-cap: temperature ``1 / m``."""
    def rule(config, model):
        cfg = _text(config) if text else config
        value = getattr(cfg, field, None)
        value = default if value is None else value
        value = _from(model, attr, value) if attr else value
        cap = getattr(cfg, "final_logit_softcapping", None) if softcap else None
        return HeadMap(temperature=1.0 / _number(value, field), softcap=None if cap is None else _number(cap, field))
    return rule


def _divided(field: str, text: bool = False) -> Callable[[Any, Any], HeadMap]:
    def rule(config, model):
        return HeadMap(temperature=_number(getattr(_text(config) if text else config, field), field))
    return rule


def _hidden_divided(field: str, vocab_field: Optional[str] = None) -> Callable[[Any, Any], HeadMap]:
    """``head(hidden / s)``: temperature ``s`` (exact without a head bias); optionally ``logits[..., :n]``."""
    def rule(config, model):
        scale = _number(getattr(config, field), field)
        vocab = getattr(config, vocab_field, None) if vocab_field else None
        return HeadMap(temperature=scale, hidden_scale=1.0 / scale, vocab=None if vocab is None else int(vocab))
    return rule


def _inkling2(config: Any, model: Any) -> HeadMap:
    value = _from(model, "logit_softcap.softcap", getattr(config, "final_logit_softcapping", None))
    return HeadMap(softcap=_number(value, "final_logit_softcapping"))


def _xlstm(config: Any, model: Any) -> HeadMap:
    value = getattr(config, "output_logit_soft_cap", None)
    return HeadMap(softcap=None if value is None else _number(value, "output_logit_soft_cap"))


def _xlm(config: Any, model: Any) -> HeadMap:
    if getattr(config, "asm", False):
        raise UnsupportedHeadError(f"{type(model).__name__ if model is not None else 'XLM'}: its head is an adaptive "
                                   "softmax (config.asm=True), which scores clusters, not one vocabulary projection")
    return HeadMap()


_GEMMA_CAP = _softcap("final_logit_softcapping")
_TEXT_CAP = _softcap("final_logit_softcapping", text=True)
# Class name -> rule(config, model or None) -> HeadMap, for the classes whose forward maps the logits.
RULES: Dict[str, Callable[[Any, Any], HeadMap]] = {
    # logits / c -> tanh -> * c, when the config's final_logit_softcapping is set
    **{name: _GEMMA_CAP for name in _names("""
        Gemma2ForCausalLM Gemma3ForCausalLM Gemma3nForCausalLM Gemma4ForCausalLM Gemma4UnifiedForCausalLM
        VaultGemmaForCausalLM NanoChatForCausalLM BeamForCausalLM""")},
    **{name: _TEXT_CAP for name in _names("""
        Gemma3nForConditionalGeneration Gemma4ForConditionalGeneration Gemma4UnifiedForConditionalGeneration
        PaliGemmaForConditionalGeneration MistralLarge4ForConditionalGeneration""")},
    "RecurrentGemmaForCausalLM": _softcap("logits_soft_cap"),
    "xLSTMForCausalLM": _xlstm,
    "XLMWithLMHeadModel": _xlm,  # a plain projection unless config.asm (adaptive softmax)
    "FlaubertWithLMHeadModel": _xlm,
    "Inkling2ForCausalLM": _inkling2,
    "Inkling2LoopForCausalLM": _inkling2,
    # logits * m
    **{name: _times("logit_scale", attr="logit_scale") for name in _names(
        "CohereForCausalLM Cohere2ForCausalLM Cohere2MoeForCausalLM")},
    "CohereCompassForCausalLM": _times("logit_scale", attr="logit_scale", default=1.0),
    "HyperCLOVAXForCausalLM": _times("logits_scaling"),
    "HyperCLOVAXVisionV2ForConditionalGeneration": _times("logits_scaling", text=True),
    "FalconH1ForCausalLM": _times("lm_head_multiplier", attr="model.lm_head_multiplier"),
    # logits * m, then the soft-cap
    "MuseGlimmerForConditionalGeneration": _times("output_multiplier", text=True, softcap=True),
    "MuseSparkForConditionalGeneration": _times("output_multiplier", text=True, softcap=True),
    # logits / s
    **{name: _divided("logits_scaling") for name in _names("""
        GraniteForCausalLM GraniteSWAForCausalLM GraniteMoeForCausalLM GraniteMoeSWAForCausalLM
        GraniteMoeHybridForCausalLM GraniteMoeSharedForCausalLM""")},
    "Granite4VisionForConditionalGeneration": _divided("logits_scaling", text=True),
    # head(hidden / s)
    "MiniCPM3ForCausalLM": _hidden_divided("logits_scaling"),
    "InklingForCausalLM": _hidden_divided("logits_mup_width_multiplier", vocab_field="unpadded_vocab_size"),
}

# Config fields the listed models use for a logit map: an unlisted class whose config sets one is refused.
MAP_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier",
              "logits_soft_cap", "output_logit_soft_cap", "logits_mup_width_multiplier", "unpadded_vocab_size")


def model_class_name(config: Any) -> Optional[str]:
    """The causal-LM class ``transformers`` builds for ``config`` (by its ``model_type``), or None if unknown."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers is what the configs come from
        return None
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))


def head_map(config: Any, class_name: Optional[str] = None, model: Any = None) -> HeadMap:
    """The :class:`HeadMap` of model class ``class_name`` (default: the causal-LM class of ``config.model_type``).

    ``model``, when given, is the model instance: values its forward reads from the model rather than the config
    are read there. Raises :class:`UnsupportedHeadError` (naming the class and what it does) for a head the fused
    op cannot reproduce, and for an unlisted class whose config sets a logit-map field.
    """
    name = class_name or model_class_name(config) or type(config).__name__
    if name in REFUSED:
        raise UnsupportedHeadError(f"{name}: fastpref cannot reproduce this model's logits: {REFUSED[name]}")
    if name in RULES:
        return RULES[name](config, model)
    if name in PLAIN:
        return HeadMap()
    text = _text(config)
    set_fields = [f for f in MAP_FIELDS if getattr(text, f, None) not in (None, 1, 1.0)]
    if set_fields:
        raise UnsupportedHeadError(
            f"{name}: unknown model class whose config sets {', '.join(set_fields)}; fastpref does not know where "
            "that enters the logits, so it cannot reproduce them (fastpref.integrations._heads lists the classes "
            "it knows)")
    return HeadMap()
