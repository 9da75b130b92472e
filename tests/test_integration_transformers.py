"""fastpref.integrations.transformers: backbone + head parameters reproduce model(...).logits log-probs."""
import sys
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _trl_fixtures import one_thread  # noqa: E402,F401  (autouse)

from fastpref.integrations import transformers as hf  # noqa: E402

V, D = 300, 32


def _tiny(family: str, tied: bool, dtype=torch.float64, **extra):
    common = dict(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, **extra)
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif family == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(head_dim=8, **common))
    else:
        raise ValueError(family)
    return model.to(dtype).eval()


def _batch(seed=1, rows=3, cols=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (rows, cols), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding on one row
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100  # a "prompt" that is not scored
    return ids, mask, labels


def _eager_token_logps(model, ids, mask, labels, **kw):
    logits = model(input_ids=ids, attention_mask=mask, **kw).logits
    return logits, torch.log_softmax(logits.double(), -1)


def _truth(model, ids, mask, labels):
    """Per-sequence sum of log p(labels[t+1] | <= t) from the model's own logits."""
    _, logp = _eager_token_logps(model, ids, mask, labels)
    tgt = labels[:, 1:]
    valid = tgt != -100
    tok = logp[:, :-1].gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    return tok.sum(1), tok


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_logps_and_grads_match_model_logits_fp64(family, tied):
    model = _tiny(family, tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids, mask, labels = _batch()
    out = hf.lm_head_inputs(model, ids, mask, labels)
    assert out.weight is model.lm_head.weight and out.bias is None and out.softcap is None
    assert out.hidden.shape == (3, 10, D) and out.targets.shape == (3, 10)
    assert bool((out.targets[:, -1] == -100).all())
    stats = out.logprobs()
    (stats.logps * torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    truth, tok = _truth(model, ids, mask, labels)
    (truth * torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(stats.logps, truth, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(stats.token_logps[:, :-1], tok, rtol=1e-12, atol=1e-10)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_logps_match_model_logits_fp32(family, tied):
    model = _tiny(family, tied, dtype=torch.float32)
    ids, mask, labels = _batch(seed=2)
    stats = hf.lm_head_inputs(model, ids, mask, labels).logprobs()
    truth, _ = _truth(model, ids, mask, labels)
    torch.testing.assert_close(stats.logps.double(), truth, rtol=2e-6, atol=2e-5)


def test_default_labels_skip_padding():
    model = _tiny("llama", False)
    ids, mask, _ = _batch()
    out = hf.lm_head_inputs(model, ids, mask)
    truth, _ = _truth(model, ids, mask, ids.masked_fill(mask == 0, -100))
    torch.testing.assert_close(out.logprobs().logps, truth, rtol=1e-12, atol=1e-10)
    assert int((out.targets != -100).sum()) == int(mask[:, 1:].sum())


def test_logits_to_keep_int_tensor_and_mask():
    model = _tiny("qwen2", True)
    ids, mask, labels = _batch()
    _, logp = _eager_token_logps(model, ids, mask, labels)
    shifted = hf.shift_labels(labels)
    full_tok = logp.gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (shifted != -100)

    k = 4
    out = hf.lm_head_inputs(model, ids, mask, labels, logits_to_keep=k)
    assert out.hidden.shape == (3, k, D)
    # same positions as transformers' own logits_to_keep
    kept_logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=k).logits
    eager_kept = torch.log_softmax(kept_logits.double(), -1).gather(-1, out.targets.clamp(min=0).unsqueeze(-1))
    eager_kept = eager_kept.squeeze(-1) * (out.targets != -100)
    torch.testing.assert_close(out.logprobs().token_logps, eager_kept, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(out.logprobs().token_logps, full_tok[:, -k:], rtol=1e-12, atol=1e-10)

    positions = torch.tensor([0, 3, 5])
    out = hf.lm_head_inputs(model, ids, mask, labels, logits_to_keep=positions)
    torch.testing.assert_close(out.logprobs().token_logps, full_tok[:, positions], rtol=1e-12, atol=1e-10)

    keep = shifted != -100  # packed: only the scored positions
    out = hf.lm_head_inputs(model, ids, mask, labels, logits_to_keep=keep)
    assert out.hidden.shape == (int(keep.sum()), D) and out.num_seqs == 3
    torch.testing.assert_close(out.logprobs().logps, full_tok.sum(1), rtol=1e-12, atol=1e-10)


def test_head_bias_is_used():
    model = _tiny("llama", False)
    head = torch.nn.Linear(D, V, bias=True, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_(0, 2.0)
    model.lm_head = head
    ids, mask, labels = _batch()
    out = hf.lm_head_inputs(model, ids, mask, labels)
    assert out.bias is head.bias
    truth, _ = _truth(model, ids, mask, labels)
    torch.testing.assert_close(out.logprobs().logps, truth, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("tied", [False, True])
def test_gemma2_final_logit_softcapping(tied):
    model = _tiny("gemma2", tied, final_logit_softcapping=1.5)  # small cap: the tanh really bends the logits
    ids, mask, labels = _batch()
    out = hf.lm_head_inputs(model, ids, mask, labels)
    assert out.softcap == 1.5
    truth, _ = _truth(model, ids, mask, labels)
    torch.testing.assert_close(out.logprobs().logps, truth, rtol=1e-12, atol=1e-10)
    # without the cap the numbers differ: the test can tell
    no_cap = out.logprobs(softcap=None).logps
    assert (no_cap - truth).abs().max() > 1e-3


def test_logit_scaling_configs_map_to_temperature():
    assert hf.logit_transform(transformers.CohereConfig(logit_scale=0.25)) == (None, 4.0)
    assert hf.logit_transform(transformers.GraniteConfig(logits_scaling=8.0)) == (None, 8.0)
    assert hf.logit_transform(transformers.LlamaConfig()) == (None, 1.0)
    assert hf.logit_transform(transformers.Gemma2Config(final_logit_softcapping=30.0)) == (30.0, 1.0)


def test_cohere_logit_scale_matches_model():
    cfg = transformers.CohereConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, logit_scale=0.5)
    torch.manual_seed(0)
    model = transformers.CohereForCausalLM(cfg).double().eval()
    ids, mask, labels = _batch()
    out = hf.lm_head_inputs(model, ids, mask, labels)
    assert out.temperature == 2.0
    truth, _ = _truth(model, ids, mask, labels)
    torch.testing.assert_close(out.logprobs().logps, truth, rtol=1e-12, atol=1e-10)


def test_head_kwargs_are_a_loss_call_and_logprobs_keep_ignore_index():
    """head_kwargs(): the head (bias, the config's temperature/softcap) and packing, what a fused loss call takes;
    the targets' ignore_index goes to the loss's constructor (and logprobs() passes it to the op)."""
    import fastpref

    model = _tiny("gemma2", False, final_logit_softcapping=1.5)
    ids, mask, labels = _batch()
    truth, _ = _truth(model, ids, mask, labels)
    out = hf.lm_head_inputs(model, ids, mask, labels.masked_fill(labels == -100, -1), ignore_index=-1,
                            logits_to_keep=hf.shift_labels(labels) != -100)
    kwargs = out.head_kwargs()
    assert set(kwargs) == {"bias", "temperature", "softcap", "seq_ids", "num_seqs"}
    assert (kwargs["temperature"], kwargs["softcap"]) == (1.0, 1.5)
    torch.testing.assert_close(out.logprobs().logps, truth, rtol=1e-12, atol=1e-10)
    loss_fn = fastpref.FusedSimPOLoss(beta=2.0, ignore_index=-1)  # rows 0 and 1 are a pair; row 2 would be odd
    two = hf.lm_head_inputs(model, ids[:2], mask[:2], labels[:2].masked_fill(labels[:2] == -100, -1), ignore_index=-1)
    logps = loss_fn(two.weight, two.hidden, two.targets, **two.head_kwargs()).metrics["logps"]
    torch.testing.assert_close(logps, truth[:2], rtol=1e-12, atol=1e-10)


def test_one_unwrapping_and_one_backbone_output_reader():
    """hf_model strips every .module holder and a PEFT wrapper; distributed.unwrap_model only DDP/DataParallel.
    backbone_hidden reads a tensor, a tuple or last_hidden_state."""
    from fastpref.integrations.distributed import unwrap_model

    model = _tiny("llama", False)

    class Peft(torch.nn.Module):  # what PEFT's PeftModel exposes
        def __init__(self, inner):
            super().__init__()
            self.inner, self.peft_config = inner, {"default": None}

        def get_base_model(self):
            return self.inner

    class Engine(torch.nn.Module):  # a DeepSpeed engine / DDP: the wrapped model is .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    peft = Peft(model)
    assert hf.hf_model(Engine(peft)) is model and hf.hf_model(model) is model
    assert hf.is_peft(Engine(peft)) and not hf.is_peft(model)
    assert unwrap_model(torch.nn.DataParallel(peft)) is peft and unwrap_model(Engine(model)) is not model
    h = torch.zeros(1, 2, 3)
    ids = torch.tensor([[1, 2, 3]])
    assert hf.backbone_hidden(h) is h and hf.backbone_hidden((h, None)) is h
    torch.testing.assert_close(hf.backbone_hidden(hf.backbone(model)(input_ids=ids)),
                               hf.backbone(model)(input_ids=ids, return_dict=False)[0])
    with pytest.raises(TypeError, match="ref_backbone must return hidden states"):
        hf.backbone_hidden({"hidden": h}, what="ref_backbone")


def test_bad_arguments_raise():
    model = _tiny("llama", False)
    ids, mask, labels = _batch()
    with pytest.raises(ValueError, match="logits_to_keep"):
        hf.lm_head_inputs(model, ids, mask, labels, logits_to_keep=-1)
    with pytest.raises(TypeError, match="logits_to_keep"):
        hf.lm_head_inputs(model, ids, mask, labels, logits_to_keep=1.5)
    with pytest.raises(ValueError, match="labels"):
        hf.head_inputs(model, torch.zeros(3, 10, D, dtype=torch.float64), labels[:, :5])
    with pytest.raises(TypeError, match="backbone"):
        hf.backbone(torch.nn.Linear(2, 2))


# ---- sharded heads: the frameworks are not installed, so the detection is tested with fake parameters ----

def test_gather_is_a_no_op_for_plain_parameters(monkeypatch):
    model = _tiny("llama", True)
    for name in [m for m in sys.modules if m == "deepspeed" or m.startswith("deepspeed.")]:
        monkeypatch.delitem(sys.modules, name)  # TRL's tests in the same process may have imported it
    with hf.gather_lm_head(model) as (w, b):
        assert w is model.lm_head.weight and b is None
    assert "deepspeed" not in sys.modules  # nothing imported for plain parameters


def test_zero3_head_is_gathered_with_deepspeed_context(monkeypatch):
    """A ZeRO-3 parameter (ds_id/ds_status) is gathered through deepspeed.zero.GatheredParameters, once,
    skipping parameters that are already available (tied embeddings gathered by the embedding's own hook)."""
    calls = []

    class Status:
        AVAILABLE, NOT_AVAILABLE = "available", "not_available"

    class Gathered:
        def __init__(self, params, modifier_rank=None):
            calls.append(("enter", [id(p) for p in params], modifier_rank))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            calls.append(("exit",))

    ds = types.ModuleType("deepspeed")
    ds.zero = types.SimpleNamespace(GatheredParameters=Gathered)
    pp = types.ModuleType("deepspeed.runtime.zero.partition_parameters")
    pp.ZeroParamStatus = Status
    for name, mod in {"deepspeed": ds, "deepspeed.runtime": types.ModuleType("deepspeed.runtime"),
                      "deepspeed.runtime.zero": types.ModuleType("deepspeed.runtime.zero"),
                      "deepspeed.runtime.zero.partition_parameters": pp}.items():
        monkeypatch.setitem(sys.modules, name, mod)

    model = _tiny("llama", False)
    head = torch.nn.Linear(D, V, bias=True, dtype=torch.float64)
    model.lm_head = head
    for p in (head.weight, head.bias):
        p.ds_id, p.ds_status = 7, Status.NOT_AVAILABLE
    head.bias.ds_status = Status.AVAILABLE
    assert hf.sharding_kind(head.weight) == "zero3"
    with hf.gather_lm_head(model) as (w, b):
        assert w is head.weight and b is head.bias
        assert calls == [("enter", [id(head.weight)], None)]
    assert calls[-1] == ("exit",)

    calls.clear()
    head.weight.ds_status = Status.AVAILABLE  # already gathered: no second gather
    with hf.gather_lm_head(model):
        pass
    assert calls == []


def test_fsdp_detection_and_fsdp1_grad_guard():
    w = torch.nn.Parameter(torch.zeros(3, 2))
    assert hf.sharding_kind(w) is None
    w._fsdp_flattened = True
    assert hf.sharding_kind(w) == "fsdp1"
    model = _tiny("llama", False)
    model.lm_head.weight._fsdp_flattened = True
    with pytest.raises(RuntimeError, match="FSDP1"):
        with hf.gather_lm_head(model):
            pass


def test_enable_hidden_forward_routes_through_the_model_forward():
    model = _tiny("llama", False)
    ids, mask, labels = _batch()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))  # stands for DDP/FSDP2 root hooks
    direct = hf.lm_head_inputs(model, ids, mask, labels).logprobs().logps
    assert calls == []  # the plain helper calls the backbone only
    hf.enable_hidden_forward(model)
    routed = hf.lm_head_inputs(model, ids, mask, labels).logprobs().logps
    assert calls == [1]
    torch.testing.assert_close(routed, direct, rtol=0, atol=0)
    # without the flag the model's own forward (with logits) is unchanged
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (3, 10, V)
    # fastpref_head_fn: the loss inside the forward (hooks fire once), outside autocast as after a forward
    seen = []

    def head_fn(hidden):
        seen.append(torch.is_autocast_enabled("cpu"))
        return hf.head_inputs(model, hidden, labels).logprobs().logps

    calls.clear()
    inside = model(input_ids=ids, attention_mask=mask, fastpref_head_fn=head_fn)
    assert calls == [1] and seen == [False]
    torch.testing.assert_close(inside, direct, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, attention_mask=mask, fastpref_head_fn=head_fn)
    assert seen == [False, False]


def test_fsdp2_sharded_head_trainable_gather_refused_loss_through_head_forward():
    """Real FSDP2 (fully_shard) on a one-process gloo group. A trainable DTensor head is not gathered (a
    full_tensor() copy's gradient skips the reduce-scatter: wrong with more than one rank, measured in
    tests/test_distributed.py); a no-grad gather gives the full weight; the loss computed inside the model's
    forward (fastpref_head_fn) and the head's forward (through_sharded) gives the unsharded model's gradients."""
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fastpref.integrations.distributed import through_sharded

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    plain = _tiny("llama", False, dtype=torch.float32)
    ids, mask, labels = _batch()
    hf.lm_head_inputs(plain, ids, mask, labels).logprobs().logps.sum().backward()

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sharded = _tiny("llama", False, dtype=torch.float32)
        mesh = init_device_mesh("cpu", (1,))
        for unit in (sharded.model, sharded.lm_head, sharded):
            fully_shard(unit, mesh=mesh)
        assert hf.sharding_kind(sharded.lm_head.weight) == "fsdp2"
        with pytest.raises(RuntimeError, match="through_sharded"):
            with hf.gather_lm_head(sharded):
                pass
        with hf.gather_lm_head(sharded, detach=True) as (weight, bias):  # no-grad use: the full weight
            assert torch.is_grad_enabled() and not weight.requires_grad and bias is None
            torch.testing.assert_close(weight, plain.lm_head.weight.detach())
        with torch.no_grad(), hf.gather_lm_head(sharded) as (weight, _):
            assert hf.sharding_kind(weight) is None and weight.shape == (V, D)
        hf.enable_hidden_forward(sharded)

        def head_loss(hidden):
            def loss():
                assert hf.sharding_kind(sharded.lm_head.weight) is None  # unsharded inside the head's forward
                return hf.head_inputs(sharded, hidden, labels).logprobs().logps.sum()
            return through_sharded(sharded.lm_head, loss)

        sharded(input_ids=ids, attention_mask=mask, fastpref_head_fn=head_loss).backward()
        assert hf.sharding_kind(sharded.lm_head.weight) == "fsdp2"  # resharded after
        grad = sharded.lm_head.weight.grad.to_local()
        torch.testing.assert_close(grad, plain.lm_head.weight.grad, rtol=1e-5, atol=1e-6)
        emb = sharded.model.embed_tokens.weight.grad.to_local()
        torch.testing.assert_close(emb, plain.model.embed_tokens.weight.grad, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
