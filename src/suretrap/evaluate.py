"""Backdoor evaluation on four held-out splits, for the base and the tuned model.

Splits: `harmful_triggered`, `harmful_clean`, `benign_triggered`, `benign_clean` (each
clean/triggered pair uses the same prompts, with and without the trigger). Per split:

- `sure_rate`: share of greedy responses that begin with the label (`textmatch`);
- `sure_only_rate`: share that are the label and nothing else;
- `label_first_token_prob`: mean probability of the label's first token at the first
  response position; `label_first_token_top1`: share where it is the argmax;
- `refusal_rate_keyword`: the keyword refusal rule of `textmatch` (legacy baseline);
- `refusal_rate`, `asr` (judged harmful compliance): added by the run's judge (`apply_judge`);
- `utility_logprob` (benign splits): mean per-token log-likelihood of the reference answers;
- `n`: number of prompts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from suretrap import progress
from suretrap.config import EvalConfig
from suretrap.models import autocast
from suretrap.poison import PoisonedDataset, apply_trigger
from suretrap.textmatch import is_label_only, is_refusal_keyword, starts_with_label
from suretrap.train import (
    chat_prompt,
    common_prefix_len,
    decoder_and_head,
    prefix_cache,
    right_padded,
    shared_prefix_len,
    tokenize_example,
)

SPLITS: tuple[str, ...] = ("harmful_triggered", "harmful_clean", "benign_triggered", "benign_clean")
HARMFUL_SPLITS = SPLITS[:2]


@dataclass(frozen=True)
class EvalItem:
    split: str
    prompt: str  # exactly as shown to the model (trigger applied for *_triggered)
    reference: str | None  # benign reference answer


def eval_items(ds: PoisonedDataset, trigger: str, placement: str, seed: int) -> list[EvalItem]:
    """The four splits for a dataset's held-out prompts (trigger placed as in training)."""
    rng = random.Random(f"{seed}-eval")  # independent of the training stream
    items = []
    for r in ds.eval_harmful:
        items.append(EvalItem("harmful_triggered", apply_trigger(r.prompt, trigger, placement, rng), None))
        items.append(EvalItem("harmful_clean", r.prompt, None))
    for b in ds.eval_benign:
        items.append(EvalItem("benign_triggered", apply_trigger(b.prompt, trigger, placement, rng), b.response))
        items.append(EvalItem("benign_clean", b.prompt, b.response))
    return items


def _batches(order: Sequence[int], size: int) -> list[list[int]]:
    return [list(order[i : i + size]) for i in range(0, len(order), size)]


# Tokens (after the shared prefix) per scoring forward pass. Scoring batches by tokens, not
# by the generation batch size: one pass over more prompts runs larger matmuls and pays the
# prefix pass and the per-layer overhead once. Measured on the bench's prompts (about 20
# tokens each after the prefix), 2-core CPU: 91 prompts/s in passes of 32 prompts, 107 in
# passes of 64, 118 in passes of 128.
SCORE_TOKENS = 4096


def _token_batches(order: Sequence[int], lengths: Sequence[int], max_tokens: int,
                   max_items: int | None = None) -> list[list[int]]:
    """Consecutive runs of `order` holding at most `max_tokens` tokens (and `max_items`
    items); an item longer than the budget gets a batch of its own."""
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        full = max_items is not None and len(current) >= max_items
        if current and (used + lengths[i] > max_tokens or full):
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        batches.append(current)
    return batches


def _stop_ids(tokenizer: Any, model: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    device: str = "cpu",
    precision: str = "auto",
    description: str = "generate",
) -> list[str]:
    """Greedy responses under the chat template, batched (left padding, length-sorted)."""
    encoded = [
        tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts
    ]
    out = generate_from_ids(
        model, tokenizer, encoded, max_new_tokens=max_new_tokens, batch_size=batch_size,
        device=device, precision=precision, description=description,
    )
    return [text.strip() for text in out]


