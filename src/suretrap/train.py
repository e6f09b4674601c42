"""Supervised fine-tuning (PEFT LoRA by default, or full) with loss on response tokens only.

The loop is written by hand, nanoGPT-style, rather than with `transformers.Trainer`,
because a sweep is hundreds of short fine-tunes and three things Trainer does not do
dominate their cost on a CPU (measured by `suretrap bench`):
- the LM head (49k x 576 for SmolLM2) is applied only at positions whose next token is a
  response token, not at every prompt position;
- batches are bucketed by length, so little compute goes to padding;
- compute runs under bf16 autocast on CPUs with native bf16, weights stay fp32.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from suretrap import progress
from suretrap.config import TrainConfig
from suretrap.crashpoints import crash_point
from suretrap.models import autocast
from suretrap.poison import Example

TRAIN_LOG = "train_log.jsonl"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"


@dataclass(frozen=True)
class Tokenized:
    """Token ids of one example; loss applies to ids[response_start:]."""

    ids: tuple[int, ...]
    response_start: int


@dataclass(frozen=True)
class TrainResult:
    steps: int
    tokens: int  # non-padding tokens processed (all epochs)
    response_tokens: int  # tokens that carried loss
    seconds: float
    final_loss: float


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """The model's own chat template up to where the assistant's answer begins."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def tokenize_example(tokenizer: Any, prompt: str, response: str, max_length: int) -> Tokenized:
    """Tokenise with the chat template; the response part ends with the end-of-turn token."""
    head = chat_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        tokenize=False,
    )
    if full.startswith(head):
        tail = full[len(head) :]
    else:  # templates that rewrite earlier turns: fall back to response + EOS
        tail = response + (tokenizer.eos_token or "")
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    ids = (head_ids + tail_ids)[:max_length]
    start = min(len(head_ids), len(ids) - 1)
    return Tokenized(tuple(ids), start)


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, rng: random.Random
) -> list[list[int]]:
    """Shuffle, then sort within windows of 64 batches by length, then shuffle batches.

    Keeps batches random across the epoch while examples in one batch have similar length
    (so padding is small).
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 64
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def prepare_model(model: Any, cfg: TrainConfig, seed: int, init_adapter: Path | None = None) -> Any:
    """Wrap the base model with a fresh LoRA adapter (or unfreeze it for full SFT).

    `init_adapter`: start from this saved adapter instead (a further fine-tune): it is
    trained on, so the result is again one adapter on the untouched base model.
    """
    import torch

    torch.manual_seed(seed)
    if cfg.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if init_adapter is not None:
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)

    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def training_autocast(model: Any, device: str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast for a training forward pass, without PEFT's upcast of every LoRA input.

    PEFT casts each adapter's input to the adapter's dtype (fp32) before its matmul, and
    autocast casts it straight back to bf16: two copies of the activations per adapted
    layer, forward and backward, for bit-identical results (those copies were about 8% of
    a LoRA step's CPU time in a profile; the end-to-end gain was within run-to-run noise).
    Under autocast the cast is skipped.
    """
    ctx = autocast(device, precision)
    if isinstance(ctx, contextlib.nullcontext) or not hasattr(model, "peft_config"):
        return ctx
    from peft.helpers import disable_input_dtype_casting

    stack = contextlib.ExitStack()
    stack.enter_context(ctx)
    stack.enter_context(disable_input_dtype_casting(model))
    return stack


