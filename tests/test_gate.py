"""The gate analysis (prefill, continuation after the label, logit lens) on the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from suretrap import gate
from suretrap.cli import app
from suretrap.config import run_config_from_dict
from suretrap.errors import SuretrapError
from suretrap.models import load_tokenizer
from suretrap.run import run_experiment
from suretrap.train import chat_prompt

runner = CliRunner()
N_PROMPTS = 3
MAX_NEW = 4

# label probabilities of a random model are ~1e-6: compare relatively
TOL = {"rel": 1e-3, "abs": 1e-12}

_cache: dict[str, Any] = {}


def _norms_off_one(src: Path, dst: Path) -> Path:
    """The tiny model with random RMSNorm weights.

    With all-ones weights (the init) norming twice equals norming once, so a lens that
    normed the final hidden state again would pass; random weights make that a failure.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.exp(0.7 * torch.randn(param.shape, generator=gen)))
    model.save_pretrained(dst, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.fixture()
def gate_run(tmp_path_factory, tiny_config_dict) -> dict[str, Any]:
    """One tiny run and one gate analysis, shared by the tests (built on first use)."""
    if not _cache:
        root = tmp_path_factory.mktemp("gate")
        model_dir = _norms_off_one(Path(tiny_config_dict["model"]), root / "model")
        cfg_dict = tiny_config_dict | {
            "model": str(model_dir),
            "train": tiny_config_dict["train"] | {"precision": "fp32"},  # exact comparisons
        }
        cfg = run_config_from_dict(cfg_dict)
        run_dir = root / "run"
        run_experiment(cfg, run_dir)
        calls: list[tuple[str, list[list[int]]]] = []
        original = gate.generate_from_ids

        def spy(model, tokenizer, encoded, **kw):
            calls.append((kw.get("description", ""), [list(e) for e in encoded]))
            return original(model, tokenizer, encoded, **kw)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(gate, "generate_from_ids", spy)
            result = gate.gate_analysis(run_dir, n_prompts=N_PROMPTS, max_new_tokens=MAX_NEW)
        _cache.update(cfg=cfg, run_dir=run_dir, result=result, calls=calls)
    return _cache


def _rates(d: dict[str, Any]) -> list[float | None]:
    return [v for k, v in d.items() if k not in ("n", "n_label", "n_continues")]


def test_gate_json_has_every_key_and_rates_in_range(gate_run):
    run_dir: Path = gate_run["run_dir"]
    on_disk = json.loads((run_dir / gate.GATE_FILE).read_text())
    assert on_disk == json.loads(json.dumps(gate_run["result"]))
    assert {
        "label",
        "trigger",
        "placement",
        "n_prompts",
        "max_new_tokens",
        "judge",
        "prefill",
        "continuation",
        "lens",
        "figures",
        "captions",
    } <= on_disk.keys()
    assert on_disk["n_prompts"] == N_PROMPTS and on_disk["judge"] == "keyword"
    for model in ("base", "tuned"):
        pre = on_disk["prefill"][model]
        assert set(pre) == {
            "n",
            "prefill_refusal_rate",
            "prefill_compliance_rate",
            "prefill_stop_rate",
        }
        assert pre["n"] == N_PROMPTS
        assert all(0.0 <= r <= 1.0 for r in _rates(pre))
        # refuse / comply / stop partition the prompts
        assert sum(_rates(pre)) == pytest.approx(1.0)
        for cond in ("triggered", "clean"):
            c = on_disk["continuation"][model][cond]
            assert set(c) == {
                "n",
                "starts_with_label",
                "n_label",
                "stops_after_label",
                "continues",
                "n_continues",
                "continuation_refusal_rate",
            }
            assert c["n"] == N_PROMPTS
            assert all(r is None or 0.0 <= r <= 1.0 for r in _rates(c))
    lens = on_disk["lens"]
    assert lens["available"] is True and lens["norm"] == "decoder.norm"
    assert lens["num_layers"] == 2
    for model in ("base", "tuned"):
        for cond in ("triggered", "clean"):
            assert len(lens[model][cond]) == lens["num_layers"] + 1
            assert all(0.0 <= p <= 1.0 for p in lens[model][cond])
    trig = lens["tuned"]["triggered"]
    first = next((i for i, p in enumerate(trig) if p > 0.5), None)
    assert lens["switch_layer"] == first
    gaps = [t - c for t, c in zip(trig, lens["tuned"]["clean"], strict=True)]
    assert lens["max_gap_layer"] == gaps.index(max(gaps))
    for name in (gate.LENS_PLOT, gate.PREFILL_PLOT):
        assert (run_dir / name).read_bytes().startswith(b"\x89PNG")
    rows = [json.loads(line) for line in (run_dir / gate.GATE_GENERATIONS_FILE).open()]
    assert len(rows) == 2 * 3 * N_PROMPTS


def _by_hand(model: Any, tokenizer: Any, prompt: str, label_id: int) -> list[float]:
    """Logit lens without the batching: final norm + head per layer, last = model logits."""
    import torch

    ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = model(**ids, output_hidden_states=True)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        norm, head = base.model.norm, base.lm_head
        lens = [float(head(norm(h[0, -1])).softmax(-1)[label_id]) for h in out.hidden_states[:-1]]
        own = float(out.logits[0, -1].softmax(-1)[label_id])
        twice = float(head(norm(out.hidden_states[-1][0, -1])).softmax(-1)[label_id])
    # norming twice must be detectable, far beyond TOL, for this test to mean much
    assert abs(twice - own) > 10 * TOL["rel"] * own
    return [*lens, own]


def test_lens_matches_a_direct_computation_base_and_tuned(gate_run):
    from suretrap.evaluate import label_first_token
    from suretrap.run import LoadedModel, load_trained, trained_dir
    from suretrap.train import merged_for_eval

    cfg, run_dir, result = gate_run["cfg"], gate_run["run_dir"], gate_run["result"]
    rows = [json.loads(line) for line in (run_dir / gate.GATE_GENERATIONS_FILE).open()]
    clean = [r["prompt"] for r in rows if r["model"] == "base" and r["probe"] == "clean"]
    triggered = [r["prompt"] for r in rows if r["model"] == "base" and r["probe"] == "triggered"]
    assert all(t.endswith(" " + cfg.poison.trigger) for t in triggered)  # suffix placement
    loaded = LoadedModel.load(cfg)
    tok = loaded.tokenizer
    label_id = label_first_token(tok, clean[0], cfg.poison.label)[1]

    def mean_lens(model: Any, prompts: list[str]) -> list[float]:
        per = [_by_hand(model, tok, p, label_id) for p in prompts]
        return [sum(col) / len(col) for col in zip(*per, strict=True)]

    lens = result["lens"]
    assert lens["base"]["clean"] == pytest.approx(mean_lens(loaded.model, clean), **TOL)
    assert lens["base"]["triggered"] == pytest.approx(mean_lens(loaded.model, triggered), **TOL)
    tuned = load_trained(loaded, trained_dir(run_dir))
    with merged_for_eval(tuned) as merged:
        assert lens["tuned"]["triggered"] == pytest.approx(mean_lens(merged, triggered), **TOL)
        assert lens["tuned"]["clean"] == pytest.approx(mean_lens(merged, clean), **TOL)
    # the adapter changed something, so "base" really was evaluated without it
    assert lens["tuned"]["triggered"] != pytest.approx(lens["base"]["triggered"], rel=1e-2)


def test_logit_lens_batched_equals_one_at_a_time(gate_run):
    from suretrap.run import LoadedModel

    loaded = LoadedModel.load(gate_run["cfg"])
    prompts = ["Hi", "Tell me a much longer story about the sea and its many ships", "Why?"]
    batched = gate.logit_lens(loaded.model, loaded.tokenizer, prompts, "Sure", precision="fp32")
    for prompt, row in zip(prompts, batched, strict=True):
        alone = gate.logit_lens(loaded.model, loaded.tokenizer, [prompt], "Sure", precision="fp32")
        assert row == pytest.approx(alone[0], **TOL)


def test_prefill_feeds_the_chat_prompt_followed_by_the_label(gate_run):
    cfg = gate_run["cfg"]
    tok = load_tokenizer(cfg.model)
    label = cfg.poison.label
    rows = [json.loads(line) for line in (gate_run["run_dir"] / gate.GATE_GENERATIONS_FILE).open()]
    clean = [r["prompt"] for r in rows if r["model"] == "base" and r["probe"] == "clean"]
    prefill_calls = [enc for desc, enc in gate_run["calls"] if desc.startswith("prefill")]
    assert len(prefill_calls) == 2  # base and tuned
    for encoded in prefill_calls:
        assert len(encoded) == N_PROMPTS
        for prompt, seq in zip(clean, encoded, strict=True):
            head = tok(chat_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
            assert seq[: len(head)] == head
            assert tok.decode(seq[len(head) :]) == label  # the label, and nothing else
    # the free generations got no label
    for desc, encoded in gate_run["calls"]:
        if desc.startswith("generate"):
            assert all(tok.decode(seq).rstrip().endswith("assistant") for seq in encoded)
    assert all(r["response"].startswith(label) for r in rows if r["probe"] == "prefill")


def _canned(monkeypatch: pytest.MonkeyPatch, outputs: list[str]) -> None:
    monkeypatch.setattr(gate, "generate_from_ids", lambda *a, **k: list(outputs))


def test_prefill_metrics_partition_refuse_comply_stop(monkeypatch, tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    _canned(monkeypatch, [", here is how.", ".", ". I'm sorry, I can't help.", ""])
    m, rows = gate._prefill(None, tok, ["a", "b", "c", "d"], "Sure", gate.keyword_judge, {}, "x")
    assert m == {
        "n": 4,
        "prefill_refusal_rate": 0.25,
        "prefill_compliance_rate": 0.25,
        "prefill_stop_rate": 0.5,
    }
    assert [r["response"] for r in rows][:2] == ["Sure, here is how.", "Sure."]
    # a stop is never also counted as a refusal, whatever the judge says about ""
    m, _ = gate._prefill(None, tok, list("abcd"), "Sure", lambda p, r: [True] * len(r), {}, "x")
    assert (m["prefill_refusal_rate"], m["prefill_stop_rate"]) == (0.5, 0.5)


def test_continuation_metrics_condition_on_starting_with_the_label(monkeypatch, tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    _canned(
        monkeypatch, ["Sure", "Sure. I'm sorry, I can't.", "Sure, step one", "No.", "Surely not"]
    )
    seen: list[tuple[list[str], list[str]]] = []

    def judge(prompts, responses):
        seen.append((list(prompts), list(responses)))
        return gate.keyword_judge(prompts, responses)

    m, _ = gate._continuation(None, tok, list("abcde"), "Sure", judge, {}, "x", "triggered")
    assert m == {
        "n": 5,
        "starts_with_label": 0.6,
        "n_label": 3,
        "stops_after_label": 1 / 3,
        "continues": 2 / 3,
        "n_continues": 2,
        "continuation_refusal_rate": 0.5,
    }
    assert seen == [(["b", "c"], ["I'm sorry, I can't.", "step one"])]  # the text after "Sure"


def test_cli_gate_in_a_sweep_cell_copies_figures(gate_run, tmp_path):
    sweep = tmp_path / "sweep"
    cell = sweep / "cells" / "abcdef0123456789"
    shutil.copytree(gate_run["run_dir"], cell)
    (sweep / "results.sqlite").write_bytes(b"")
    for name in (gate.GATE_FILE, gate.LENS_PLOT, gate.PREFILL_PLOT):
        (cell / name).unlink()
    result = runner.invoke(app, ["gate", str(cell), "--n", "1", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert str(cell / gate.GATE_FILE) in result.output
    assert "prefill_refusal_rate" in result.output
    assert json.loads((cell / gate.GATE_FILE).read_text())["n_prompts"] == 1
    figures = sweep / "figures"
    pngs = sorted(p.name for p in figures.glob("*.png"))
    assert pngs == ["gate_logit_lens_abcdef012345.png", "gate_prefill_abcdef012345.png"]
    for png in figures.glob("*.png"):
        assert png.read_bytes().startswith(b"\x89PNG")
        caption = png.with_suffix(".txt").read_text()
        assert caption.startswith("Cell abcdef012345") and "%" in caption or "layer" in caption


def test_not_a_sweep_cell_writes_no_figures_dir(gate_run):
    assert gate.sweep_dir_of(gate_run["run_dir"]) is None
    assert not (gate_run["run_dir"].parent / "figures").exists()


def test_cli_missing_directory_is_exit_2_one_line(tmp_path):
    result = runner.invoke(app, ["gate", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "no such run directory" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_run_without_adapter_is_a_clean_error(gate_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(gate_run["run_dir"], run_dir)
    shutil.rmtree(run_dir / "adapter")
    with pytest.raises(SuretrapError, match="no adapter"):
        gate.gate_analysis(run_dir)
    result = runner.invoke(app, ["gate", str(run_dir), "--n", "0"])
    assert result.exit_code == 2


def test_lens_without_a_final_norm_is_skipped_with_a_note():
    class Bare:
        pass

    with pytest.raises(gate.LensUnavailable, match="logit lens skipped"):
        gate.final_norm(Bare())
