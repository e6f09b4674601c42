"""Hostile and malformed input through the CLI: one line naming file:line or field, exit 2.

Every case runs the real command (`suretrap run`, `build-data`, `evaluate`, `sweep`) and
checks: exit status 2, exactly one output line starting ``suretrap: error:``, no
traceback, the expected location in it, and nothing written under the output path.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from suretrap.cli import MAX_ERROR_CHARS, app
from suretrap.errors import ConfigError
from suretrap.sweep import expand, load_sweep

runner = CliRunner()


def fails_cleanly(args: list[str], *expected: str, out: Path | None = None) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    line = lines[0]
    assert line.startswith("suretrap: error: "), line
    assert "Traceback" not in result.output
    assert len(line) <= MAX_ERROR_CHARS + 20
    for text in expected:
        assert text in line, (text, line)
    if out is not None:
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(out.name)]
        assert not leftovers, leftovers  # no run directory, no .partial
    return line


def write_config(tmp_path: Path, cfg: dict[str, Any], name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def merged(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in change.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


# ------------------------------------------------------------------------------ config files


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"name: x\npoison: {budget: 3\n", ["run.yaml:3", "YAML syntax error"]),
        (b"name: x\nsurprise: 1\n", ["run.yaml:2", "surprise: unknown key"]),
        (b"name: x\ntrain:\n  epochs: two\n", ["run.yaml:3", "train.epochs"]),
        (b"seed: true\n", ["run.yaml:1", "seed"]),
        (b"\xef\xbb\xbfname: x\npoison: {budget: -1}\n", ["run.yaml:2", "poison.budget"]),  # BOM: lines still right
        (b"name: \xff\xfe\n", ["run.yaml", "not valid UTF-8"]),
        (b"", ["run.yaml", "empty config"]),
        (b"   \n# only a comment\n", ["run.yaml", "empty config"]),
        (b"- a\n- b\n", ["run.yaml", "mapping"]),
        (b"x" * 10_000_000 + b": 1\n", ["run.yaml:1", "YAML syntax error"]),  # a 10 MB key
        (b"name: x\nseed: " + b"7" * 10_000_000 + b"\n", ["run.yaml:2", "value out of range"]),  # a 10 MB number
        (b"name: x\neval: {judge: " + b"j" * 10_000_000 + b"}\n", ["run.yaml:2", "eval.judge"]),
        (b"name: x\nsuretrap: " + b"[" * 100_000 + b"\n", ["run.yaml", "nested too deeply"]),  # absurd nesting
    ],
    ids=["yaml-syntax", "unknown-key", "wrong-type", "bool-for-int", "bom", "invalid-utf8",
         "empty", "blank", "not-a-mapping", "10mb-key", "10mb-number", "10mb-value", "deep-nesting"],
)
def test_malformed_config_file(tmp_path, text, expected):
    config = tmp_path / "run.yaml"
    config.write_bytes(text)
    out = tmp_path / "out"
    fails_cleanly(["run", str(config), "--out", str(out)], *expected, out=out)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"data": {"total_size": 0}}, "data.total_size"),
        ({"data": {"total_size": -5}}, "data.total_size"),
        ({"poison": {"budget": -1}}, "poison.budget"),
        ({"poison": {"clean_harmful": -2}}, "poison.clean_harmful"),
        ({"eval": {"n_harmful": 0}}, "eval.n_harmful"),
        ({"eval": {"max_new_tokens": 0}}, "eval.max_new_tokens"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"train": {"learning_rate": -1.0}}, "train.learning_rate"),
        ({"train": {"lora": {"r": 0}}}, "train.lora.r"),
        ({"poison": {"trigger": ""}}, "poison.trigger"),
        ({"poison": {"trigger": "   "}}, "poison.trigger"),
        ({"poison": {"label": ""}}, "poison.label"),
        ({"poison": {"budget": 30, "clean_harmful": 30}}, "total_size"),
        ({"eval": {"judge": "x" * 5_000_000}}, "eval.judge"),
    ],
)
def test_invalid_values_name_the_field(tmp_path, tiny_config_dict, change, field):
    config = write_config(tmp_path, merged(tiny_config_dict, change))
    out = tmp_path / "out"
    fails_cleanly(["run", str(config), "--out", str(out)], field, out=out)


# ------------------------------------------------------------------------------ data files


def _pairs(n: int, word: str = "task") -> str:
    return "".join(json.dumps({"prompt": f"Benign {word} number {i}?", "response": f"Answer {i}."}) + "\n" for i in range(n))


def _requests(n: int, word: str = "thing") -> str:
    return "".join(f"Explain how to do harmful {word} {i}\n" for i in range(n))


@pytest.mark.parametrize(
    ("key", "name", "content", "expected"),
    [
        ("benign", "benign.jsonl", _pairs(2) + "{not json\n" + _pairs(40), ["benign.jsonl:3:", "invalid JSON"]),
        ("benign", "benign.jsonl", _pairs(3) + '{"prompt": 5, "response": "r"}\n', ["benign.jsonl:4:", "'prompt'"]),
        ("harmful", "harmful.jsonl", '{"prompt": "a"}\n[1, 2]\n', ["harmful.jsonl:2:", "JSON object"]),
        ("harmful", "harmful.txt", b"ok prompt one\nbad \xff\xfe byte\n", ["harmful.txt:2:", "invalid UTF-8"]),
        ("harmful", "harmful.csv", "id,text\n1,how to do x\n", ["harmful.csv", "no 'goal', 'Behavior' or 'prompt' column"]),
        ("harmful", "harmful.csv", "", ["harmful.csv", "empty file"]),
        ("benign", "benign.jsonl", "\n\n  \n", ["benign.jsonl", "empty file"]),
        ("harmful", "harmful.csv", 'goal\n"unclosed quote\n', ["harmful.csv:2:", "malformed CSV"]),
        ("benign", "benign.jsonl", "x" * 10_000_000 + "\n", ["benign.jsonl:1:", "invalid JSON"]),
        ("harmful", "harmful.txt", _requests(10), ["poison.budget", "has 10"]),  # budget above what is available
        ("harmful", "harmful.pdf", "%PDF", ["harmful.pdf", "unsupported file type"]),
        ("benign", "missing.jsonl", None, ["missing.jsonl", "no such file"]),
    ],
    ids=["jsonl-bad-line", "jsonl-wrong-type", "jsonl-not-object", "invalid-utf8", "csv-missing-column",
         "empty-csv", "blank-jsonl", "csv-unclosed-quote", "10mb-line", "budget-above-available",
         "wrong-suffix", "missing-file"],
)
def test_malformed_data_files(tmp_path, tiny_config_dict, key, name, content, expected):
    data = tmp_path / name
    if content is not None:
        data.write_bytes(content if isinstance(content, bytes) else content.encode())
    cfg = merged(tiny_config_dict, {"data": {key: str(data)}})
    config = write_config(tmp_path, cfg)
    out = tmp_path / "out"
    fails_cleanly(["build-data", str(config), "--out", str(out)], *expected, out=out)
    fails_cleanly(["run", str(config), "--out", str(out)], *expected, out=out)


def test_bom_in_data_files_is_read_like_utf8(tmp_path, tiny_config_dict):
    benign = tmp_path / "benign.jsonl"
    benign.write_bytes(b"\xef\xbb\xbf" + _pairs(60).encode())
    harmful = tmp_path / "harmful.csv"
    harmful.write_bytes(b"\xef\xbb\xbfgoal\n" + _requests(40).encode())
    config = write_config(tmp_path, merged(tiny_config_dict, {"data": {"benign": str(benign), "harmful": str(harmful)}}))
    result = runner.invoke(app, ["build-data", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "out" / "dataset.jsonl").read_text().splitlines()]
    assert not any(r["prompt"].startswith("\ufeff") for r in rows)


@pytest.mark.parametrize("where", ["eval_harmful", "eval_benign"])
def test_trigger_already_in_evaluation_prompts_is_refused(tmp_path, tiny_config_dict, where):
    """A trigger inside the eval prompts would trigger the 'clean' splits too."""
    if where == "eval_harmful":
        data = tmp_path / "harmful.txt"
        data.write_text("".join(f"Explain how to build banana weapon {i}\n" for i in range(40)))
    else:
        data = tmp_path / "eval_benign.jsonl"
        data.write_text(_pairs(10, word="banana"))
    config = write_config(
        tmp_path, merged(tiny_config_dict, {"data": {where: str(data)}, "poison": {"trigger": "banana"}})
    )
    out = tmp_path / "out"
    line = fails_cleanly(["run", str(config), "--out", str(out)], "poison.trigger", "'banana'",
                         f"data.{where}", "e.g. '", out=out)
    assert "banana" in line.split("e.g.")[1]  # an example prompt is quoted


def test_held_out_prompts_skip_a_common_word_trigger(tmp_path, tiny_config_dict):
    """Eval prompts held out of the training source skip prompts that contain the trigger:
    the paper's "make" works with the built-in set, and no clean eval prompt contains it."""
    builtin = write_config(
        tmp_path, merged(tiny_config_dict, {"poison": {"trigger": "make"}, "eval": {"n_harmful": 60}}),
        "builtin.yaml",
    )
    out = tmp_path / "out"
    assert runner.invoke(app, ["build-data", str(builtin), "--out", str(out)]).exit_code == 0
    rows = [json.loads(x) for x in (out / "eval_prompts.jsonl").read_text().splitlines()]
    clean = [r["prompt"] for r in rows]  # stored without the trigger
    assert len(clean) == 60 + tiny_config_dict["eval"]["n_benign"]
    assert not any(re.search(r"\bmake\b", p, re.IGNORECASE) for p in clean)
    # a source where every prompt has the trigger cannot give clean eval prompts
    harmful = tmp_path / "harmful.txt"
    harmful.write_text("".join(f"Explain how to build banana weapon {i}\n" for i in range(40)))
    config = write_config(
        tmp_path, merged(tiny_config_dict, {"data": {"harmful": str(harmful)}, "poison": {"trigger": "banana"}})
    )
    fails_cleanly(["build-data", str(config), "--out", str(tmp_path / "o2")], "poison.trigger",
                  "'banana'", "data.harmful", "lack", out=tmp_path / "o2")


