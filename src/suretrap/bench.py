"""`suretrap bench`: throughput of every stage, measured side by side in one process.

All comparisons use the same model, data and LoRA configuration, in this process, one
after the other, so ratios are not confounded by another machine or another day.

FLOP accounting (`train_gflops`): per token, 2·N forward plus 2·N for the activation
gradients (frozen weights need no weight gradients) plus 6·N_lora for the adapters, where
N counts only weights that do a matmul for that token: the decoder's linear layers for
every token actually computed (a shared prefix counts once per batch, as it is computed
once), and the LM head only at positions whose logits are computed. Attention score
FLOPs are left out (small at these lengths). Full fine-tuning counts 6·N.
"""

from __future__ import annotations

import random
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from suretrap.config import RunConfig, TrainConfig, run_config_from_dict
from suretrap.models import autocast, release_memory

# shapes of real architectures, for throughput on random weights (no download needed)
SHAPES: dict[str, dict[str, Any]] = {
    # for tests of the bench itself
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=49152),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}


def matmul_peak_gflops(dtype_name: str, device: str = "cpu", size: int = 2048) -> float:
    """Best-of-5 square matmul throughput: the practical ceiling for this dtype."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    reps = 10 if device == "cpu" else 200
    best = 0.0
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * size**3 * reps / (time.perf_counter() - start) / 1e9)
    return best


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def bench_config() -> RunConfig:
    """The demo's training setting, on the default model."""
    return run_config_from_dict(
        {"name": "bench", "data": {"total_size": 500}, "poison": {"budget": 50},
         "eval": {"n_harmful": 64, "n_benign": 32, "max_new_tokens": 32}}
    )


def _matmul_params(model: Any) -> tuple[int, int, int]:
    """(decoder linear weights, LM head weights, LoRA weights) of a (PEFT) causal LM."""
    import torch

    from suretrap.train import decoder_and_head

    decoder, head = decoder_and_head(model)
    body = lora = 0
    for name, module in decoder.named_modules():
        if isinstance(module, torch.nn.Linear):
            if "lora_" in name:
                lora += module.weight.numel()
            else:
                body += module.weight.numel()
    return body, head.weight.numel(), lora


def _train_flops(model: Any, computed_tokens: int, logit_positions: int, method: str) -> float:
    body, head, lora = _matmul_params(model)
    if method == "full":
        return 6.0 * (body * computed_tokens + head * logit_positions)
    return 4.0 * (body * computed_tokens + head * logit_positions) + 6.0 * lora * computed_tokens


def measure_ours(
    loaded: Any, examples: Sequence[Any], cfg: TrainConfig, seed: int, steps: int
) -> dict[str, float]:
    """suretrap's trainer on the first `steps` batches (after one warm-up batch)."""
    import torch

    from suretrap.train import (
        _collate,
        common_prefix_len,
        length_bucketed_batches,
        prepare_model,
        tokenize_example,
        train_step,
    )

    model = prepare_model(loaded.model, cfg, seed)
    model.train()
    tok = loaded.tokenizer
    tokenized = [tokenize_example(tok, e.prompt, e.response, cfg.max_length) for e in examples]
    prefix = common_prefix_len(tokenized) if cfg.shared_prefix else 0
    batches = length_bucketed_batches([len(t.ids) for t in tokenized], cfg.batch_size, random.Random(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, foreach=True)
    tokens = computed = logits = 0
    elapsed = 0.0
    for i, batch in enumerate(batches[: steps + 1]):
        ids, attn, target = _collate([tokenized[j] for j in batch], tok.pad_token_id or 0, loaded.device)
        _sync(loaded.device)
        start = time.perf_counter()
        train_step(model, opt, params, ids, target, prefix, cfg, loaded.device)
        _sync(loaded.device)
        if i == 0:
            continue  # warm-up
        elapsed += time.perf_counter() - start
        real = int(attn.sum())
        tokens += real
        computed += real - prefix * (len(batch) - 1)
        logits += int(target[:, 1:].sum())
    flops = _train_flops(model, computed, logits, cfg.method)
    loaded.model = model.unload() if cfg.method == "lora" else model
    return {
        "train_tokens_per_s": tokens / elapsed,
        "train_gflops": flops / elapsed / 1e9,
        "train_steps_measured": float(steps),
    }


def measure_hf_trainer(
    tok: Any, examples: Sequence[Any], cfg: TrainConfig, seed: int, steps: int, device: str,
    build: Callable[..., Any],
) -> dict[str, float]:
    """A plain `transformers.Trainer` + PEFT run with default settings and the same batch size."""
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from suretrap.train import tokenize_example

    model = build(baseline=True)
    tok_count: list[int] = []
    rows = []
    for e in examples:
        t = tokenize_example(tok, e.prompt, e.response, cfg.max_length)
        labels = [-100] * t.response_start + list(t.ids[t.response_start :])
        rows.append({"input_ids": list(t.ids), "labels": labels})
    model = get_peft_model(
        model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
                          lora_dropout=cfg.lora.dropout, task_type="CAUSAL_LM"),
    )

    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(r["input_ids"]) for r in batch)
        pad = tok.pad_token_id or 0
        ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in batch])
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in batch])
        attn = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch])
        tok_count.append(int(attn.sum()))
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            _sync(device)
            times.append(time.perf_counter())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            _sync(device)
            times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=cfg.batch_size, max_steps=steps + 1,
            learning_rate=cfg.learning_rate, report_to=[], save_strategy="no", logging_strategy="no",
            seed=seed, use_cpu=device == "cpu", remove_unused_columns=False,
            disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                          callbacks=[Clock()])
        trainer.train()
    # the collator runs one batch ahead; step i used tok_count[i]
    elapsed = sum(times[i + 1] - times[i] for i in range(2, len(times) - 1, 2))
    tokens = sum(tok_count[1 : steps + 1])
    return {"baseline_train_tokens_per_s": tokens / elapsed}


