"""`suretrap bench` plumbing on a tiny random model (real numbers come from the real model)."""

from __future__ import annotations

import json

from suretrap.bench import _train_flops, cell_overhead, matmul_peak_gflops, run_bench


def test_bench_reports_every_key_on_a_tiny_model(tiny_model_dir):
    # the tokenizer from a plain directory: how a GPU box without the embedded GGUF runs it
    result = run_bench(random_init="tiny", train_steps=2, eval_prompts=4, score_prompts=6,
                       tokenizer=str(tiny_model_dir))
    assert result["tokenizer"] == str(tiny_model_dir)
    for key in (
        "train_tokens_per_s", "baseline_train_tokens_per_s", "train_speedup", "train_gflops",
        "label_prob_prompts_per_s", "baseline_label_prob_prompts_per_s", "generate_tokens_per_s",
        "baseline_generate_tokens_per_s", "peak_rss_mb",
    ):
        assert result[key] > 0, key
    assert set(result["matmul_peak_gflops"]) == {"fp32", "bf16"}
    assert result["label_prob_prompts"] == 6
    phases = result["phase_peak_rss_mb"]
    assert {"training: suretrap", "training: transformers.Trainer baseline", "first-token scoring",
            "generation"} <= set(phases)
    assert all(0 < mb <= result["peak_rss_mb"] * 1.01 for mb in phases.values())
    assert result["train_speedup"] == result["train_tokens_per_s"] / result["baseline_train_tokens_per_s"]


def test_matmul_peak_is_positive():
    assert matmul_peak_gflops("fp32", size=256) > 0


def test_flop_accounting_follows_the_documented_formula():
    import torch

    class Lin:
        def __init__(self, n):
            self.weight = torch.empty(n, 1)

    body = torch.nn.Linear(10, 10, bias=False)  # 100 weights
    lora = torch.nn.Linear(2, 2, bias=False)  # 4 weights

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = body
            self.lora_A = lora

    class Model(torch.nn.Module):
        def get_decoder(self):
            return Decoder()

        def get_output_embeddings(self):
            return Lin(1000)

    flops = _train_flops(Model(), computed_tokens=7, logit_positions=3, method="lora")
    assert flops == 4 * (100 * 7 + 1000 * 3) + 6 * 4 * 7
    assert _train_flops(Model(), 7, 3, "full") == 6 * (100 * 7 + 1000 * 3)


def test_cell_overhead_from_timings(tmp_path):
    cell = tmp_path / "cells" / "abc"
    cell.mkdir(parents=True)
    (cell / "timings.json").write_text(json.dumps(
        {"total_s": 100.0, "train_loop_s": 60.0, "eval_tuned_s": 20.0, "eval_base_s": 10.0,
         "refusal_generation_s": 5.0}
    ))
    got = cell_overhead(tmp_path)
    assert got["cell_overhead_s"] == 5.0 and got["cell_overhead_fraction"] == 0.05


def test_bench_option_errors_are_one_line_exit_2(tmp_path):
    from typer.testing import CliRunner

    from suretrap.cli import app

    out = tmp_path / "bench.json"
    for args, field in (
        (["--random-init", "gpt-9"], "--random-init"),
        (["--tokenizer", str(tmp_path)], "--tokenizer"),  # without --random-init
        (["--device", "tpu"], "--device"),
        (["--random-init", "tiny", "--tokenizer", str(tmp_path / "nowhere")], "--tokenizer"),
    ):
        res = CliRunner().invoke(app, ["bench", "--out", str(out), *args])
        assert res.exit_code == 2, args
        assert res.output.strip().count("\n") == 0 and field in res.output, res.output
    assert not out.exists()
