"""Every causal-LM class of the installed ``transformers``: fastpref's head inputs reproduce the model's own logits.

Each class is built tiny from its config class (hidden 32, 2 layers, vocab 96, few heads) with every logit-map field
its config has set to a non-trivial value (so a missing or wrong map, or one the model does not apply, fails), its
forward's ``log_softmax(logits)`` gathered at the next tokens is compared with ``head_inputs`` +
``fused_logprobs`` (through :func:`fastpref.integrations.transformers.lm_head_inputs`), in float64 where the model
runs in float64. A class whose head fastpref refuses must raise ``UnsupportedHeadError`` naming it. The classes are
enumerated from ``transformers`` itself; the ones that cannot be built offline are listed in ``EXCLUDED`` with the
reason, and the test asserts that list holds only such classes.
"""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _trl_fixtures import one_thread  # noqa: E402,F401  (autouse)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

from fastpref.integrations import _heads  # noqa: E402
from fastpref.integrations import transformers as hf  # noqa: E402


def _all_classes():
    """Class name -> model_type of its own config class: the causal-LM auto mapping plus every ``*ForCausalLM`` /
    ``*LMHeadModel`` class ``transformers`` exports."""
    names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    names |= {n for n in dir(transformers) if n.endswith(("ForCausalLM", "LMHeadModel")) and not n.startswith("Auto")}
    types = {name: model_type for model_type, name in reversed(list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()))}
    return {name: getattr(getattr(transformers, name).config_class, "model_type", None) or types[name]
            for name in sorted(names)}


CLASSES = _all_classes()

# Classes not built here, with the reason. Their heads are classified from their code only (fastpref.integrations.
# _heads); test_exclusions_are_only_those asserts this is the exact list.
EXCLUDED = {
    "Gemma3nForConditionalGeneration": "its vision tower (TimmWrapperModel) needs the timm package, not installed",
    "BltForCausalLM": "its byte-latent patcher and local encoder/decoder take minutes (150 s) even from a tiny config",
}
# Classes whose tiny config was not worked out yet (the generic tiny sizes break a model-specific constraint): none.

V = 96
TINY = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, n_embd=32, n_layer=2, n_head=4, d_model=32,
            n_positions=64, num_layers=2, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=48,
            encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=48, moe_intermediate_size=16,
            n_routed_experts=4, num_experts=4, num_local_experts=4, num_experts_per_tok=2, ffn_dim=48, n_inner=48,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            kv_lora_rank=16, q_lora_rank=16, rotary_dim=4, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1,
            mamba_d_state=8, is_decoder=True)
# Non-trivial values for the logit-map fields a config has (a model that applies one changes its logits).
MAP_VALUES = dict(final_logit_softcapping=1.5, logit_scale=0.5, logits_scaling=3.0, lm_head_multiplier=2.5,
                  output_multiplier=0.7, logits_soft_cap=1.7, output_logit_soft_cap=1.3,
                  logits_mup_width_multiplier=2.0, unpadded_vocab_size=80)
# Per model_type config changes the generic tiny config needs (None drops a generic key).
OVERRIDES = {
    "falcon": dict(head_dim=None),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "mamba2": dict(head_dim=16, num_heads=4, n_groups=1, state_size=8),
    "zaya": dict(num_experts_per_tok=1),
    "prophetnet": dict(num_hidden_layers=None, num_encoder_layers=1, num_decoder_layers=1),
    "gemma4_text": dict(head_dim=None, vocab_size_per_layer_input=V, hidden_size_per_layer_input=8),  # not 262144 x 256
    "xlstm": dict(v_head_dim=None, qk_rope_head_dim=None, qk_nope_head_dim=None, head_dim=None),
    # a Mamba mixer of 4 heads x 16 (d_ssm = heads x head dim), not 128 x 8 over state 256 (8 s a run)
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=8),
    "kimi_linear": dict(linear_head_dim=8, linear_num_heads=4),  # delta-rule layers of 4 x 8, not 32 x 128 (6 s)
    "xlnet": dict(n_positions=None, max_position_embeddings=None, d_inner=48, d_head=None, head_dim=None),
    "reformer": dict(axial_pos_embds_dim=(16, 16), axial_pos_shape=(4, 4), max_position_embeddings=16,
                     attn_layers=["local", "local"], local_attn_chunk_length=4, num_hidden_layers=None),
    **{t: dict(num_key_value_heads=4) for t in ("axk1", "axk2", "deepseek_v2", "deepseek_v3", "deepseek_v32",
                                                  "glm4_moe_lite", "glm_moe_dsa", "longcat_flash", "youtu")},
    "minicpm3": dict(num_key_value_heads=4, logits_scaling=None, dim_model_base=8),  # logits_scaling = 32 / 8
    "gemma4_unified_text": dict(head_dim=None),
    "axk1": dict(num_key_value_heads=4, n_group=1, topk_group=1),  # experts // n_group routed groups
    "dots1": dict(n_shared_experts=1, n_group=1, topk_group=1),
    "mistral4": dict(num_key_value_heads=4, head_dim=None),  # head_dim = nope + rope head dims
    # rope per layer type; the mrope sections sum to half of head_dim (32 / 4 heads)
    "cohere_compass_text": dict(rope_parameters={"full_attention": dict(rope_type="default", rope_theta=1e4,
                                                                        mrope_section=[2, 1, 1])}),
    # the attention reads attn_config.rope_theta (not a field of its config class); clip_qkv=None fails in clamp
    "dbrx": dict(attn_config=dict(kv_n_heads=2, rope_theta=1e4, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2)),
    "gemma3n_text": dict(num_kv_shared_layers=0, hidden_size_per_layer_input=8, laurel_rank=4,
                         vocab_size_per_layer_input=V, altup_num_inputs=2),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "zamba": dict(layers_block_type=["hybrid", "hybrid"], head_dim=None, n_mamba_heads=2),  # ties 2 hybrids
    "zamba2": dict(layers_block_type=["linear_attention", "hybrid"], head_dim=None, adapter_rank=4),
}


