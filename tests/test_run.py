"""End-to-end runs on the tiny model through the CLI, and what bad input does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from suretrap.cli import app
from suretrap.config import run_config_from_dict
from suretrap.evaluate import SPLITS
from suretrap.run import run_experiment

runner = CliRunner()


def _write(tmp_path: Path, cfg: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_run_writes_a_complete_run_directory(tmp_path, tiny_config_dict):
    config = _write(tmp_path, tiny_config_dict)
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("config.yaml", "env.json", "dataset.jsonl", "eval_prompts.jsonl", "manifest.json",
                 "train_log.jsonl", "metrics.json", "generations.jsonl", "timings.json"):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out.partial").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"tuned", "base", "judges"}
    assert metrics["judges"]["asr"] == "keyword"
    assert {"asr", "refusal_rate", "refusal_rate_keyword"} <= metrics["tuned"]["harmful_clean"].keys()
    for model in ("tuned", "base"):
        assert set(metrics[model]) == set(SPLITS)
        assert metrics[model]["harmful_triggered"]["n"] == 6
        assert metrics[model]["benign_clean"]["n"] == 4
    gens = [json.loads(line) for line in (out / "generations.jsonl").open()]
    assert len(gens) == 2 * (2 * 6 + 2 * 4)
    env = json.loads((out / "env.json").read_text())
    assert {"suretrap", "torch", "transformers", "peft", "model_files"} <= env.keys()
    assert env["model_files"]["files"]  # hash of the weights
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"poison": 8, "clean_harmful": 8, "benign": 24, "total": 40}


def test_rerun_of_a_complete_run_is_a_no_op_and_other_configs_are_refused(tmp_path, tiny_config_dict):
    cfg = run_config_from_dict(tiny_config_dict)
    out = tmp_path / "out"
    first = run_experiment(cfg, out)
    stamp = (out / "metrics.json").stat().st_mtime_ns
    assert run_experiment(cfg, out) == first
    assert (out / "metrics.json").stat().st_mtime_ns == stamp
    other = run_config_from_dict(tiny_config_dict | {"seed": 1})
    config = _write(tmp_path, tiny_config_dict | {"seed": 1})
    result = runner.invoke(app, ["run", str(config), "--out", str(out)])
    assert result.exit_code == 2
    assert "--force" in result.output
    run_experiment(other, out, force=True)
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 1


def test_leftover_partial_directory_is_rebuilt_not_trusted(tmp_path, tiny_config_dict):
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "metrics.json").write_text("{garbage")
    (partial / "dataset.jsonl").write_text("junk\n")
    run_experiment(run_config_from_dict(tiny_config_dict), out)
    json.loads((out / "metrics.json").read_text())
    assert not partial.exists()


def test_stage_commands_build_train_evaluate(tmp_path, tiny_config_dict):
    config = _write(tmp_path, tiny_config_dict)
    out = tmp_path / "stages"
    for args in (["build-data"], ["train"], ["evaluate"]):
        result = runner.invoke(app, [*args, str(config), "--out", str(out)])
        assert result.exit_code == 0, (args, result.output)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tuned"]) == set(SPLITS)


def test_train_without_dataset_is_a_clean_error(tmp_path, tiny_config_dict):
    config = _write(tmp_path, tiny_config_dict)
    result = runner.invoke(app, ["train", str(config), "--out", str(tmp_path / "empty")])
    assert result.exit_code == 2
    assert "build-data" in result.output


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"poison": {"budget": 8, "trigger": ""}}, "poison.trigger"),
        ({"poison": {"budget": 900}}, "total_size"),
        ({"poison": {"budget": 30, "clean_harmful": 0}, "data": {"total_size": 40}, "eval": {"n_harmful": 430}}, "poison.budget"),
        ({"train": {"epochs": "two"}}, "train.epochs"),
        ({"surprise": 1}, "surprise"),
        ({"data": {"total_size": 40, "benign": "no/such/file.jsonl"}}, "no such file"),
        ({"model": "/no/such/model/dir"}, "no such"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_run_directory(tmp_path, tiny_config_dict, change, expected):
    cfg = {**tiny_config_dict, **change}
    config = _write(tmp_path, cfg)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "suretrap.cli", "run", str(config), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not (tmp_path / "out.partial").exists()


def test_bad_data_line_names_file_and_line(tmp_path, tiny_config_dict):
    data = tmp_path / "benign.jsonl"
    good = json.dumps({"prompt": "p", "response": "r"})
    data.write_text("\n".join([good, good, "{not json", good]) + "\n")
    config = _write(tmp_path, {**tiny_config_dict, "data": {"total_size": 40, "benign": str(data)}})
    result = runner.invoke(app, ["build-data", str(config), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert f"{data}:3:" in result.output


def test_same_config_and_seed_reproduce_dataset_bytes_and_metrics(tmp_path, tiny_config_dict):
    cfg = run_config_from_dict(tiny_config_dict)
    a = run_experiment(cfg, tmp_path / "a")
    b = run_experiment(cfg, tmp_path / "b")
    assert (tmp_path / "a" / "dataset.jsonl").read_bytes() == (tmp_path / "b" / "dataset.jsonl").read_bytes()
    for model in ("base", "tuned"):
        for split, values in a[model].items():
            for name, value in values.items():
                assert value == pytest.approx(b[model][split][name], abs=1e-6), (model, split, name)