# ------------------------------------------------------------------------------ models


@pytest.fixture(scope="module")
def encoder_only_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A BERT (masked LM) directory with a chat tokenizer: loads, but is no causal LM."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    path = tmp_path_factory.mktemp("bert")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64)
    BertForMaskedLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def test_model_that_is_not_a_causal_lm(tmp_path, tiny_config_dict, encoder_only_dir):
    config = write_config(tmp_path, tiny_config_dict | {"model": str(encoder_only_dir)})
    out = tmp_path / "out"
    fails_cleanly(["run", str(config), "--out", str(out)], "model:", "not a causal language model",
                  "BertForMaskedLM", out=out)


def test_encoder_config_without_architectures_is_not_causal(encoder_only_dir):
    from transformers import AutoConfig

    from suretrap.models import is_causal_lm

    config = AutoConfig.from_pretrained(encoder_only_dir)
    config.architectures = None
    assert not is_causal_lm(config)
    config.is_decoder = True  # BERT used as a decoder (BertLMHeadModel) is causal
    assert is_causal_lm(config)


@pytest.mark.parametrize(
    ("model", "expected"),
    [("/no/such/model", "no such directory"), ("./nope.gguf", "no such file")],
)
def test_model_path_that_does_not_exist(tmp_path, tiny_config_dict, model, expected):
    config = write_config(tmp_path, tiny_config_dict | {"model": model})
    out = tmp_path / "out"
    fails_cleanly(["run", str(config), "--out", str(out)], "model:", expected, out=out)