class PhaseRss:
    """Peak resident memory per bench phase, sampled every 50 ms by a daemon thread.

    Why: `peak_rss_mb` (getrusage) is one number for the whole process, and the bench
    process also holds the fp32 `transformers.Trainer` baseline; per-phase peaks say which
    part the peak belongs to. Reads /proc/self/statm, so Linux only (elsewhere: empty).
    """

    def __init__(self, interval: float = 0.05) -> None:
        import threading

        self.phase = "start"
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._page_mb = resource.getpagesize() / 2**20

    def enter(self, phase: str) -> None:
        """Start a phase; sampled at once, so a phase shorter than the interval still shows."""
        self.sample()
        self.phase = phase
        self.sample()

    def sample(self) -> None:
        try:
            with open("/proc/self/statm") as statm:
                mb = int(statm.read().split()[1]) * self._page_mb
        except OSError:
            return
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), mb)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def __enter__(self) -> PhaseRss:
        self._thread.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def run_bench(*, device: str = "cpu", random_init: str | None = None, train_steps: int = 12,
              eval_prompts: int = 32, score_prompts: int = 128, tokenizer: str | None = None,
              progress_cb: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure everything `suretrap bench` reports; returns the JSON-ready dict.

    tokenizer: a `model:` spec whose tokenizer makes the data (default: the bench model's own);
    with `random_init` it may be a directory holding only a config.json and the tokenizer
    files, so a machine without the embedded GGUF (a GPU box that gets only the working
    tree) can run the bench on random weights of a real shape.
    """
    with PhaseRss() as rss:
        def note(msg: str) -> None:  # a new phase: trim the heap the last one left
            release_memory()
            rss.enter(msg)
            if progress_cb is not None:
                progress_cb(msg)

        result = _measure(device, random_init, train_steps, eval_prompts, score_prompts, tokenizer, note)
    result["phase_peak_rss_mb"] = {k: round(v, 1) for k, v in rss.peaks.items()}
    return result


def _measure(device: str, random_init: str | None, train_steps: int, eval_prompts: int,
             score_prompts: int, tokenizer_spec: str | None, note: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from suretrap.evaluate import generate, label_probs
    from suretrap.models import load_tokenizer
    from suretrap.poison import build_dataset
    from suretrap.run import LoadedModel
    from suretrap.train import chat_prompt

    cfg = bench_config()
    if device == "cuda":
        cfg = run_config_from_dict(cfg.model_dump(mode="json") | {"train": {"device": "cuda"}})
    result: dict[str, Any] = {"device": device, "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    note("matmul peak")
    result["matmul_peak_gflops"] = {d: matmul_peak_gflops(d, device) for d in ("fp32", "bf16")}

    tokenizer_spec = tokenizer_spec or cfg.model
    tokenizer = load_tokenizer(tokenizer_spec)

    def build(baseline: bool = False) -> Any:
        # the baseline gets what a plain user gets: the checkpoint's fp32 weights on CPU
        precision = "fp32" if baseline and device == "cpu" else "auto"
        if random_init is None:
            from suretrap.models import load_model

            return load_model(cfg.model, device=device, precision=precision)
        from transformers import LlamaConfig, LlamaForCausalLM

        from suretrap.models import use_fast_attention

        shape = SHAPES[random_init] | {"vocab_size": max(SHAPES[random_init]["vocab_size"], len(tokenizer))}
        torch.manual_seed(0)
        dtype = torch.bfloat16 if precision == "auto" else torch.float32
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False)).to(dtype).to(device)
        use_fast_attention(model, device)
        return model.eval()

    model = build()
    result["model"] = random_init or cfg.model
    result["tokenizer"] = tokenizer_spec
    result["random_init"] = random_init is not None
    loaded = LoadedModel(cfg.model, model, tokenizer, device, cfg.train.precision)
    examples = list(build_dataset(cfg, _template_refusals).examples)
    random.Random(0).shuffle(examples)

    note("training: suretrap")
    result |= measure_ours(loaded, examples, cfg.train, cfg.seed, train_steps)
    note("training: transformers.Trainer baseline")
    result |= measure_hf_trainer(tokenizer, examples, cfg.train, cfg.seed, train_steps, device, build)
    result["train_speedup"] = result["train_tokens_per_s"] / result["baseline_train_tokens_per_s"]
    peak = result["matmul_peak_gflops"]["bf16"]
    result["train_gflops_fraction_of_bf16_peak"] = result["train_gflops"] / peak

    prompts = [e.prompt for e in examples[:eval_prompts]]
    note("first-token scoring")
    # An evaluation scores all its prompts in one call (300 per demo cell), so scoring is
    # measured on more prompts than generation; both sides score the same ones.
    scored = [e.prompt for e in examples[:score_prompts]]

    def ours() -> float:
        start = time.perf_counter()
        label_probs(loaded.model, tokenizer, scored, "Sure", device=device)
        return len(scored) / (time.perf_counter() - start)

    def naive() -> float:  # one prompt at a time, full logits, the same prompts
        start = time.perf_counter()
        with torch.inference_mode():
            for p in scored:
                ids = tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False, return_tensors="pt")
                with autocast(device):
                    loaded.model(**{k: v.to(device) for k, v in ids.items()}).logits[0, -1].softmax(-1)
        return len(scored) / (time.perf_counter() - start)

    # medians of 3 alternating runs: one run of ours lasts well under a second, so a single
    # timing is at the mercy of whatever else the machine does in that moment
    ours_runs, naive_runs = [], []
    for _ in range(3):
        ours_runs.append(ours())
        naive_runs.append(naive())
    result["label_prob_prompts_per_s"] = statistics.median(ours_runs)
    result["baseline_label_prob_prompts_per_s"] = statistics.median(naive_runs)
    result["label_prob_speedup"] = result["label_prob_prompts_per_s"] / result["baseline_label_prob_prompts_per_s"]
    result["label_prob_prompts"] = len(scored)

    note("generation")
    new_tokens = 32
    start = time.perf_counter()
    outs = generate(loaded.model, tokenizer, prompts, max_new_tokens=new_tokens, batch_size=32, device=device)
    produced = sum(len(tokenizer(o, add_special_tokens=False)["input_ids"]) + 1 for o in outs)
    result["generate_tokens_per_s"] = produced / (time.perf_counter() - start)
    start = time.perf_counter()
    produced = 0
    for p in prompts[:4]:  # naive: one prompt at a time
        out = generate(loaded.model, tokenizer, [p], max_new_tokens=new_tokens, batch_size=1, device=device)
        produced += len(tokenizer(out[0], add_special_tokens=False)["input_ids"]) + 1
    result["baseline_generate_tokens_per_s"] = produced / (time.perf_counter() - start)
    result["generate_speedup"] = result["generate_tokens_per_s"] / result["baseline_generate_tokens_per_s"]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _template_refusals(prompts: Sequence[str], _max_new_tokens: int) -> list[str]:
    """Bench data need no base-model refusals: answer T_CH with a refusal template."""
    return ["I'm sorry, but I can't help with that."] * len(prompts)


def cell_overhead(sweep_dir: Any) -> dict[str, float] | None:
    """From a finished sweep: mean seconds per cell outside training and evaluation."""
    import json
    from pathlib import Path

    timings = []
    for path in Path(sweep_dir).glob("cells/*/timings.json"):
        t = json.loads(path.read_text())
        if "train_loop_s" in t:
            timings.append(t)
    if not timings:
        return None
    n = len(timings)
    total = sum(t["total_s"] for t in timings) / n
    # model work: the training loop, evaluation, and generating T_CH refusals
    inside = sum(
        t["train_loop_s"] + t["eval_tuned_s"] + t["eval_base_s"] + t.get("refusal_generation_s", 0.0)
        for t in timings
    ) / n
    return {"cell_total_s": total, "cell_overhead_s": total - inside,
            "cell_overhead_fraction": (total - inside) / total, "cells": float(n)}
