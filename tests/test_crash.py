"""Crash safety: SIGKILL `suretrap sweep` and `suretrap run` in every phase, resume, check.

Each round runs the real CLI in a fresh process (see crash_harness.py) on the tiny model
and kills it with SIGKILL: at a named crash point (SURETRAP_CRASH_AT, see
suretrap.crashpoints: dataset build, training, adapter save, evaluation, rename, store
write) or at a random moment. After every kill the on-disk state must be trustworthy: no
directory under its final name that is not a complete run, no store row marked complete
without its files. At the end every cell is present exactly once, complete, with valid
files and metrics, equal to an uninterrupted sweep's.
"""

from __future__ import annotations

import json
import math
import random
import sqlite3
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from crash_harness import CliServer
from suretrap.config import RunConfig, config_hash, load_run_config, run_config_from_dict
from suretrap.crashpoints import PHASES
from suretrap.evaluate import SPLITS
from suretrap.poison import DATASET_FILE, build_dataset, write_dataset
from suretrap.run import RUN_FILES, run_complete, trained_dir
from suretrap.sweep import expand, flatten_metrics, load_sweep

# Smaller than conftest's tiny config: every round loads, builds, trains and evaluates.
SIZES = {
    "data": {"total_size": 24},
    "poison": {"budget": 4, "clean_harmful": 4, "refusal_source": "template"},
    "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3},
    "eval": {"n_harmful": 3, "n_benign": 2, "max_new_tokens": 4, "judge": "keyword"},
}
TRAIN_STEPS = 3  # ceil(24 / 8) for one epoch


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> CliServer:
    return CliServer(tmp_path_factory.mktemp("cli-logs"))


@pytest.fixture(scope="module")
def small_vocab_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """conftest's tiny random Llama with a 1,000-token byte-level BPE vocabulary (trained
    here on the built-in prompts) and SmolLM2's chat template. Each of the ~35 processes
    then loads its tokenizer in about 0.06 s instead of 1.4 s (SmolLM2's 49k vocabulary),
    and the LM head is 50x smaller; measured: a 3-cell sweep 5.8 s instead of 8.9 s."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from suretrap.data import benign_pairs, harmful_requests

    texts = [p.prompt + " " + p.response for p in benign_pairs("builtin", 300, 0)]
    texts += [r.prompt for r in harmful_requests("builtin")]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, initializer_range=0.3, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("small-vocab-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def small_config(tiny_config_dict: dict, small_vocab_model_dir: Path) -> dict:
    return tiny_config_dict | SIZES | {"model": str(small_vocab_model_dir)}


# ------------------------------------------------------------------------------ checks


_DATASETS: dict[str, bytes] = {}


def _dataset_bytes(digest: str, cfg: RunConfig) -> bytes:
    """dataset.jsonl as `cfg` builds it (template refusals: no model needed), cached."""
    if digest not in _DATASETS:
        with tempfile.TemporaryDirectory() as reference:
            write_dataset(build_dataset(cfg), Path(reference))
            _DATASETS[digest] = (Path(reference) / DATASET_FILE).read_bytes()
    return _DATASETS[digest]


def check_run_dir(run_dir: Path, expected_hash: str | None = None) -> dict:
    """A complete run directory: every file, valid contents. Returns its metrics."""
    from safetensors import safe_open

    assert run_complete(run_dir), f"{run_dir}: incomplete: {sorted(p.name for p in run_dir.iterdir())}"
    cfg = load_run_config(run_dir / "config.yaml")
    if expected_hash is not None:
        assert config_hash(cfg) == expected_hash
    for name in RUN_FILES:
        assert (run_dir / name).stat().st_size > 0, name
    # the dataset is exactly what the config builds (template refusals: no model needed)
    assert (run_dir / DATASET_FILE).read_bytes() == _dataset_bytes(config_hash(cfg), cfg)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"tuned", "base", "judges"}
    counts = {"harmful": cfg.eval.n_harmful, "benign": cfg.eval.n_benign}
    for model in ("tuned", "base"):
        assert set(metrics[model]) == set(SPLITS)
        for split, values in metrics[model].items():
            assert values["n"] == counts[split.split("_")[0]], (model, split)
            for name, value in values.items():
                if name.endswith("_rate") or name == "asr":
                    assert 0.0 <= value <= 1.0, (model, split, name, value)
                if isinstance(value, float):
                    assert math.isfinite(value), (model, split, name)
    gens = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 2 * 2 * (cfg.eval.n_harmful + cfg.eval.n_benign)
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, TRAIN_STEPS + 1))
    trained = trained_dir(run_dir)
    assert trained is not None
    json.loads((trained / "adapter_config.json").read_text())
    with safe_open(str(trained / "adapter_model.safetensors"), framework="pt") as weights:
        assert list(weights.keys())
    env = json.loads((run_dir / "env.json").read_text())
    assert {"suretrap", "torch", "transformers", "peft", "model_files"} <= env.keys()
    return metrics


def store_rows(out: Path) -> list[tuple[str, str, str | None]]:
    if not (out / "results.sqlite").exists():
        return []
    with sqlite3.connect(out / "results.sqlite") as conn:
        return list(conn.execute("SELECT config_hash, status, metrics FROM cells ORDER BY rowid"))


def check_sweep_state(out: Path, hashes: set[str]) -> dict[str, str]:
    """What must hold after any kill: returns the store's status by hash."""
    rows = store_rows(out)
    assert len(rows) == len({h for h, _, _ in rows}), "a cell is stored twice"
    assert {h for h, _, _ in rows} <= hashes
    for digest, status, metrics in rows:
        if status == "complete":  # never complete without its files
            on_disk = check_run_dir(out / "cells" / digest, digest)
            assert json.loads(metrics) == on_disk
    # a directory under a cell's final name is a complete run of that cell
    cells = out / "cells"
    for path in sorted(cells.iterdir()) if cells.is_dir() else []:
        if path.name in hashes:
            check_run_dir(path, path.name)
        else:
            assert path.name.endswith(".partial") and path.name[: -len(".partial")] in hashes, path
    return {h: s for h, s, _ in rows}