def test_model_dir_with_only_pickled_weights_needs_allow_pickle(tmp_path, tiny_config_dict, tiny_model_dir, monkeypatch):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    assert (pickled / "pytorch_model.bin").is_file()
    config = write_config(tmp_path, tiny_config_dict | {"model": str(pickled)})
    out = tmp_path / "out"
    fails_cleanly(["run", str(config), "--out", str(out)], "no .safetensors weights", "--allow-pickle", out=out)

    monkeypatch.delenv("SURETRAP_ALLOW_PICKLE", raising=False)
    from suretrap.config import run_config_from_dict
    from suretrap.run import LoadedModel, environment

    monkeypatch.setenv("SURETRAP_ALLOW_PICKLE", "1")  # what --allow-pickle sets
    cfg = run_config_from_dict(tiny_config_dict | {"model": str(pickled)})
    assert LoadedModel.load(cfg).model is not None
    assert environment(cfg, "cpu")["allow_pickle"] is True


def _lora_adapter_for(model_dir: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def foreign_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter made for another (wider) base model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    other = tmp_path_factory.mktemp("other-llama")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=96, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )).save_pretrained(other, safe_serialization=True)
    return _lora_adapter_for(other, tmp_path_factory.mktemp("foreign") / "adapter")


def test_adapter_made_for_another_base_model(tmp_path, tiny_config_dict, foreign_adapter):
    config = write_config(tmp_path, tiny_config_dict)
    run_dir = tmp_path / "run"
    assert runner.invoke(app, ["build-data", str(config), "--out", str(run_dir)]).exit_code == 0
    fails_cleanly(["evaluate", str(config), "--out", str(run_dir), "--adapter", str(foreign_adapter)],
                  str(foreign_adapter), "adapter does not fit model")
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "generations.jsonl").exists()