def _assistant(text_type):
    """A Gemma 4 assistant: a text config without per-layer inputs, MoE or wide MLP, every layer sharing KV."""
    return dict(backbone_hidden_size=32, num_centroids=8, centroid_intermediate_top_k=2, text_config=dict(
        model_type=text_type, vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0, enable_moe_block=False, use_double_wide_mlp=False, num_kv_shared_layers=2))


# The tiny text sub-config of a composite (vision/audio + text) config.
_TEXT = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


def _gemma4(unified):
    """Tiny Gemma 4 (or Gemma 4 Unified): one sliding and one full attention layer (a full layer's head_dim is
    global_head_dim, 512 unless set); Gemma 4's vision (4 x 4 patches pooled 2 x 2) and audio (conformer) towers,
    or Unified's tower-free patch and audio-frame embedders, at width 32."""
    text = dict(_TEXT, layer_types=["sliding_attention", "full_attention"], global_head_dim=8)
    if unified:
        return dict(text_config=dict(text, model_type="gemma4_unified_text"), audio_config=dict(audio_embed_dim=32),
                    vision_config=dict(patch_size=4, pooling_kernel_size=2, mm_embed_dim=32, mm_posemb_size=16,
                                       output_proj_dims=32))
    return dict(text_config=dict(text, model_type="gemma4_text", hidden_size_per_layer_input=8,
                                 vocab_size_per_layer_input=V),  # per-layer inputs default to 262144 x 256
                vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=4, head_dim=8, patch_size=4, pooling_kernel_size=2,
                                   position_embedding_size=64),
                audio_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  subsampling_conv_channels=[8, 4], output_proj_dims=32))


# Config arguments a config class needs even for its defaults (its own defaults fail its validation or are huge).
# The composite configs get tiny vision/audio sub-configs too (their towers are built; the text-only forward does
# not run them).
BASE = {
    "gemma4_assistant": _assistant("gemma4_text"),
    "gemma4_unified_assistant": _assistant("gemma4_unified_text"),
    # a tiny SigLIP tower (4 x 4 patches pooled to 2 x 2 image tokens)
    "gemma3": dict(mm_tokens_per_image=4, text_config=dict(_TEXT), vision_config=dict(
        model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, image_size=16, patch_size=4)),
    # Qwen 2 text; a SAM-style tower (a windowed and a global layer over 4 x 4 patches): full size took 17 s
    "got_ocr2": dict(text_config=dict(_TEXT, model_type="qwen2"), vision_config=dict(
        hidden_size=32, output_channels=8, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4,
        window_size=2, global_attn_indexes=[1], mlp_dim=48)),
    "gemma4": _gemma4(unified=False),
    "gemma4_unified": _gemma4(unified=True),
    # Persimmon text; the image patches (4 x 4 x 3 values) are one Linear into the text width
    "fuyu": dict(image_size=16, patch_size=4, text_config=dict(_TEXT, model_type="persimmon")),
    # Qwen 3 text; a one-layer Whisper-style audio encoder over 8 mel bins
    "moss_transcribe_diarize": dict(text_config=dict(_TEXT, model_type="qwen3"), audio_config=dict(
        num_mel_bins=8, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, hidden_size=32,
        max_source_positions=16)),
    # the text fields sit on the top config (TINY sizes them); a one-layer SigLIP-style image tower and a
    # one-block conformer audio encoder
    "phi4_multimodal": dict(vision_config=dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=16,
        patch_size=4, crop_size=16), audio_config=dict(
        hidden_size=32, intermediate_size=48, num_blocks=1, num_attention_heads=4, ext_pw_out_channel=32,
        depthwise_separable_out_channel=32, nemo_conv_channels=32, input_size=8, time_reduction=2, left_chunk=2,
        bias_max_distance=16)),
}
# Models that cast inside their layers to float32; XGLM clamps its scores with a float32 tensor of float64's min.
FP32 = {"inkling2_text", "inkling2_loop_text", "xglm"}


def _has(obj, key):
    try:
        return hasattr(obj, key)
    except Exception:  # e.g. XLNet's max_position_embeddings raises NotImplementedError
        return False