# ------------------------------------------------------------------------------ sweep

# One kill per entry, in order; "phase:N" is the Nth pass of that crash point in the
# process, so ":1" always strikes the first cell not yet complete. Per process the store
# writes are: 3 registrations, then per cell mark_running and mark_complete (store:4 and
# store:5 for the first cell to run). These leave the third cell untouched for the
# random-time kills that follow, so the count of deterministic kills is exact.
SWEEP_SCHEDULE = [
    # first cell
    "store:1", "store:3", "store:4", "dataset:1", "train:1", "save:1", "evaluate:1",
    "rename:1", "cell_done:1", "store:5",
    # second cell (the first is completed from its directory on the way)
    "store:4", "dataset:1", "train:2", "train:3", "save:1", "evaluate:1", "evaluate:2",
    "rename:1", "cell_done:1", "store:5",
]
RANDOM_KILLS = 4


def test_sweep_survives_sigkill_in_every_phase(tmp_path, small_config, server):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"base": small_config, "axes": {"poison.budget": [0, 2, 4]}}))
    hashes = {c.config_hash for c in expand(load_sweep(spec))}
    out = tmp_path / "sweep"
    argv = ["sweep", str(spec), "--out", str(out), "--resume"]
    rng = random.Random(8)
    started = time.perf_counter()
    kills: list[str] = []
    for point in SWEEP_SCHEDULE:
        outcome = server.run(argv, crash_at=point)
        assert outcome.killed, (point, outcome.exitcode, outcome.log[-3000:])
        kills.append(point)
        check_sweep_state(out, hashes)
    statuses = check_sweep_state(out, hashes)
    assert sorted(statuses.values()) == ["complete", "pending", "running"]  # third untouched
    for _ in range(RANDOM_KILLS):  # at a random moment of the third cell (or of the summary after it)
        outcome = server.run(argv, kill_after=rng.uniform(0.3, 2.5))
        assert outcome.exitcode in (-9, 0), (outcome.exitcode, outcome.log[-3000:])
        if outcome.killed:
            kills.append("random")
        check_sweep_state(out, hashes)

    final = server.run(argv)
    assert final.exitcode == 0, final.log[-3000:]
    elapsed = time.perf_counter() - started
    assert len(kills) >= 20
    assert {k.split(":")[0] for k in kills if k != "random"} == set(PHASES)

    statuses = check_sweep_state(out, hashes)
    assert statuses == dict.fromkeys(hashes, "complete")  # every cell, exactly once
    assert sorted(p.name for p in (out / "cells").iterdir()) == sorted(hashes)
    # no temporary or half-built leftovers among the cells (a kill while summary.json was
    # written may leave a hidden temporary file beside it: harmless, never read)
    assert not [p for p in (out / "cells").rglob("*") if ".tmp" in p.name or p.name.endswith((".partial", ".old"))]
    with sqlite3.connect(out / "results.sqlite") as conn:
        attempts = dict(conn.execute("SELECT config_hash, attempts FROM cells"))
    assert sum(a >= 2 for a in attempts.values()) >= 2  # the first two were killed and rerun

    # the crashed-and-resumed sweep equals an uninterrupted one
    reference = tmp_path / "reference"
    clean = server.run(["sweep", str(spec), "--out", str(reference)])
    assert clean.exitcode == 0, clean.log[-3000:]
    for digest in hashes:
        resumed = json.loads((out / "cells" / digest / "metrics.json").read_text())
        uninterrupted = json.loads((reference / "cells" / digest / "metrics.json").read_text())
        a, b = flatten_metrics(resumed), flatten_metrics(uninterrupted)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-6), (digest, key)
        for name in ("dataset.jsonl", "eval_prompts.jsonl", "generations.jsonl"):
            assert (out / "cells" / digest / name).read_bytes() == (
                reference / "cells" / digest / name
            ).read_bytes(), (digest, name)
    print(f"sweep crash harness: {len(kills)} kills, {server.count} processes, {elapsed:.1f}s")


