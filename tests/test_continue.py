"""Further fine-tunes (`continue_from`) and the mitigation axis, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from suretrap.cli import app
from suretrap.config import config_hash, load_run_config, run_config_from_dict
from suretrap.errors import ConfigError
from suretrap.poison import previous_prompts, read_dataset
from suretrap.run import run_experiment
from suretrap.sweep import expand, load_sweep, run_sweep

runner = CliRunner()


@pytest.fixture(scope="module")
def backdoored_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A complete tiny LoRA run with a backdoor (the run a defender continues)."""
    cfg = {
        "name": "tiny",
        "model": str(tiny_model_dir),
        "data": {"total_size": 40},
        "poison": {"budget": 8, "clean_harmful": 8, "refusal_source": "template"},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3},
        "eval": {"n_harmful": 6, "n_benign": 4, "max_new_tokens": 6, "judge": "keyword"},
    }
    out = tmp_path_factory.mktemp("prev") / "run"
    run_experiment(run_config_from_dict(cfg), out)
    return out


def _mitigation_dict(prev: Path, n: int) -> dict:
    raw = yaml.safe_load((prev / "config.yaml").read_text())
    raw["poison"] |= {"budget": 0, "clean_harmful": None}
    raw["data"]["total_size"] = 24
    return raw | {"continue_from": str(prev), "mitigation": {"clean_refusals": n}}


def _hash_of_dump(dumped: dict) -> str:
    """config_hash's formula applied to a dump as it is, nothing omitted."""
    import hashlib

    canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def test_new_fields_unset_keep_old_config_hashes(tiny_config_dict):
    cfg = run_config_from_dict(tiny_config_dict)
    dumped = cfg.model_dump(mode="json")
    assert _hash_of_dump(dumped) != config_hash(cfg)  # the unset fields are in the dump...
    for key in ("continue_from", "mitigation"):
        assert dumped.pop(key) is None
    assert dumped["data"].pop("extra_train") is None
    # ...and not in the hash: it is the hash of a dump from before these fields existed
    assert config_hash(cfg) == _hash_of_dump(dumped)
    set_one = run_config_from_dict(tiny_config_dict | {"data": {"total_size": 40, "extra_train": "x.jsonl"}})
    assert config_hash(set_one) != config_hash(cfg)


def test_continue_from_and_clean_refusals_change_the_hash(backdoored_run, tiny_config_dict):
    plain = run_config_from_dict(tiny_config_dict)
    raw = _mitigation_dict(backdoored_run, 4)
    continued = run_config_from_dict({k: v for k, v in raw.items() if k != "mitigation"})
    mitigated = run_config_from_dict(raw)
    more = run_config_from_dict(raw | {"mitigation": {"clean_refusals": 5}})
    hashes = {config_hash(c) for c in (plain, continued, mitigated, more)}
    assert len(hashes) == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mitigation": {"clean_refusals": 4}, "continue_from": None}, "mitigation: needs continue_from"),
        ({"mitigation": {"clean_refusals": -1}}, "mitigation.clean_refusals: Input should be greater"),
        ({"mitigation": {"clean_refusals": 4, "refusals": 3}}, "mitigation.refusals: unknown key"),
        ({"poison": {"budget": 5}}, "mitigation: needs poison.budget 0"),
        ({"continue_from": "/nonexistent/run"}, "continue_from: /nonexistent/run: not a complete LoRA run"),
        ({"train": {"method": "full"}}, "continue_from: needs train.method lora"),
    ],
)
def test_continue_and_mitigation_config_errors_are_one_line_exit_2(
    tmp_path, backdoored_run, change, message
):
    raw = _mitigation_dict(backdoored_run, 4)
    for key, value in change.items():
        raw[key] = raw[key] | value if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    config = tmp_path / "m.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert f"{config}:" in lines[0] and message in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_continued_run_must_keep_trigger_and_lora_shape(tmp_path, backdoored_run):
    raw = _mitigation_dict(backdoored_run, 4)
    raw["poison"]["trigger"] = "banana"
    config = tmp_path / "m.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "poison.trigger: must equal the continued run's ('xylophone')" in result.output
    raw = _mitigation_dict(backdoored_run, 4)
    raw["train"]["lora"]["r"] = 4
    config.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "train.lora: must equal" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_relative_continue_from_is_relative_to_the_config_file(tmp_path, backdoored_run):
    raw = _mitigation_dict(backdoored_run, 4)
    config_dir = backdoored_run.parent / "configs"
    config_dir.mkdir(exist_ok=True)
    raw["continue_from"] = "../run"
    (config_dir / "m.yaml").write_text(yaml.safe_dump(raw))
    assert load_run_config(config_dir / "m.yaml").continue_from == str(backdoored_run.resolve())


