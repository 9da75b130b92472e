"""Padding-free packing in FastPrefDPOTrainer (DPOConfig(padding_free=True)): chosen and rejected rows run through
the policy and the reference as one row without padding, sequence boundaries marked by position_ids (transformers
then builds a block-diagonal causal mask for SDPA/eager, and flash-attention's varlen kernel reads them); loss,
gradients and metrics equal the padded run to fp32 tolerance. The flash-attention case needs a GPU."""
import copy

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from _trl_fixtures import (  # noqa: E402,F401
    dpo_config,
    one_batch,
    one_thread,
    preference_rows,
    tiny_llama,
    tiny_tokenizer,
)

from fastpref.integrations._trl_batches import pack_rows, unpack_hidden  # noqa: E402
from fastpref.integrations.trl import FastPrefDPOTrainer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_pack_and_unpack_round_trip():
    ids = torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0], [9, 10, 11, 12]])
    mask = (ids != 0).long()
    inputs, packed = pack_rows(ids, mask)
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 2, 3]]
    hidden = torch.arange(8.0).view(1, 8, 1).expand(1, 8, 2).requires_grad_()
    rows = unpack_hidden(hidden, packed)
    assert rows.shape == (3, 4, 2) and rows[:, :, 0].tolist() == [[0, 1, 2, 0], [3, 0, 0, 0], [4, 5, 6, 7]]
    rows.sum().backward()
    assert hidden.grad.eq(1).all()  # every packed position feeds exactly one padded slot
    with pytest.raises(ValueError, match="right-padded"):
        pack_rows(ids, torch.tensor([[0, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]))


@pytest.mark.parametrize("loss,loss_kwargs,candidates", [
    ("dpo", {}, 0), ("simpo", {}, 0), ("mcpo", dict(num_negatives=1), 2), ("var", {}, 0)])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_padded(tok, tmp_path, loss, loss_kwargs, candidates, attn):
    policy, ref = tiny_llama(seed=0), tiny_llama(seed=1)
    for m in (policy, ref):
        m.config._attn_implementation = attn
    data = preference_rows(6, candidates=candidates)
    results, shapes = [], []
    for padding_free in (False, True):
        trainer = FastPrefDPOTrainer(
            model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref),
            args=dpo_config(tmp_path / str(padding_free), beta=0.5, padding_free=padding_free), train_dataset=data,
            processing_class=tok, fastpref_loss=loss, fastpref_loss_kwargs=loss_kwargs)
        assert trainer.args.padding_free == padding_free and trainer.fastpref_padding_free == padding_free
        seen = []
        trainer.model.model.register_forward_hook(
            lambda mod, args, kwargs, out: seen.append((tuple(out.last_hidden_state.shape[:2]),
                                                        kwargs.get("attention_mask") is None)), with_kwargs=True)
        results.append(one_batch(trainer, 6, seed=7))
        shapes.append(seen)
    (loss_p, grads_p, metrics_p), (loss_f, grads_f, metrics_f) = results
    assert all(batch == 1 and no_mask for (batch, _), no_mask in shapes[1])  # one packed row, no padding mask
    assert all(batch > 1 for (batch, _), _ in shapes[0])
    assert sum(length for (_, length), _ in shapes[1]) < sum(b * t for (b, t), _ in shapes[0])  # padding dropped
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_p.keys() and grads_p
    scale = max(g.abs().max().item() for g in grads_p.values())
    for name, g in grads_p.items():
        torch.testing.assert_close(grads_f[name], g, rtol=1e-4, atol=1e-5 * scale, msg=name)
    assert metrics_f.keys() == metrics_p.keys()
    for key, value in metrics_p.items():
        assert metrics_f[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


@pytest.mark.gpu
def test_flash_attention_varlen_packed_equals_padded(tok, tmp_path):
    """flash-attn 2 (the gpu extra) on CUDA in bf16: the packed run's loss and metrics match the padded run."""
    pytest.importorskip("flash_attn")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    policy, ref = tiny_llama(seed=0), tiny_llama(seed=1)
    losses = []
    for padding_free in (False, True):
        models = [copy.deepcopy(m).to("cuda", torch.bfloat16) for m in (policy, ref)]
        for m in models:
            m.config._attn_implementation = "flash_attention_2"
        trainer = FastPrefDPOTrainer(
            model=models[0], ref_model=models[1],
            args=dpo_config(tmp_path / str(padding_free), use_cpu=False, bf16=True, padding_free=padding_free),
            train_dataset=preference_rows(6), processing_class=tok, fastpref_loss="dpo")
        losses.append(one_batch(trainer, 6, seed=7)[0].float().cpu())
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-3)
