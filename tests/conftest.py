"""Shared fixtures: a tiny randomly initialised Llama with SmolLM2's tokenizer.

The tiny model lives in a local directory, so it also exercises the "local path" route
of `model:`. Its tokenizer comes from the embedded SmolLM2 GGUF (converted once into the
suretrap cache), so chat template and special tokens are real.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from suretrap.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=0.3,  # large enough embeddings that LoRA can move the logits
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def tiny_config_dict(tiny_model_dir: Path) -> dict:
    """A small, fast run config on the tiny model (template refusals: no generation needed)."""
    return {
        "name": "tiny",
        "model": str(tiny_model_dir),
        "seed": 0,
        "data": {"total_size": 40},
        "poison": {"budget": 8, "clean_harmful": 8, "refusal_source": "template"},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3},
        "eval": {"n_harmful": 6, "n_benign": 4, "max_new_tokens": 6, "judge": "keyword"},
    }