def _config(model_type):
    cfg_cls = transformers.CONFIG_MAPPING[model_type]
    defaults = cfg_cls(**BASE.get(model_type, {}))
    kwargs = {k: v for k, v in TINY.items() if _has(defaults, k)}
    kwargs.update(BASE.get(model_type, {}))
    kwargs.update({k: v for k, v in MAP_VALUES.items() if _has(defaults, k)})
    kwargs.update(OVERRIDES.get(model_type, {}))
    config = cfg_cls(**{k: v for k, v in kwargs.items() if v is not None})
    text = _heads._text(config)
    if text is not config:
        for k, v in MAP_VALUES.items():
            if _has(text, k) and not isinstance(getattr(type(text), k, None), property):
                setattr(text, k, v)
    if hasattr(config, "_experts_implementation"):
        config._experts_implementation = "eager"
        text._experts_implementation = "eager"
    return config


def build(name):
    """The tiny float64 (float32 where the model computes in float32) model of class ``name``, in eval mode."""
    config = _config(CLASSES[name])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, name)(config)
    return (model.float() if CLASSES[name] in FP32 else model.double()).eval()


def _ids():
    return torch.randint(3, 80, (2, 9), generator=torch.Generator().manual_seed(0))


def _check(name):
    model = build(name)
    ids = _ids()
    if name in _heads.REFUSED:
        with pytest.raises(hf.UnsupportedHeadError, match=name):
            hf.lm_head_inputs(model, ids)
        return
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        out = hf.lm_head_inputs(model, ids)
        got = out.logprobs().token_logps[:, :-1]
    if name in _heads.RULES and _heads.RULES[name] is not _heads._xlm:  # map values set: a wrong map fails
        assert (out.softcap, out.temperature) != (None, 1.0), name
    truth = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    tol = dict(rtol=1e-10, atol=1e-10) if logits.dtype == torch.float64 else dict(rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(got.double(), truth, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("name", sorted(set(CLASSES) - set(EXCLUDED)))
def test_head_reproduces_model_logits(name):
    _check(name)


def test_every_class_is_surveyed():
    known = _heads.PLAIN | set(_heads.RULES) | set(_heads.REFUSED)
    assert sorted(set(CLASSES) - known) == []  # a new transformers class: survey its forward in _heads
    assert len(CLASSES) - len(EXCLUDED) >= 185  # the built ones: all but two (188 of 190 here)


def test_exclusions_are_only_those():
    assert set(EXCLUDED) <= set(CLASSES)
    assert set(EXCLUDED) == {"Gemma3nForConditionalGeneration", "BltForCausalLM"}
    with pytest.raises(ImportError, match="timm"):  # the one missing package
        build("Gemma3nForConditionalGeneration")


def test_hidden_scale_with_head_bias_is_refused():
    """MiniCPM3 divides the hidden states by logits_scaling before its head: a temperature only without a bias."""
    model = build("MiniCPM3ForCausalLM")
    assert hf.logit_transform(model) == (None, 4.0)
    model.lm_head = torch.nn.Linear(32, V, bias=True, dtype=torch.float64)
    with pytest.raises(hf.UnsupportedHeadError, match="MiniCPM3ForCausalLM.*bias"):
        hf.lm_head_inputs(model, _ids())


def test_inkling_keeps_the_unpadded_vocabulary():
    model = build("InklingForCausalLM")
    out = hf.lm_head_inputs(model, _ids())
    assert out.weight.shape[0] == MAP_VALUES["unpadded_vocab_size"] < model.lm_head.weight.shape[0]


def test_xlm_adaptive_softmax_and_unknown_classes_with_map_fields_are_refused():
    config = transformers.XLMConfig(asm=True)
    with pytest.raises(hf.UnsupportedHeadError, match="adaptive softmax"):
        hf.logit_transform(config)
    assert hf.logit_transform(transformers.XLMConfig()) == (None, 1.0)
    model = build("LlamaForCausalLM")
    Unknown = type("MyCustomForCausalLM", (type(model),), {})  # an unlisted class (remote code, a user's model)
    model.__class__ = Unknown
    assert hf.logit_transform(model) == (None, 1.0)
    model.config.logits_scaling = 2.0
    with pytest.raises(hf.UnsupportedHeadError, match="MyCustomForCausalLM.*logits_scaling"):
        hf.lm_head_inputs(model, _ids())


def test_configs_map_to_their_class_rules():
    """A config alone is read as the causal-LM class of its model_type (the existing behaviour for the multipliers,
    plus the ones an earlier version got wrong)."""
    assert hf.logit_transform(transformers.HyperCLOVAXConfig(logits_scaling=0.25)) == (None, 4.0)  # multiplies
    assert hf.logit_transform(transformers.GraniteConfig(logits_scaling=8.0)) == (None, 8.0)  # divides
    assert hf.logit_transform(transformers.FalconH1Config(lm_head_multiplier=0.5)) == (None, 2.0)
    with pytest.raises(hf.UnsupportedHeadError, match="DoryForCausalLM"):
        hf.logit_transform(transformers.DoryConfig())