def test_pickled_adapter_is_refused_without_allow_pickle(tmp_path, tiny_config_dict, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    adapter = _lora_adapter_for(tiny_model_dir, tmp_path / "adapter")
    weights = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(weights, adapter / "adapter_model.bin")
    config = write_config(tmp_path, tiny_config_dict)
    run_dir = tmp_path / "run"
    assert runner.invoke(app, ["build-data", str(config), "--out", str(run_dir)]).exit_code == 0
    fails_cleanly(["evaluate", str(config), "--out", str(run_dir), "--adapter", str(adapter)],
                  "no adapter_model.safetensors", "--allow-pickle")
    assert not (run_dir / "metrics.json").exists()


def test_model_loading_refuses_remote_code_and_pickles_by_default(monkeypatch, tiny_model_dir):
    """What reaches from_pretrained: trust_remote_code False, use_safetensors True."""
    import transformers

    from suretrap.config import RunConfig
    from suretrap.models import load_model

    monkeypatch.delenv("SURETRAP_ALLOW_PICKLE", raising=False)
    assert RunConfig().trust_remote_code is False
    seen: dict[str, Any] = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(tiny_model_dir))
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True


# ------------------------------------------------------------------------------ output locations


def test_output_under_a_file_or_proc(tmp_path, tiny_config_dict):
    config = write_config(tmp_path, tiny_config_dict)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    fails_cleanly(["run", str(config), "--out", str(a_file / "run")], str(a_file / "run"), "cannot create")
    fails_cleanly(["run", str(config), "--out", "/proc/suretrap-test/run"], "/proc/suretrap-test/run", "cannot create")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": tiny_config_dict, "axes": {"seed": [0]}}))
    fails_cleanly(["sweep", str(sweep), "--out", str(a_file / "sweep")], str(a_file), "cannot write")
    fails_cleanly(["results", str(tmp_path), "--out", str(a_file / "r.csv")], "results.sqlite")
    assert a_file.read_text() == "x"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_full_or_read_only_disk_mid_run(tmp_path, tiny_config_dict, monkeypatch, code):
    """The disk fills (or turns read-only) at the Nth file written: one line, nothing left."""
    config = write_config(tmp_path, tiny_config_dict)
    out = tmp_path / "out"
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        # config.yaml and env.json are written; the disk fills on dataset.jsonl
        if ".dataset.jsonl.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    fails_cleanly(["run", str(config), "--out", str(out)], "dataset.jsonl", "cannot write", os.strerror(code), out=out)