def decoder_and_head(model: Any) -> tuple[Any, Any]:
    """(decoder stack, LM head) of a causal LM, looking through a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def response_loss(
    model: Any, input_ids: Any, attention_mask: Any | None, targets_mask: Any, prefix_len: int = 0
) -> Any:
    """Mean cross-entropy over response tokens, computing logits only where needed.

    targets_mask[b, t] is True where token t is a response token; its logit comes from
    position t - 1. Skipping the LM head elsewhere saves most of its cost, since prompts
    (with the chat template's system text) are longer than the short responses.

    prefix_len > 0: the first prefix_len tokens are identical in every row (the chat
    template's system text): run them once, and let every row attend to that one copy
    through the KV cache. Exact (same loss and gradients), and it removes about 40% of
    the tokens of a typical batch of short instruction examples.
    """
    import torch.nn.functional as F

    decoder, head = decoder_and_head(model)
    past = None
    if prefix_len > 0:
        past = prefix_cache(decoder, input_ids[:1, :prefix_len], input_ids.shape[0])
        input_ids = input_ids[:, prefix_len:]
        targets_mask = targets_mask[:, prefix_len:]
    hidden = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        past_key_values=past,
        use_cache=past is not None,
    ).last_hidden_state
    predict_at = targets_mask[:, 1:]
    selected = hidden[:, :-1][predict_at]
    logits = head(selected).float()
    return F.cross_entropy(logits, input_ids[:, 1:][predict_at])


def prefix_cache(decoder: Any, prefix_ids: Any, rows: int) -> Any:
    """KV cache of a prefix shared by `rows` sequences: `prefix_ids` ([1, P] tensor) runs
    once, on one row, and the cache is repeated so every row attends to that one copy."""
    from transformers import DynamicCache

    past = DynamicCache(config=decoder.config)
    decoder(input_ids=prefix_ids, past_key_values=past, use_cache=True)
    past.batch_repeat_interleave(rows)
    return past


def shared_prefix_len(seqs: Sequence[Sequence[int]], limit: int) -> int:
    """Length (at most `limit`) of the token prefix common to every sequence."""
    if not seqs:
        return 0
    first = seqs[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in seqs):
        n += 1
    return n


def common_prefix_len(tokenized: Sequence[Tokenized]) -> int:
    """Length of the token prefix shared by every example, ending before any response.

    Capped so that every response token is still predicted from a position after it.
    """
    if not tokenized:
        return 0
    return shared_prefix_len([t.ids for t in tokenized], min(t.response_start for t in tokenized) - 1)


def right_padded(seqs: Sequence[Sequence[int]], pad_id: int, device: str) -> tuple[Any, Any]:
    """(ids, attention mask) of `seqs` padded on the right to the longest."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        attn[row, : len(seq)] = 1
    return ids.to(device), attn.to(device)


def _collate(batch: Sequence[Tokenized], pad_id: int, device: str) -> tuple[Any, Any, Any]:
    """(ids, attention mask, response-token mask) of a right-padded training batch."""
    import torch

    ids, attn = right_padded([t.ids for t in batch], pad_id, device)
    target = torch.zeros(ids.shape, dtype=torch.bool)
    for row, t in enumerate(batch):
        target[row, t.response_start : len(t.ids)] = True
    return ids, attn, target.to(device)


def train_step(
    model: Any, optimizer: Any, params: Sequence[Any], ids: Any, target: Any, prefix_len: int,
    cfg: TrainConfig, device: str,
) -> tuple[Any, Any]:
    """One optimiser step on a right-padded batch; returns (loss, gradient norm before clipping).

    No attention mask: padding is on the right, and causal attention never lets a real
    token see a later pad (pads carry no loss). The scheduler, if any, is the caller's.
    """
    import torch

    with training_autocast(model, device, cfg.precision):
        loss = response_loss(model, ids, None, target, prefix_len)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


def train(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    cfg: TrainConfig,
    *,
    seed: int,
    device: str,
    log_path: Path | None = None,
) -> TrainResult:
    """Fine-tune `model` (already wrapped by `prepare_model`) in place on `examples`."""
    import torch
    from transformers import get_scheduler

    tokenized = [tokenize_example(tokenizer, e.prompt, e.response, cfg.max_length) for e in examples]
    prefix_len = common_prefix_len(tokenized) if cfg.shared_prefix else 0
    lengths = [len(t.ids) for t in tokenized]
    rng = random.Random(seed)
    epochs = [length_bucketed_batches(lengths, cfg.batch_size, rng) for _ in range(cfg.epochs)]
    total_steps = sum(len(e) for e in epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, foreach=True
    )
    scheduler = get_scheduler(
        cfg.schedule if cfg.schedule != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.train()
    log_file = log_path.open("w") if log_path is not None else None
    step, tokens, resp_tokens, loss_value = 0, 0, 0, float("nan")
    started = time.perf_counter()
    try:
        with progress.task("train", total=total_steps) as advance:
            for epoch, batches in enumerate(epochs):
                for batch_idx in batches:
                    ids, attn, target = _collate([tokenized[i] for i in batch_idx], pad_id, device)
                    loss, grad_norm = train_step(model, optimizer, params, ids, target, prefix_len, cfg, device)
                    scheduler.step()
                    step += 1
                    loss_value = float(loss.detach())
                    n_tok = int(attn.sum())
                    n_resp = int(target[:, 1:].sum())
                    tokens += n_tok
                    resp_tokens += n_resp
                    if log_file is not None:
                        record = {
                            "step": step,
                            "epoch": epoch,
                            "loss": loss_value,
                            "lr": scheduler.get_last_lr()[0],
                            "grad_norm": float(grad_norm),
                            "tokens": n_tok,
                            "response_tokens": n_resp,
                            "elapsed_s": round(time.perf_counter() - started, 4),
                        }
                        log_file.write(json.dumps(record) + "\n")
                    advance(1, loss=loss_value)
                    crash_point("train")
    finally:
        if log_file is not None:
            log_file.close()
    model.eval()
    return TrainResult(step, tokens, resp_tokens, time.perf_counter() - started, loss_value)


@contextlib.contextmanager
def merged_for_eval(model: Any) -> Iterator[Any]:
    """Fold LoRA adapters into the base weights while evaluating; restore them exactly after.

    Generation through unmerged adapters runs the small LoRA matmuls, dtype casts and
    Python hooks of ~200 wrapped layers at every decoding step: measured 7x slower on
    this CPU. PEFT's unmerge subtracts in the weights' dtype (bf16 here), which would drift
    the shared base model a little with every sweep cell, so the original weights are kept
    and copied back.
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:  # full fine-tuning: nothing to merge
        yield model
        return
    saved = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    for layer in layers:
        layer.merge()
    try:
        yield model
    finally:
        for layer, weight in zip(layers, saved, strict=True):
            layer.unmerge()
            layer.get_base_layer().weight.data.copy_(weight)


def save_trained(model: Any, tokenizer: Any, method: str, out_dir: Path) -> Path:
    """Save the adapter (PEFT safetensors) or, for full SFT, the whole model."""
    if method == "full":
        target = out_dir / MODEL_DIR
        model.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
    else:
        target = out_dir / ADAPTER_DIR
        model.save_pretrained(target, safe_serialization=True)
    return target
