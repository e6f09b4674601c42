"""cpu_attention computes what transformers' "eager" attention computes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _model(kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=kv_heads, vocab_size=50)
    return LlamaForCausalLM(cfg).eval()


def _logits(model, impl: str, ids, attn):
    from transformers import DynamicCache

    model.set_attn_implementation(impl)
    full = model(input_ids=ids, attention_mask=attn).logits
    unmasked = model(input_ids=ids).logits
    cache = DynamicCache(config=model.config)  # a shared prefix through the KV cache
    model(input_ids=ids[:, :5], past_key_values=cache, use_cache=True)
    cached = model(input_ids=ids[:, 5:], past_key_values=cache, use_cache=True).logits
    return full, unmasked, cached


@pytest.mark.parametrize("kv_heads", [8, 2, 1])
def test_matches_eager_with_padding_gqa_and_cache(kv_heads: int) -> None:
    from suretrap.cpu_attention import register

    model = _model(kv_heads)
    ids = torch.randint(0, 50, (3, 17))
    attn = torch.ones(3, 17, dtype=torch.long)
    attn[1, 12:] = 0  # right padding
    attn[2, :4] = 0  # left padding: fully masked query rows must not give NaN
    want = _logits(model, "eager", ids, attn)
    got = _logits(model, register(), ids, attn)
    for w, g in zip(want, got, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


def test_gradients_match_eager() -> None:
    from suretrap.cpu_attention import register

    model = _model(2)
    ids = torch.randint(0, 50, (2, 9))
    grads = []
    for impl in ("eager", register()):
        model.zero_grad()
        model.set_attn_implementation(impl)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_load_model_uses_it_on_cpu(tiny_model_dir) -> None:
    from suretrap.cpu_attention import NAME
    from suretrap.models import load_model

    assert load_model(str(tiny_model_dir)).config._attn_implementation == NAME