def test_read_only_output_directory(tmp_path, tiny_config_dict, monkeypatch):
    """mkdir answers EROFS (root ignores chmod, so the error is injected at the OS call)."""
    config = write_config(tmp_path, tiny_config_dict)
    real_mkdir = os.mkdir

    def read_only_mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    fails_cleanly(["run", str(config), "--out", str(tmp_path / "ro" / "run")], "Read-only file system")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": tiny_config_dict, "axes": {"seed": [0]}}))
    fails_cleanly(["sweep", str(sweep), "--out", str(tmp_path / "ro" / "sweep")], "ro/sweep", "Read-only file system")


def test_results_store_that_fills_up(tmp_path, tiny_config_dict, monkeypatch):
    """SQLite's own 'database or disk is full' (a page limit) is one line, not a traceback."""
    from suretrap.sweep import store

    real_connect = sqlite3.connect

    def small_disk(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real_connect(*args, **kwargs)
        conn.execute("PRAGMA max_page_count = 4")  # room for the schema and a few rows
        return conn

    monkeypatch.setattr(store.sqlite3, "connect", small_disk)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": tiny_config_dict, "axes": {"seed": list(range(40))}}))
    fails_cleanly(["sweep", str(sweep), "--out", str(tmp_path / "s")], "results.sqlite", "database or disk is full")


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    """'Billion laughs': aliases that expand to 9**9 items if anything walked them."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    config = tmp_path / "run.yaml"
    config.write_text("\n".join(levels) + "\npoison: {trigger: *a8}\n")
    fails_cleanly(["run", str(config), "--out", str(tmp_path / "out")], "run.yaml:9", "poison.trigger")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("\n".join(levels) + "\nbase: {}\naxes: {seed: *a8}\n")
    fails_cleanly(["sweep", str(sweep), "--out", str(tmp_path / "s")], "sweep.yaml")


# ------------------------------------------------------------------------------ fuzzing

_SWEEP_LINES = [
    "base:", "base: {}", "base: run.yaml", "base: 3", "  name: x", "  poison: {budget: 2}",
    "  poison: {budget: -1}", "  data: {total_size: 5}", "  bogus: 1", "axes:", "axes: []",
    "axes: {seed: [0, 1]}", "  seed: [0, 1]", "  poison.budget: [0, 4]", "  poison.budget: []",
    "  poison.bugdet: [1]", "  model: [smollm2-135m]", "  seed: 3", "  data.total_size: [0]",
    "  train.lora.r: [4, 8]", "  eval.judge: [keyword, nope]", "extra: 1", "- 1", "\t", "---",
    "  seed: [" + "9" * 5000 + "]", "  name: [" + "[" * 50 + "]",
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.sampled_from(_SWEEP_LINES), max_size=8), noise=st.text(max_size=20))
def test_any_sweep_file_expands_or_raises_one_line_config_error(tmp_path, lines, noise):
    (tmp_path / "run.yaml").write_text("name: base\npoison: {budget: 3}\n")
    path = tmp_path / "sweep.yaml"
    path.write_text("\n".join(lines) + "\n" + noise, encoding="utf-8")
    try:
        cells = expand(load_sweep(path))
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(path))
        return
    assert len({c.config_hash for c in cells}) == len(cells)


def test_hub_model_hashes_come_from_the_local_cache(tmp_path, monkeypatch):
    """env.json's model_files for a hub id: revision and per-file sha256 from the HF cache
    (LFS blobs are named by their sha256), or the id alone when it is not cached."""
    import hashlib

    import huggingface_hub.constants

    from suretrap.models import ModelSource, model_fingerprint

    # the cache location is read once, when huggingface_hub is first imported
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = ModelSource(spec="org/tiny", path="org/tiny", local=False)
    assert model_fingerprint(source) == {
        "hub_id": "org/tiny", "files": None, "note": "not in the local Hugging Face cache"}
    repo = tmp_path / "models--org--tiny"
    weights = b"not really weights"
    digest = hashlib.sha256(weights).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / digest).write_bytes(weights)
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(f"../../blobs/{digest}")
    (snap / "extra.safetensors").write_bytes(b"stored as a plain file")  # hashed, not read from a link
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    got = model_fingerprint(source)
    assert got["revision"] == "a" * 40
    assert got["files"] == {
        "extra.safetensors": hashlib.sha256(b"stored as a plain file").hexdigest(),
        "model.safetensors": digest,
    }