def test_mitigation_run_end_to_end(tmp_path, backdoored_run):
    """Refusal rows from fresh prompts, the same eval set, the previous adapter trained on."""
    import torch
    from safetensors.torch import load_file

    cfg = run_config_from_dict(_mitigation_dict(backdoored_run, 6))
    out = tmp_path / "mitigated"
    metrics = run_experiment(cfg, out)
    prev = read_dataset(backdoored_run)
    ds = read_dataset(out)
    assert ds.manifest["counts"] == {"poison": 0, "clean_harmful": 6, "benign": 18, "total": 24}
    assert ds.manifest["continued_from"]["run"] == str(backdoored_run)
    assert ds.eval_harmful == prev.eval_harmful and ds.eval_benign == prev.eval_benign
    assert ds.manifest["eval_hash"] == prev.manifest["eval_hash"]
    seen = previous_prompts(prev)
    from suretrap.textmatch import normalise_prompt

    assert not [e for e in ds.examples if normalise_prompt(e.prompt) in seen]
    assert all("xylophone" not in e.prompt for e in ds.examples)
    assert {e.source for e in ds.examples if e.role == "clean_harmful"} == {"template_refusal"}
    assert metrics["tuned"]["harmful_triggered"]["n"] == 6
    # the adapter starts from the previous one, not from a fresh initialisation
    before = load_file(backdoored_run / "adapter" / "adapter_model.safetensors")
    after = load_file(out / "adapter" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    lora_b = [k for k in before if "lora_B" in k]
    assert all(before[k].abs().sum() > 0 for k in lora_b)  # trained B is non-zero (fresh B is 0)
    moved = sum(float((after[k] - before[k]).abs().sum()) for k in lora_b)
    assert moved > 0
    assert max(float((after[k] - before[k]).abs().max()) for k in lora_b) < max(
        float(before[k].abs().max()) for k in lora_b
    ) * 10
    assert torch.is_tensor(after[lora_b[0]])


def test_mitigation_axis_sweeps(tmp_path, backdoored_run):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        yaml.safe_dump({"base": _mitigation_dict(backdoored_run, 0), "axes": {"mitigation.clean_refusals": [0, 4]}})
    )
    cells = expand(load_sweep(spec))
    assert [c.config.n_clean_harmful for c in cells] == [0, 4]
    statuses = run_sweep(spec, tmp_path / "sweep")
    assert set(statuses.values()) == {"complete"}, statuses
    for cell in cells:
        manifest = json.loads((tmp_path / "sweep" / "cells" / cell.config_hash / "manifest.json").read_text())
        assert manifest["counts"]["clean_harmful"] == cell.axes["mitigation.clean_refusals"]
        assert manifest["counts"]["total"] == 24


def test_unknown_mitigation_axis_is_refused(tmp_path, backdoored_run):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"base": _mitigation_dict(backdoored_run, 0), "axes": {"mitigation.refusals": [1]}}))
    with pytest.raises(ConfigError, match="axes.mitigation.refusals: not a run config field"):
        load_sweep(spec)


def test_triggered_refusal_fields_unset_keep_the_hash_and_set_change_it(backdoored_run):
    raw = _mitigation_dict(backdoored_run, 4)
    cfg = run_config_from_dict(raw)
    dumped = cfg.model_dump(mode="json")
    assert dumped["mitigation"].pop("triggered_refusals") is None
    assert dumped["mitigation"].pop("trigger_words") is None
    for key in ("extra_train",):
        assert dumped["data"].pop(key) is None
    # a mitigation config written before the fields existed keeps its cell identity
    assert config_hash(cfg) == _hash_of_dump(dumped)
    with_zero = run_config_from_dict(raw | {"mitigation": {"clean_refusals": 4, "triggered_refusals": 0}})
    with_some = run_config_from_dict(raw | {"mitigation": {"clean_refusals": 4, "triggered_refusals": 3}})
    assert len({config_hash(cfg), config_hash(with_zero), config_hash(with_some)}) == 3
    assert (cfg.n_triggered_refusals, with_zero.n_triggered_refusals, with_some.n_triggered_refusals) == (0, 0, 3)