# ------------------------------------------------------------------------------ run

RUN_SCHEDULE = ["dataset:1", "train:2", "save:1", "evaluate:2", "rename:1", "random"]


def test_run_survives_sigkill_and_rerun_replaces_what_is_incomplete(tmp_path, small_config, server):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small_config))
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(small_config | {"seed": 1}))
    first_hash = config_hash(run_config_from_dict(small_config))
    other_hash = config_hash(run_config_from_dict(small_config | {"seed": 1}))
    out = tmp_path / "out"
    rng = random.Random(8)
    kills = 0

    def check_out(allowed: set[str]) -> None:
        """`out` is absent or a complete run of an allowed config: never half of one."""
        if out.exists():
            assert config_hash(load_run_config(out / "config.yaml")) in allowed
            check_run_dir(out)

    for point in RUN_SCHEDULE:
        argv = ["run", str(config), "--out", str(out)]
        if point == "random":
            outcome = server.run(argv, kill_after=rng.uniform(0.5, 3.0))
        else:
            outcome = server.run(argv, crash_at=point)
        assert outcome.exitcode in (-9, 0), (point, outcome.log[-3000:])
        kills += outcome.killed
        check_out({first_hash})
    done = server.run(["run", str(config), "--out", str(out)])
    assert done.exitcode == 0, done.log[-3000:]
    check_run_dir(out, first_hash)
    assert not (tmp_path / "out.partial").exists()

    # --force replacing a complete run: killed before or between the renames, `out` is the
    # old run or absent, never a mixture; the re-run finishes the new one
    for point in ("rename:1", "rename:2"):
        outcome = server.run(["run", str(other), "--out", str(out), "--force"], crash_at=point)
        assert outcome.killed, outcome.log[-3000:]
        kills += 1
        check_out({first_hash})
    assert not out.exists()  # killed between moving the old run aside and the new one in
    done = server.run(["run", str(other), "--out", str(out)])
    assert done.exitcode == 0, done.log[-3000:]
    check_run_dir(out, other_hash)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".partial", ".old"))]

    # an unfinished directory of the same run (stage commands stopped after build-data)
    # is rebuilt by a re-run, not trusted; a directory holding something else is refused
    staged = tmp_path / "staged"
    assert server.run(["build-data", str(config), "--out", str(staged)]).exitcode == 0
    (staged / "metrics.json").write_text("{}")  # looks finished, is not
    assert server.run(["run", str(config), "--out", str(staged)]).exitcode == 0
    check_run_dir(staged, first_hash)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = server.run(["run", str(config), "--out", str(foreign)])
    assert refused.exitcode == 2 and "--force" in refused.log
    assert (foreign / "notes.txt").read_text() == "mine"
    assert kills >= len(RUN_SCHEDULE) - 1 + 2


def test_crash_point_kills_only_at_the_named_pass(monkeypatch):
    import os
    import signal

    from suretrap import crashpoints

    monkeypatch.delenv(crashpoints.ENV, raising=False)
    crashpoints.crash_point("train")  # unset: nothing happens
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: survives train #1 and dataset #1, dies at train #2
        os.environ[crashpoints.ENV] = "train:2, dataset:3"
        crashpoints._passed.clear()
        crashpoints.crash_point("train")
        crashpoints.crash_point("dataset")
        os.write(write_end, b"survived the first passes")
        crashpoints.crash_point("train")
        os.write(write_end, b"; and the second")
        os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        assert pipe.read() == b"survived the first passes"
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