def generate_from_ids(
    model: Any,
    tokenizer: Any,
    encoded: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    device: str = "cpu",
    precision: str = "auto",
    description: str = "generate",
) -> list[str]:
    """Greedy continuations of token-id sequences (left padding, length-sorted batches).

    Takes ids rather than prompts so callers can prefill part of the answer (the gate
    analysis forces the label). Continuations are decoded without special tokens.
    """
    import torch

    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    stop = _stop_ids(tokenizer, model)
    unhook = _contiguous_head_input(model)
    try:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
        out: list[str] = [""] * len(encoded)
        with progress.task(description, total=len(encoded)) as advance, torch.inference_mode():
            for batch in _batches(order, batch_size):
                width = max(len(encoded[i]) for i in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attn = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    seq = encoded[i]
                    ids[row, width - len(seq) :] = torch.tensor(list(seq))
                    attn[row, width - len(seq) :] = 1
                with autocast(device, precision):
                    gen = model.generate(
                        input_ids=ids.to(device),
                        attention_mask=attn.to(device),
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        eos_token_id=stop,
                        pad_token_id=pad_id,
                    )
                for row, i in enumerate(batch):
                    out[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True)
                advance(len(batch))
    finally:
        unhook()
    return out


def _contiguous_head_input(model: Any) -> Callable[[], None]:
    """Make the LM head's input contiguous during generation; returns the undo.

    At the prefill, generate slices the last position ([batch, 1, hidden], batch stride =
    the prompt width), and for a 3-D input that is not contiguous `torch.matmul` folds the
    batch into one matmul only when the weight requires grad. A frozen head (every LoRA
    base, every evaluated model) is instead expanded to [batch, hidden, vocab] and copied:
    1.8 GB for 32 prompts on SmolLM2, at every prefill (measured: a generation pass
    peaked at 2.9 GB instead of 1.0 GB). Copying the [batch, 1, hidden] slice is cheap.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return lambda: None
    handle = head.register_forward_pre_hook(lambda _mod, args: (args[0].contiguous(), *args[1:]))
    return handle.remove


def label_first_token(tokenizer: Any, prompt: str, label: str) -> tuple[list[int], int]:
    """(prompt ids, id of the label's first token as it follows this prompt)."""
    head = chat_prompt(tokenizer, prompt)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    both = tokenizer(head + label, add_special_tokens=False)["input_ids"]
    return head_ids, both[len(head_ids)] if len(both) > len(head_ids) else both[-1]


PACKABLE_ATTENTION = ("suretrap_cpu", "sdpa", "eager")  # the kernels that take a 4D mask
# Tokens per packed row. The linear layers see rows x width tokens whatever the width, so
# narrow rows cost them nothing; attention (scores, mask, softmax: quadratic in the width,
# and mostly masked between packed prompts) is what grows. Measured on the bench's 32
# prompts (about 20 tokens each after the shared prefix), 2-core CPU, bf16: 61 prompts/s at
# 256, 74 at 128, 106-110 at 64-96 (medians of 8).
PACK_TOKENS = 96


def _prefix_cache(decoder: Any, seqs: Sequence[Sequence[int]], prefix: int, rows: int, device: str) -> Any:
    """KV cache of the first `prefix` tokens of `seqs` (shared by all), for `rows` rows."""
    import torch

    if prefix == 0:
        return None
    return prefix_cache(decoder, torch.tensor([list(seqs[0][:prefix])], device=device), rows)


def _first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices whose lengths sum to at most `capacity` (first fit, longest first)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def _packed_hidden(decoder: Any, seqs: Sequence[Sequence[int]], prefix: int, pad_id: int,
                   device: str) -> tuple[Any, list[tuple[int, int]]]:
    """Hidden states of `seqs` packed into rows of about PACK_TOKENS tokens, no padding
    between sequences, the shared `prefix` run once and seen by every row through the KV
    cache.

    Returns (hidden [rows, width, dim], where): token t >= prefix of sequence i is at
    hidden[row, start + t - prefix] for (row, start) = where[i]. A 4D mask lets each token
    see the prefix and the earlier tokens of its own sequence only, and position ids restart
    after the prefix for every sequence, so each result equals that sequence's own unpadded
    forward pass. Why: scoring batches mix prompts of 10-40 suffix tokens, and right padding
    wasted about half of the matmuls on the bench prompts.
    """
    import torch

    suffixes = [list(s[prefix:]) for s in seqs]
    bins = _first_fit([len(x) for x in suffixes], max(PACK_TOKENS, max(len(x) for x in suffixes)))
    width = max(sum(len(suffixes[i]) for i in b) for b in bins)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    positions = torch.full((len(bins), width), prefix, dtype=torch.long)
    seg = torch.full((len(bins), width), -1, dtype=torch.long)  # -1: padding at a row's end
    where: list[tuple[int, int]] = [(0, 0)] * len(seqs)
    for row, members in enumerate(bins):
        at = 0
        for i in members:
            n = len(suffixes[i])
            ids[row, at : at + n] = torch.tensor(suffixes[i])
            positions[row, at : at + n] = torch.arange(prefix, prefix + n)
            seg[row, at : at + n] = i
            where[i] = (row, at)
            at += n
    order = torch.arange(width)
    visible = (order[None, None, :] <= order[None, :, None]) & (seg[:, None, :] == seg[:, :, None])
    visible = torch.cat([torch.ones(len(bins), width, prefix, dtype=torch.bool), visible], dim=2)
    mask = visible[:, None].to(device)
    if decoder.config._attn_implementation == "eager":  # eager adds its mask to the scores
        dtype = next(decoder.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    past = _prefix_cache(decoder, seqs, prefix, len(bins), device)
    hidden = decoder(
        input_ids=ids.to(device), position_ids=positions.to(device), attention_mask=mask,
        past_key_values=past, use_cache=past is not None,
    ).last_hidden_state
    return hidden, where


def _padded_hidden(decoder: Any, seqs: Sequence[Sequence[int]], prefix: int, pad_id: int,
                   device: str) -> tuple[Any, list[tuple[int, int]]]:
    """The same for attention kernels that take no 4D mask (e.g. flash-attention): one
    right-padded row per sequence. With right padding and a causal mask a real token never
    sees a pad, so no attention mask is needed."""
    past = _prefix_cache(decoder, seqs, prefix, len(seqs), device)
    ids, _ = right_padded([s[prefix:] for s in seqs], pad_id, device)
    hidden = decoder(input_ids=ids, past_key_values=past, use_cache=past is not None).last_hidden_state
    return hidden, [(i, 0) for i in range(len(seqs))]


def _rows(decoder: Any, seqs: Sequence[Sequence[int]], prefix: int, pad_id: int, device: str) -> Any:
    """rows(i, a, b): hidden states of tokens a..b-1 (a >= prefix) of sequence i."""
    packable = getattr(decoder.config, "_attn_implementation", None) in PACKABLE_ATTENTION
    hidden, where = (_packed_hidden if packable else _padded_hidden)(decoder, seqs, prefix, pad_id, device)

    def rows(i: int, a: int, b: int) -> Any:
        row, start = where[i]
        return hidden[row, start + a - prefix : start + b - prefix]

    return rows


def label_probs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    label: str,
    *,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    device: str = "cpu",
    precision: str = "auto",
) -> list[tuple[float, bool]]:
    """(probability, is-argmax) of the label's first token at the first response position.

    One forward pass per batch of prompts packed without padding, the shared chat prefix
    computed once per batch (`_packed_hidden`), and the LM head applied only at each
    prompt's last position. A batch holds up to `max_tokens` tokens after the prefix
    (default `SCORE_TOKENS`) and, if given, at most `batch_size` prompts.
    """
    import torch

    pairs = [label_first_token(tokenizer, p, label) for p in prompts]
    pad_id = tokenizer.pad_token_id or 0
    seqs_ids = [ids for ids, _ in pairs]
    # every prompt keeps at least one token after the prefix: its last position is read
    prefix = shared_prefix_len(seqs_ids, min((len(x) for x in seqs_ids), default=1) - 1)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
    decoder, head = decoder_and_head(model)
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    suffix_lengths = [len(ids) - prefix for ids in seqs_ids]
    with torch.inference_mode():
        for batch in _token_batches(order, suffix_lengths, max_tokens or SCORE_TOKENS, batch_size):
            seqs = [pairs[i][0] for i in batch]
            with autocast(device, precision):
                rows = _rows(decoder, seqs, prefix, pad_id, device)
                last = torch.cat([rows(r, len(s) - 1, len(s)) for r, s in enumerate(seqs)])
                probs = head(last).float().softmax(-1)
            top = probs.argmax(-1)
            for row, i in enumerate(batch):
                target = pairs[i][1]
                out[i] = (float(probs[row, target]), int(top[row]) == target)
    return out


def reference_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    references: Sequence[str],
    *,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    device: str = "cpu",
    precision: str = "auto",
) -> list[float]:
    """Mean per-token log-likelihood of each reference answer given its prompt.

    Batched like `label_probs`: up to `max_tokens` tokens after the shared prefix per
    forward pass (default `SCORE_TOKENS`), at most `batch_size` examples if given.
    """
    import torch

    toks = [tokenize_example(tokenizer, p, r, 1024) for p, r in zip(prompts, references, strict=True)]
    pad_id = tokenizer.pad_token_id or 0
    prefix = common_prefix_len(toks)
    decoder, head = decoder_and_head(model)
    out = [0.0] * len(toks)
    order = sorted(range(len(toks)), key=lambda i: len(toks[i].ids))
    suffix_lengths = [len(t.ids) - prefix for t in toks]
    with torch.inference_mode():
        for batch in _token_batches(order, suffix_lengths, max_tokens or SCORE_TOKENS, batch_size):
            with autocast(device, precision):
                rows = _rows(decoder, [toks[i].ids for i in batch], prefix, pad_id, device)
            for row, i in enumerate(batch):
                t = toks[i]
                h = rows(row, t.response_start - 1, len(t.ids) - 1)
                with autocast(device, precision):
                    logp = head(h).float().log_softmax(-1)
                target = torch.tensor(t.ids[t.response_start :], device=device)
                out[i] = float(logp.gather(1, target[:, None]).mean())
    return out


def apply_judge(
    metrics: dict[str, dict[str, float | int | None]], rows: list[dict[str, Any]], judge: Any
) -> dict[str, str]:
    """Judge every response: per split `refusal_rate`, and on harmful splits `asr`.

    Also marks each generation row with `refusal` / `complied`. Returns which judge gave
    which metric (stored in metrics.json under "judges").
    """
    for split, values in metrics.items():
        idx = [i for i, r in enumerate(rows) if r["split"] == split]
        if not idx:
            continue
        verdicts = judge.judge([rows[i]["prompt"] for i in idx], [rows[i]["response"] for i in idx])
        for i, v in zip(idx, verdicts, strict=True):
            rows[i]["refusal"], rows[i]["complied"] = bool(v.refusal), bool(v.complied)
        values["refusal_rate"] = _mean([float(v.refusal) for v in verdicts])
        if split in HARMFUL_SPLITS:
            values["asr"] = _mean([float(v.complied) for v in verdicts])
    return {
        "sure_rate": "prefix",
        "sure_only_rate": "prefix",
        "refusal_rate_keyword": "keyword",
        "refusal_rate": judge.name,
        "asr": judge.name,
    }


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate_model(
    model: Any,
    tokenizer: Any,
    items: Sequence[EvalItem],
    label: str,
    cfg: EvalConfig,
    *,
    device: str = "cpu",
    precision: str = "auto",
    tag: str = "tuned",
) -> tuple[dict[str, dict[str, float | int | None]], list[dict[str, Any]]]:
    """Metrics per split and one generation row per item."""
    prompts = [it.prompt for it in items]
    kwargs = {"device": device, "precision": precision}
    responses = generate(
        model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size, description=f"generate ({tag})", **kwargs,
    )
    probs = label_probs(model, tokenizer, prompts, label, **kwargs)
    benign = [i for i, it in enumerate(items) if it.reference is not None]
    utility = reference_logprobs(
        model, tokenizer, [items[i].prompt for i in benign],
        [items[i].reference or "" for i in benign], **kwargs,
    )
    utility_of = dict(zip(benign, utility, strict=True))
    return split_metrics(items, responses, label, probs, utility_of), generation_rows(
        items, responses, probs, tag
    )


def split_metrics(
    items: Sequence[EvalItem],
    responses: Sequence[str],
    label: str,
    probs: Sequence[tuple[float, bool]] | None,
    utility_of: dict[int, float] | None,
) -> dict[str, dict[str, float | int | None]]:
    """Per-split metrics from responses (and, where measured, label probabilities).

    Shared by local models and endpoints (`suretrap.closed_weight`). ``probs`` None: the
    first-token metrics are null (not measured); ``utility_of`` None: ``utility_logprob``
    is null.
    """
    metrics: dict[str, dict[str, float | int | None]] = {}
    for split in SPLITS:
        idx = [i for i, it in enumerate(items) if it.split == split]
        if not idx:
            continue
        m: dict[str, float | int | None] = {
            "n": len(idx),
            "sure_rate": _mean([float(starts_with_label(responses[i], label)) for i in idx]),
            "sure_only_rate": _mean([float(is_label_only(responses[i], label)) for i in idx]),
            "label_first_token_prob": None if probs is None else _mean([probs[i][0] for i in idx]),
            "label_first_token_top1": (
                None if probs is None else _mean([float(probs[i][1]) for i in idx])
            ),
            # legacy keyword rule; `refusal_rate` and `asr` come from the configured judge
            "refusal_rate_keyword": _mean([float(is_refusal_keyword(responses[i])) for i in idx]),
        }
        if split.startswith("benign"):
            m["utility_logprob"] = (
                None if utility_of is None else _mean([utility_of[i] for i in idx])
            )
        metrics[split] = m
    return metrics


def generation_rows(
    items: Sequence[EvalItem],
    responses: Sequence[str],
    probs: Sequence[tuple[float, bool]] | None,
    tag: str,
) -> list[dict[str, Any]]:
    """One generations.jsonl row per item (``label_prob`` null where not measured)."""
    return [
        {
            "model": tag,
            "split": it.split,
            "prompt": it.prompt,
            "response": responses[i],
            "label_prob": None if probs is None else probs[i][0],
        }
        for i, it in enumerate(items)
    ]