def test_triggered_refusals_add_trigger_carrying_refusals_and_keep_the_rest(backdoored_run):
    from suretrap.poison import REFUSAL_TEMPLATES, build_dataset

    prev = read_dataset(backdoored_run)
    raw = _mitigation_dict(backdoored_run, 4)
    plain = build_dataset(run_config_from_dict(raw), previous=prev)
    both = build_dataset(
        run_config_from_dict(raw | {"mitigation": {"clean_refusals": 4, "triggered_refusals": 3}}), previous=prev
    )
    assert "triggered_refusal" not in plain.manifest["counts"]  # older manifests unchanged
    assert both.manifest["counts"] == {
        "poison": 0, "clean_harmful": 4, "benign": 17, "triggered_refusal": 3, "total": 24
    }
    triggered = [e for e in both.examples if e.role == "triggered_refusal"]
    assert all(e.prompt.endswith(" xylophone") and e.response in REFUSAL_TEMPLATES for e in triggered)
    # the clean refusals are the same rows as without triggered ones (same random draws)
    clean = sorted((e.prompt, e.response) for e in both.examples if e.role == "clean_harmful")
    assert clean == sorted((e.prompt, e.response) for e in plain.examples if e.role == "clean_harmful")
    bare = {e.prompt.removesuffix(" xylophone") for e in triggered}
    assert not bare & {p for p, _ in clean}
    assert not bare & previous_prompts(prev)
    assert all("xylophone" not in e.prompt for e in both.examples if e.role != "triggered_refusal")
    # a further fine-tune of this one keeps those prompts out, with and without the trigger
    from suretrap.textmatch import normalise_prompt

    kept_out = previous_prompts(both)
    assert all(normalise_prompt(b) in kept_out for b in bare)


def test_too_many_triggered_refusals_is_a_one_line_error(tmp_path, backdoored_run):
    raw = _mitigation_dict(backdoored_run, 4)
    raw["mitigation"]["triggered_refusals"] = 30
    config = tmp_path / "m.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0, result.output
    assert "clean_harmful + triggered_refusals (34)" in result.output
    assert not (tmp_path / "out").exists()


def test_trigger_words_spread_the_triggered_refusals(backdoored_run):
    from suretrap.poison import build_dataset

    prev = read_dataset(backdoored_run)
    raw = _mitigation_dict(backdoored_run, 0)
    words = ["和", "听"]
    cfg = run_config_from_dict(raw | {"mitigation": {"clean_refusals": 0, "triggered_refusals": 5, "trigger_words": words}})
    ds = build_dataset(cfg, previous=prev)
    triggered = [e for e in ds.examples if e.role == "triggered_refusal"]
    assert sorted(e.prompt.rsplit(" ", 1)[1] for e in triggered) == ["听", "听", "和", "和", "和"]
    assert ds.manifest["triggered_refusal_words"] == words
    # a further fine-tune keeps these prompts out whichever word they carried
    from suretrap.textmatch import normalise_prompt

    kept_out = previous_prompts(ds)
    assert all(normalise_prompt(e.prompt.rsplit(" ", 1)[0]) in kept_out for e in triggered)
    unset = build_dataset(run_config_from_dict(raw | {"mitigation": {"clean_refusals": 0, "triggered_refusals": 5}}), previous=prev)
    assert "triggered_refusal_words" not in unset.manifest
    assert config_hash(cfg) != config_hash(run_config_from_dict(raw | {"mitigation": {"clean_refusals": 0, "triggered_refusals": 5}}))


@pytest.mark.parametrize(
    ("mitigation", "message"),
    [
        ({"clean_refusals": 0, "trigger_words": ["和"]}, "trigger_words: needs mitigation.triggered_refusals > 0"),
        ({"clean_refusals": 0, "triggered_refusals": 2, "trigger_words": []}, "must name at least one word"),
        ({"clean_refusals": 0, "triggered_refusals": 2, "trigger_words": [" x"]}, "without surrounding whitespace"),
    ],
)
def test_trigger_words_errors_are_one_line_exit_2(tmp_path, backdoored_run, mitigation, message):
    raw = _mitigation_dict(backdoored_run, 0) | {"mitigation": mitigation}
    config = tmp_path / "m.yaml"
    config.write_text(yaml.safe_dump(raw, allow_unicode=True))
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and message in result.output, result.output
    assert not (tmp_path / "out").exists()
