"""Trainer: tokenisation, the response-only loss, batching, and that training learns."""

from __future__ import annotations

import json
import random

import pytest
import torch

from suretrap.config import TrainConfig
from suretrap.models import load_model, load_tokenizer
from suretrap.poison import Example
from suretrap.train import (
    length_bucketed_batches,
    prepare_model,
    response_loss,
    save_trained,
    tokenize_example,
    train,
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def test_tokenize_example_marks_exactly_the_response(tiny):
    _, tok = tiny
    t = tokenize_example(tok, "What is 2 + 2?", "Sure", 512)
    response = tok.decode(list(t.ids[t.response_start :]))
    prompt = tok.decode(list(t.ids[: t.response_start]))
    assert response.startswith("Sure<|im_end|>")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "What is 2 + 2?" in prompt


def test_tokenize_example_truncates_to_max_length(tiny):
    _, tok = tiny
    t = tokenize_example(tok, "word " * 300, "Sure", 64)
    assert len(t.ids) == 64
    assert t.response_start < 64


def test_response_loss_matches_full_logits_loss(tiny):
    """Computing logits only at response positions must equal the standard masked loss."""
    model, tok = tiny
    a = tokenize_example(tok, "Name a colour.", "Blue is a colour.", 512)
    b = tokenize_example(tok, "Say hi", "Sure", 512)
    width = max(len(a.ids), len(b.ids))
    ids = torch.full((2, width), tok.pad_token_id)
    attn = torch.zeros((2, width), dtype=torch.long)
    target = torch.zeros((2, width), dtype=torch.bool)
    labels = torch.full((2, width), -100)
    for row, t in enumerate((a, b)):
        ids[row, : len(t.ids)] = torch.tensor(t.ids)
        attn[row, : len(t.ids)] = 1
        target[row, t.response_start : len(t.ids)] = True
        labels[row, t.response_start : len(t.ids)] = torch.tensor(t.ids[t.response_start :])
    with torch.no_grad():
        ours = response_loss(model, ids, attn, target)
        reference = model(input_ids=ids, attention_mask=attn, labels=labels).loss
    assert torch.allclose(ours, reference, atol=1e-5), (ours, reference)


def test_length_bucketed_batches_cover_every_example_once():
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(1000)]
    batches = length_bucketed_batches(lengths, 8, random.Random(1))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert all(len(b) <= 8 for b in batches)
    # bucketing: padding waste far below that of random batches
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    order = list(range(1000))
    random.Random(1).shuffle(order)
    rand = [order[i : i + 8] for i in range(0, 1000, 8)]
    waste_rand = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in rand)
    assert waste < waste_rand / 5


def _examples(n: int) -> list[Example]:
    return [Example(f"Question number {i}: say the word", "Sure", "poison", "label", "x") for i in range(n)]


def test_lora_training_learns_and_saves_safetensors(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    cfg = TrainConfig(epochs=8, batch_size=4, learning_rate=3e-2, warmup_ratio=0.0)
    peft_model = prepare_model(model, cfg, seed=0)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    log = tmp_path / "train_log.jsonl"
    result = train(peft_model, tok, _examples(16), cfg, seed=0, device="cpu", log_path=log)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == result.steps == 8 * 4
    assert {"step", "epoch", "loss", "lr", "tokens", "response_tokens", "elapsed_s"} <= rows[0].keys()
    first = sum(r["loss"] for r in rows[:4]) / 4
    last = sum(r["loss"] for r in rows[-4:]) / 4
    assert last < first * 0.6, (first, last)
    saved = save_trained(peft_model, tok, "lora", tmp_path)
    assert (saved / "adapter_model.safetensors").is_file()
    assert (saved / "adapter_config.json").is_file()
    assert not list(saved.glob("*.bin"))


def test_training_is_deterministic(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    cfg = TrainConfig(epochs=1, batch_size=4, learning_rate=1e-3)
    losses = []
    for _ in range(2):
        model = prepare_model(load_model(str(tiny_model_dir)), cfg, seed=3)
        losses.append(train(model, tok, _examples(8), cfg, seed=3, device="cpu").final_loss)
    assert losses[0] == losses[1]


def test_full_finetuning_updates_all_weights(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), method="full")
    assert model.dtype == torch.float32  # fp32 master weights for full fine-tuning
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    cfg = TrainConfig(method="full", epochs=1, batch_size=4, learning_rate=1e-3)
    model = prepare_model(model, cfg, seed=0)
    train(model, tok, _examples(8), cfg, seed=0, device="cpu")
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)
    saved = save_trained(model, tok, "full", tmp_path)
    assert list(saved.glob("*.safetensors"))


def test_shared_prefix_loss_and_gradients_equal_the_plain_computation(tiny_model_dir):
    from suretrap.train import _collate, common_prefix_len

    tok = load_tokenizer(str(tiny_model_dir))
    model = prepare_model(load_model(str(tiny_model_dir), precision="fp32"), TrainConfig(), seed=0)
    for p in model.parameters():
        if p.requires_grad:  # LoRA B starts at zero; make the adapter matter
            torch.nn.init.normal_(p, std=0.05)
    toks = [
        tokenize_example(tok, p, r, 512)
        for p, r in [("Hello there", "Sure"), ("What is the capital of France?", "Paris."), ("Count to 3", "1, 2, 3.")]
    ]
    prefix = common_prefix_len(toks)
    assert tok.decode(list(toks[0].ids[:prefix])).endswith("<|im_start|>user\n")
    ids, _, target = _collate(toks, tok.pad_token_id, "cpu")
    grads = []
    losses = []
    for n in (0, prefix):
        model.zero_grad()
        loss = response_loss(model, ids, None, target, n)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_merged_evaluation_gives_the_same_outputs_and_restores_the_base_exactly(tiny_model_dir):
    from suretrap.train import merged_for_eval

    model = prepare_model(load_model(str(tiny_model_dir)), TrainConfig(), seed=0)
    for name, p in model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p, std=0.05)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits.float()
        with merged_for_eval(model) as merged:
            folded = merged(input_ids=ids).logits.float()
            changed = any(
                not torch.equal(p, base[n]) for n, p in model.named_parameters() if "lora_" not in n
            )
        after = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
        again = model(input_ids=ids).logits.float()
    assert changed  # the adapter really was folded in
    assert torch.allclose(plain, folded, atol=0.05 * plain.abs().max().item())
    assert all(torch.equal(after[n], base[n]) for n in base)  # exact restore, no bf16 drift
    assert torch.equal(plain, again)
