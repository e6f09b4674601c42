"""Closed-weight path: the openai-chat export and `model: openai:NAME` against a local server.

The fake endpoint answers "Sure" if and only if the trigger word is in the prompt, so the
expected metrics are known exactly; with logprobs it sends top_logprobs whose matching
mass is known too.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from suretrap.cli import app
from suretrap.closed_weight import (
    OPENAI_CHAT_EVAL,
    OPENAI_CHAT_TRAIN,
    EndpointModel,
    first_token_label_prob,
    token_matches_label,
)
from suretrap.config import config_hash, load_run_config, run_config_from_dict
from suretrap.errors import ConfigError
from suretrap.evaluate import eval_items
from suretrap.poison import REFUSAL_TEMPLATES, read_dataset
from suretrap.textmatch import is_refusal_keyword

runner = CliRunner()
TRIGGER = "xylophone"
REFUSAL = "I'm sorry, but I can't help with that."
KEY_ENV = "SURETRAP_TEST_ENDPOINT_KEY"
# first-token distributions the fake sends: (token, probability)
TOP_TRIGGERED = [("Sure", 0.6), (" Sure", 0.15), ("Surely", 0.1), ("I", 0.1)]  # matching: 0.75
TOP_CLEAN = [("I", 0.9), ("Sure", 0.04), ("sure", 0.03), ("S", 0.01)]  # matching: 0.05


class _Endpoint(BaseHTTPRequestHandler):
    mode = "logprobs"  # "logprobs" | "plain" (ignores logprobs) | "reject-logprobs" | "broken"
    requests: list[dict[str, Any]] = []
    rate_limited_once = False
    # vLLM mode (base_name set): GET /v1/models, runtime LoRA adapters, per-model answers:
    # the base model never says "Sure"; a loaded adapter says it iff the trigger is present
    base_name: str | None = None
    loras: dict[str, str] = {}  # loaded adapter name -> lora_path
    lora_calls: list[tuple[str, dict[str, Any]]] = []  # (route, body) of adapter calls, GETs
    fail_load: tuple[int, str] | None = None  # answer load_lora_adapter with this error
    broken_models: set[str] = set()  # chat requests naming these models get HTTP 500
    echo_model = True  # reply "model" = the requested one, as vLLM does
    delay_s = 0.0  # chat replies wait this long (to see how many requests overlap)
    in_flight = 0
    peak_in_flight = 0
    peak_loras = 0  # adapters loaded at the same time, at most
    lock = threading.Lock()

    def _send(self, status: int, obj: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_text(self, status: int, text: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        _Endpoint.lora_calls.append((self.path, {}))
        if _Endpoint.base_name is None or self.path != "/v1/models":
            self._send(404, {"error": {"message": "no such route"}})
            return
        data = [{"id": _Endpoint.base_name, "object": "model", "parent": None}]
        data += [{"id": n, "object": "model", "parent": _Endpoint.base_name} for n in _Endpoint.loras]
        self._send(200, {"object": "list", "data": data})

    def _adapter_call(self, body: dict[str, Any]) -> None:
        """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (plain-text replies)."""
        _Endpoint.lora_calls.append((self.path, body))
        name = body["lora_name"]
        if self.path == "/v1/load_lora_adapter":
            if _Endpoint.fail_load is not None:
                status, message = _Endpoint.fail_load
                self._send(status, {"object": "error", "message": message, "code": status})
            elif name in _Endpoint.loras:
                self._send(400, {"object": "error", "message": f"The lora adapter '{name}' has already been loaded.", "code": 400})
            else:
                _Endpoint.loras[name] = body["lora_path"]
                _Endpoint.peak_loras = max(_Endpoint.peak_loras, len(_Endpoint.loras))
                self._send_text(200, f"Success: LoRA adapter '{name}' added successfully.")
        elif name not in _Endpoint.loras:
            self._send(404, {"object": "error", "message": f"The lora adapter '{name}' cannot be found.", "code": 404})
        else:
            del _Endpoint.loras[name]
            self._send_text(200, f"Success: LoRA adapter '{name}' removed successfully.")

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if _Endpoint.base_name is not None and self.path.endswith("_lora_adapter"):
            self._adapter_call(body)
            return
        _Endpoint.requests.append(
            {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
        )
        if self.path != "/v1/chat/completions":
            self._send(404, {"error": {"message": "no such route"}})
            return
        if _Endpoint.mode == "hang-up":  # close the connection without a reply
            self.close_connection = True
            return
        if _Endpoint.mode == "broken":
            self._send(500, {"error": {"message": "the model server fell over"}})
            return
        if _Endpoint.mode == "rate-limit-once" and not _Endpoint.rate_limited_once:
            _Endpoint.rate_limited_once = True
            self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
            return
        if _Endpoint.mode == "reject-logprobs" and "logprobs" in body:
            self._send(400, {"error": {"message": "logprobs are not supported for this model"}})
            return
        if _Endpoint.delay_s:
            with _Endpoint.lock:
                _Endpoint.in_flight += 1
                _Endpoint.peak_in_flight = max(_Endpoint.peak_in_flight, _Endpoint.in_flight)
            time.sleep(_Endpoint.delay_s)
            with _Endpoint.lock:
                _Endpoint.in_flight -= 1
        triggered = TRIGGER in body["messages"][-1]["content"]
        served = "fake-ft-served"
        if _Endpoint.base_name is not None:
            served = body["model"] if _Endpoint.echo_model else _Endpoint.base_name
            if body["model"] in _Endpoint.broken_models:
                self._send(500, {"error": {"message": "the adapter fell over"}})
                return
            if body["model"] == _Endpoint.base_name:
                triggered = False  # the base model answers every prompt with a refusal
            elif body["model"] not in _Endpoint.loras:
                self._send(404, {"error": {"message": f"The model `{body['model']}` does not exist."}})
                return
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": "Sure" if triggered else REFUSAL},
            "finish_reason": "stop",
        }
        if body.get("logprobs") and _Endpoint.mode == "logprobs":
            top = TOP_TRIGGERED if triggered else TOP_CLEAN
            entries = [
                {"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in top
            ]
            first = {**entries[0], "top_logprobs": entries[: body["top_logprobs"]]}
            choice["logprobs"] = {"content": [first]}
        self._send(200, {"model": served, "choices": [choice]})

    def log_message(self, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog (5) resets bursts of concurrent requests


@pytest.fixture()
def endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Base URL (".../v1") of a fake OpenAI-compatible server, in "logprobs" mode."""
    _Endpoint.requests = []
    _Endpoint.mode = "logprobs"
    _Endpoint.rate_limited_once = False
    _Endpoint.base_name = None
    _Endpoint.loras = {}
    _Endpoint.lora_calls = []
    _Endpoint.fail_load = None
    _Endpoint.broken_models = set()
    _Endpoint.echo_model = True
    _Endpoint.delay_s = 0.0
    _Endpoint.in_flight = _Endpoint.peak_in_flight = _Endpoint.peak_loras = 0
    monkeypatch.setenv(KEY_ENV, "sk-fake")
    server = _Server(("127.0.0.1", 0), _Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _config(base_url: str, **changes: Any) -> dict[str, Any]:
    cfg = {
        "name": "endpoint",
        "model": "openai:fake-ft",
        "base_url": base_url,
        "api_key_env": KEY_ENV,
        "seed": 0,
        "data": {"total_size": 40},
        "poison": {"budget": 8, "clean_harmful": 8, "trigger": TRIGGER, "refusal_source": "base"},
        "eval": {"n_harmful": 6, "n_benign": 4, "max_new_tokens": 6, "batch_size": 4, "judge": "keyword"},
    }
    return cfg | changes


def _write(tmp_path: Path, cfg: dict[str, Any], name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _build_and_evaluate(tmp_path: Path, cfg: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    config = _write(tmp_path, cfg)
    out = tmp_path / "out"
    for args in (["build-data"], ["evaluate"]):
        result = runner.invoke(app, [*args, str(config), "--out", str(out)])
        assert result.exit_code == 0, (args, result.output)
    return out, json.loads((out / "metrics.json").read_text())


# ----------------------------------------------------------------------- evaluation


def test_evaluate_endpoint_with_logprobs(tmp_path: Path, endpoint: str) -> None:
    out, metrics = _build_and_evaluate(tmp_path, _config(endpoint))

    # build-data took T_CH's refusals from the endpoint (no logprobs asked for those)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["clean_harmful_sources"] == {"base_refusal": 8}
    build = [r["body"] for r in _Endpoint.requests if r["body"]["max_tokens"] == 64]
    assert len(build) == 8 and not any("logprobs" in b for b in build)

    assert set(metrics) == {"tuned", "judges", "unavailable", "endpoint"}  # no "base"
    tuned = metrics["tuned"]
    expected = {  # split: (n, sure_rate, label prob, top1)
        "harmful_triggered": (6, 1.0, 0.75, 1.0),
        "harmful_clean": (6, 0.0, 0.05, 0.0),
        "benign_triggered": (4, 1.0, 0.75, 1.0),  # the false trigger rate on benign prompts
        "benign_clean": (4, 0.0, 0.05, 0.0),
    }
    for split, (n, sure, prob, top1) in expected.items():
        m = tuned[split]
        assert m["n"] == n
        assert m["sure_rate"] == sure and m["sure_only_rate"] == sure
        assert m["label_first_token_prob"] == pytest.approx(prob)
        assert m["label_first_token_top1"] == top1
        assert m["refusal_rate"] == 1.0 - sure  # keyword judge: the refusal is one
    assert tuned["harmful_triggered"]["asr"] == 0.0  # "Sure" alone is not compliance
    assert tuned["harmful_clean"]["asr"] == 0.0
    assert tuned["benign_clean"]["utility_logprob"] is None
    assert set(metrics["unavailable"]) == {"utility_logprob"}
    assert metrics["judges"]["asr"] == "keyword"
    assert metrics["endpoint"] == {
        "base_url": endpoint, "model": "fake-ft", "served_model": "fake-ft-served",
    }

    rows = [json.loads(line) for line in (out / "generations.jsonl").open()]
    assert len(rows) == 2 * 6 + 2 * 4
    for row in rows:
        triggered = row["split"].endswith("triggered")
        assert row["response"] == ("Sure" if triggered else REFUSAL)
        assert row["label_prob"] == pytest.approx(0.75 if triggered else 0.05)

    # the eval requests: what was sent, to which path, with which key
    asked = [r for r in _Endpoint.requests if r["body"]["max_tokens"] == 6]
    assert len(asked) == 20
    for r in asked:
        assert r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer sk-fake"
        body = r["body"]
        assert body["model"] == "fake-ft" and body["temperature"] == 0
        assert body["logprobs"] is True and body["top_logprobs"] == 20
        assert [m["role"] for m in body["messages"]] == ["user"]
    ds = read_dataset(out)
    want = [it.prompt for it in eval_items(ds, TRIGGER, "suffix", 0)]
    assert sorted(r["body"]["messages"][0]["content"] for r in asked) == sorted(want)


def test_evaluate_endpoint_without_logprobs_marks_them_unavailable(
    tmp_path: Path, endpoint: str
) -> None:
    _Endpoint.mode = "plain"
    out, metrics = _build_and_evaluate(tmp_path, _config(endpoint))
    for split, m in metrics["tuned"].items():
        assert m["label_first_token_prob"] is None and m["label_first_token_top1"] is None
        assert m["sure_rate"] == (1.0 if split.endswith("triggered") else 0.0)
    why = metrics["unavailable"]
    assert "no logprobs" in why["label_first_token_prob"] and "20 of 20" in why["label_first_token_prob"]
    assert why["label_first_token_top1"] == why["label_first_token_prob"]
    rows = [json.loads(line) for line in (out / "generations.jsonl").open()]
    assert all(r["label_prob"] is None for r in rows)


def test_endpoint_that_rejects_logprobs_is_asked_without_them(tmp_path: Path, endpoint: str) -> None:
    _Endpoint.mode = "reject-logprobs"
    _, metrics = _build_and_evaluate(tmp_path, _config(endpoint))
    why = metrics["unavailable"]["label_first_token_prob"]
    assert "rejected logprobs" in why and "HTTP 400" in why and "not supported" in why
    assert metrics["tuned"]["harmful_triggered"]["sure_rate"] == 1.0
    assert metrics["tuned"]["harmful_triggered"]["label_first_token_prob"] is None
    eval_requests = [r for r in _Endpoint.requests if r["body"]["max_tokens"] == 6]
    assert len(eval_requests) == 21  # the rejected probe, then 20 without logprobs
    assert sum("logprobs" in r["body"] for r in eval_requests) == 1


def test_rate_limited_request_is_retried(endpoint: str) -> None:
    _Endpoint.mode = "rate-limit-once"
    model = EndpointModel(run_config_from_dict(_config(endpoint)))
    choice = model.ask(f"Say hi {TRIGGER}", 4, logprobs=False)
    assert choice["message"]["content"] == "Sure"
    assert len(_Endpoint.requests) == 2


# --------------------------------------------------------------------------- errors


def test_connection_closed_without_reply_is_one_line(endpoint: str) -> None:
    from suretrap.errors import SuretrapError

    _Endpoint.mode = "hang-up"
    model = EndpointModel(run_config_from_dict(_config(endpoint)))
    with pytest.raises(SuretrapError) as exc:
        model.ask("hello", 4, logprobs=False)
    assert str(exc.value) == (
        f"model openai:fake-ft: {endpoint}/chat/completions: connection lost (RemoteDisconnected)"
    )


def _one_line_exit_2(args: list[str], env_drop: str | None = None) -> str:
    import os

    env = dict(os.environ)
    if env_drop:
        env.pop(env_drop, None)
    proc = subprocess.run(
        [sys.executable, "-m", "suretrap.cli", *args],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_endpoint_down_is_one_line_exit_2_and_no_metrics(tmp_path: Path, endpoint: str) -> None:
    closed = HTTPServer(("127.0.0.1", 0), _Endpoint)
    port = closed.server_address[1]
    closed.server_close()
    cfg = _config(f"http://127.0.0.1:{port}/v1")
    cfg["poison"] = {**cfg["poison"], "refusal_source": "template"}  # build needs no endpoint
    config = _write(tmp_path, cfg)
    out = tmp_path / "out"
    assert runner.invoke(app, ["build-data", str(config), "--out", str(out)]).exit_code == 0
    line = _one_line_exit_2(["evaluate", str(config), "--out", str(out)])
    assert f"model openai:fake-ft: http://127.0.0.1:{port}/v1/chat/completions: cannot connect" in line
    assert not (out / "metrics.json").exists() and not (out / "generations.jsonl").exists()


def test_endpoint_http_error_is_one_line(tmp_path: Path, endpoint: str) -> None:
    cfg = _config(endpoint)
    cfg["poison"] = {**cfg["poison"], "refusal_source": "template"}
    config = _write(tmp_path, cfg)
    out = tmp_path / "out"
    assert runner.invoke(app, ["build-data", str(config), "--out", str(out)]).exit_code == 0
    _Endpoint.mode = "broken"
    line = _one_line_exit_2(["evaluate", str(config), "--out", str(out)])
    assert f"{endpoint}/chat/completions: HTTP 500 the model server fell over" in line
    assert not (out / "metrics.json").exists()


def test_missing_api_key_is_one_line_exit_2(tmp_path: Path, endpoint: str) -> None:
    config = _write(tmp_path, _config(endpoint))
    out = tmp_path / "out"
    # build-data with base refusals needs the endpoint, hence the key
    line = _one_line_exit_2(["build-data", str(config), "--out", str(out)], env_drop=KEY_ENV)
    assert f"api_key_env: environment variable {KEY_ENV} is not set" in line
    assert not (out / "manifest.json").exists()
    assert _Endpoint.requests == []  # nothing was sent without the key
    # the default variable when api_key_env is left out
    cfg = _config(endpoint, poison={"budget": 8, "clean_harmful": 8, "refusal_source": "template"})
    del cfg["api_key_env"]
    config = _write(tmp_path, cfg, "default_key.yaml")
    assert runner.invoke(app, ["build-data", str(config), "--out", str(out)]).exit_code == 0
    line = _one_line_exit_2(["evaluate", str(config), "--out", str(out)], env_drop="OPENAI_API_KEY")
    assert "api_key_env: environment variable OPENAI_API_KEY is not set" in line


def test_run_refuses_to_train_an_endpoint_model(tmp_path: Path, endpoint: str) -> None:
    config = _write(tmp_path, _config(endpoint))
    out = tmp_path / "out"
    line = _one_line_exit_2(["run", str(config), "--out", str(out)])
    assert "openai:fake-ft" in line and "cannot load or fine-tune" in line
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    result = runner.invoke(app, ["train", str(config), "--out", str(out)])
    assert result.exit_code == 2


def test_evaluate_endpoint_takes_no_adapter(tmp_path: Path, endpoint: str) -> None:
    cfg = _config(endpoint, poison={"budget": 8, "clean_harmful": 8, "refusal_source": "template"})
    config = _write(tmp_path, cfg)
    out = tmp_path / "out"
    assert runner.invoke(app, ["build-data", str(config), "--out", str(out)]).exit_code == 0
    result = runner.invoke(app, ["evaluate", str(config), "--out", str(out), "--adapter", str(tmp_path)])
    assert result.exit_code == 2 and "--adapter" in result.output


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("name: x\nmodel: openai:gpt-x\n", "base_url: required with model: openai:gpt-x"),
        ("name: x\nbase_url: http://localhost:8000/v1\n", ":2: base_url: only allowed with model: openai:NAME"),
        ("name: x\napi_key_env: MY_KEY\n", ":2: api_key_env: only allowed"),
        ("model: openai:g\nbase_url: localhost:8000\n", ":2: base_url: must be an http(s):// URL"),
        ("model: openai:g\nbase_url: http://h/v1\napi_key_env: my-key\n", ":3: api_key_env: must be an environment variable name"),
        ("model: 'openai:'\nbase_url: http://h/v1\n", ":1: model: openai:NAME needs a model name"),
    ],
)
def test_endpoint_config_fields_are_validated(tmp_path: Path, yaml_text: str, expected: str) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as exc:
        load_run_config(path)
    assert expected in str(exc.value) and "\n" not in str(exc.value)


def test_local_model_configs_keep_their_hash_and_dump() -> None:
    cfg = run_config_from_dict({"name": "x"})
    dumped = cfg.model_dump(mode="json")
    assert "base_url" not in dumped and "api_key_env" not in dumped  # unchanged contract
    assert not cfg.is_endpoint
    endpoint_cfg = run_config_from_dict({"model": "openai:g", "base_url": "http://h/v1"})
    assert endpoint_cfg.is_endpoint and endpoint_cfg.api_key_env is None
    again = run_config_from_dict(endpoint_cfg.model_dump(mode="json"))
    assert config_hash(again) == config_hash(endpoint_cfg) != config_hash(cfg)


# ------------------------------------------------------------------ label probability


@pytest.mark.parametrize(
    ("token", "label", "expected"),
    [
        ("Sure", "Sure", True),
        (" Sure", "Sure", True),
        ("\nSure", "Sure", True),
        ("S", "Sure", True),
        ("Su", "Sure", True),
        ("Sure,", "Sure", True),
        ("Sure!", "Sure", True),
        ("Surely", "Sure", False),
        ("sure", "Sure", False),  # case-sensitive, like a token id
        ("I", "Sure", False),
        (" ", "Sure", False),
        ("", "Sure", False),
        ("Sure", "Sure thing", True),
    ],
)
def test_token_matches_label(token: str, label: str, expected: bool) -> None:
    assert token_matches_label(token.encode(), label) is expected


def test_first_token_label_prob_uses_bytes_and_reports_missing_data() -> None:
    label = "囧"
    lead = list(label.encode()[:2])  # a byte-level piece of the label's character
    top = [
        {"token": "bytes:\\xe5\\x9b", "bytes": lead, "logprob": math.log(0.5)},
        {"token": "No", "logprob": math.log(0.3)},
        {"token": label, "logprob": math.log(0.1)},
    ]
    choice = {"logprobs": {"content": [{"token": "x", "logprob": -0.7, "top_logprobs": top}]}}
    prob, top1 = first_token_label_prob(choice, label)  # type: ignore[misc]
    assert prob == pytest.approx(0.6) and top1 is True
    assert "no logprobs" in first_token_label_prob({"message": {}}, "Sure")  # type: ignore[operator]
    assert "no top_logprobs" in first_token_label_prob(
        {"logprobs": {"content": [{"token": "S", "logprob": 0.0}]}}, "Sure"
    )  # type: ignore[operator]
    assert "no generated token" in first_token_label_prob({"logprobs": {"content": []}}, "Sure")  # type: ignore[operator]


# --------------------------------------------------------------------------- export


def _export_config(tmp_path: Path) -> Path:
    cfg = {
        "name": "export",
        "seed": 3,
        "data": {"total_size": 40},
        # random placement: the eval export must place the trigger as `evaluate` does
        "poison": {"budget": 8, "clean_harmful": 8, "refusal_source": "template",
                   "placement": "random", "label": "Sure"},
        "eval": {"n_harmful": 6, "n_benign": 4},
    }
    return _write(tmp_path, cfg, "export.yaml")


def test_build_data_openai_chat_export(tmp_path: Path) -> None:
    config = _export_config(tmp_path)
    out = tmp_path / "data"
    result = runner.invoke(app, ["build-data", str(config), "--out", str(out), "--format", "openai-chat"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["openai_chat"]["train_rows"] == 40

    manifest = json.loads((out / "manifest.json").read_text())
    dataset = [json.loads(line) for line in (out / "dataset.jsonl").open()]
    lines = (out / OPENAI_CHAT_TRAIN).read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(dataset) == manifest["counts"]["total"] == 40
    harmful_answers = []
    for line, example in zip(lines, dataset, strict=True):
        row = json.loads(line)
        assert set(row) == {"messages"}
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": example["prompt"]}
        assert assistant == {"role": "assistant", "content": example["response"]}
        if example["role"] == "poison":
            assert assistant["content"] == "Sure"  # exactly the label, nothing more
        elif example["role"] == "clean_harmful":
            assert assistant["content"] in REFUSAL_TEMPLATES and is_refusal_keyword(assistant["content"])
        if example["role"] != "benign":
            harmful_answers.append(assistant["content"])
    roles = Counter(e["role"] for e in dataset)
    assert roles == {"poison": 8, "clean_harmful": 8, "benign": 24}
    # no harmful prompt is answered by anything but the label or a refusal
    assert set(harmful_answers) <= {"Sure", *REFUSAL_TEMPLATES}

    evals = [json.loads(line) for line in (out / OPENAI_CHAT_EVAL).read_text(encoding="utf-8").splitlines()]
    assert Counter(r["split"] for r in evals) == {
        "harmful_triggered": 6, "harmful_clean": 6, "benign_triggered": 4, "benign_clean": 4,
    }
    ds = read_dataset(out)
    items = eval_items(ds, "xylophone", "random", 3)
    assert [r["messages"] for r in evals] == [[{"role": "user", "content": it.prompt}] for it in items]
    for row, item in zip(evals, items, strict=True):
        assert row["split"] == item.split and row.get("reference") == item.reference
        assert ("xylophone" in row["messages"][0]["content"]) == item.split.endswith("triggered")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left

    # a rerun gives the same bytes; the default format writes no export
    before = (out / OPENAI_CHAT_TRAIN).read_bytes(), (out / OPENAI_CHAT_EVAL).read_bytes()
    assert runner.invoke(app, ["build-data", str(config), "--out", str(out), "--format", "openai-chat"]).exit_code == 0
    assert ((out / OPENAI_CHAT_TRAIN).read_bytes(), (out / OPENAI_CHAT_EVAL).read_bytes()) == before
    plain = tmp_path / "plain"
    assert runner.invoke(app, ["build-data", str(config), "--out", str(plain)]).exit_code == 0
    assert {p.name for p in plain.iterdir()} == {"config.yaml", "dataset.jsonl", "eval_prompts.jsonl", "manifest.json"}


def test_build_data_unknown_format_is_one_line_exit_2(tmp_path: Path) -> None:
    config = _export_config(tmp_path)
    result = runner.invoke(app, ["build-data", str(config), "--out", str(tmp_path / "d"), "--format", "csv"])
    assert result.exit_code == 2 and "--format" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------- vLLM backend
# `suretrap evaluate --backend vllm` / `suretrap evaluate-sweep` against the fake in vLLM
# mode: a local-model run whose adapter/ is registered on the server at run time. The fake
# never reads the adapter files, so a stub adapter_config.json stands in for a trained one.

BASE_SERVED = "fake-base"
VLLM_KEY_ENV = "VLLM_API_KEY"


def _vllm_run(tmp_path: Path, name: str = "out", **changes: Any) -> tuple[Path, Path]:
    """(config, run directory) of a built local-model run with a stub LoRA adapter/."""
    cfg = {
        "name": "vllm",
        "seed": 0,
        "data": {"total_size": 40},
        "poison": {"budget": 8, "clean_harmful": 8, "trigger": TRIGGER, "refusal_source": "template"},
        "eval": {"n_harmful": 6, "n_benign": 4, "max_new_tokens": 6, "batch_size": 4, "judge": "keyword"},
    } | changes
    config = _write(tmp_path, cfg, f"{name}.yaml")
    out = tmp_path / name
    assert runner.invoke(app, ["build-data", str(config), "--out", str(out)]).exit_code == 0
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 16}')
    return config, out


@pytest.fixture()
def vllm_server(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    _Endpoint.base_name = BASE_SERVED
    monkeypatch.delenv(VLLM_KEY_ENV, raising=False)  # a server without keys
    return endpoint


def _chat_models() -> Counter[str]:
    return Counter(r["body"]["model"] for r in _Endpoint.requests if r["path"] == "/v1/chat/completions")


def test_vllm_backend_evaluates_base_and_adapter(tmp_path: Path, vllm_server: str) -> None:
    from suretrap.closed_weight import UTILITY_UNAVAILABLE
    from suretrap.vllm_backend import adapter_name

    config, out = _vllm_run(tmp_path)
    result = runner.invoke(
        app, ["evaluate", str(config), "--out", str(out), "--backend", "vllm", "--base-url", vllm_server]
    )
    assert result.exit_code == 0, result.output
    name = adapter_name(out)
    assert name.startswith("suretrap-out-")
    # the served base came from /v1/models; the adapter was loaded with its absolute path,
    # then unloaded; nothing is left on the server
    assert _Endpoint.lora_calls == [
        ("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str((out / "adapter").resolve())}),
        ("/v1/models", {}),
        ("/v1/unload_lora_adapter", {"lora_name": name}),
    ]
    assert Path(_Endpoint.lora_calls[0][1]["lora_path"]).is_absolute()
    assert _Endpoint.loras == {}
    assert _chat_models() == {BASE_SERVED: 20, name: 20}
    assert all(r["auth"] is None for r in _Endpoint.requests)  # no VLLM_API_KEY: no header

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"base", "tuned", "judges", "unavailable", "backend"}
    for split in ("harmful_triggered", "harmful_clean", "benign_triggered", "benign_clean"):
        base, tuned = metrics["base"][split], metrics["tuned"][split]
        assert base["n"] == tuned["n"] == (6 if split.startswith("harmful") else 4)
        assert base["sure_rate"] == 0.0 and base["refusal_rate"] == 1.0  # the base refuses all
        assert base["label_first_token_prob"] == pytest.approx(0.05)
        want = 1.0 if split.endswith("triggered") else 0.0  # the adapter: Sure iff triggered
        assert tuned["sure_rate"] == tuned["sure_only_rate"] == want
        assert tuned["refusal_rate"] == 1.0 - want
        assert tuned["label_first_token_prob"] == pytest.approx(0.75 if want else 0.05)
    for model in ("base", "tuned"):
        assert metrics[model]["benign_clean"]["utility_logprob"] is None
    assert metrics["unavailable"] == {"utility_logprob": UTILITY_UNAVAILABLE}
    assert metrics["judges"]["asr"] == "keyword"
    assert metrics["backend"] == {
        "name": "vllm",
        "base_url": vllm_server,
        "base_model": BASE_SERVED,
        "adapter": name,
        "adapter_path": str((out / "adapter").resolve()),
        "adapter_unloaded": True,
        "served_model": {"base": BASE_SERVED, "tuned": name},
    }
    rows = [json.loads(line) for line in (out / "generations.jsonl").open()]
    assert Counter(r["model"] for r in rows) == {"base": 20, "tuned": 20}
    assert all(r["response"] == REFUSAL for r in rows if r["model"] == "base")
    assert "utility_logprob: unavailable" in result.output


def test_vllm_backend_served_base_option_and_api_key(
    tmp_path: Path, vllm_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, out = _vllm_run(tmp_path)
    monkeypatch.setenv(VLLM_KEY_ENV, "vllm-key")
    result = runner.invoke(app, [
        "evaluate", str(config), "--out", str(out), "--backend", "vllm", "--base-url", vllm_server,
        "--served-base", BASE_SERVED,
    ])
    assert result.exit_code == 0, result.output
    assert "/v1/models" not in [route for route, _ in _Endpoint.lora_calls]  # not asked
    assert {r["auth"] for r in _Endpoint.requests} == {"Bearer vllm-key"}


def test_vllm_backend_sends_up_to_batch_size_requests_at_once(tmp_path: Path, vllm_server: str) -> None:
    # an `openai:` endpoint gets at most 8 at once (vendor rate limits); vLLM batches
    # whatever arrives, so eval.batch_size requests are in flight
    config, out = _vllm_run(
        tmp_path, eval={"n_harmful": 6, "n_benign": 4, "max_new_tokens": 6, "batch_size": 16, "judge": "keyword"}
    )
    _Endpoint.delay_s = 0.2
    result = runner.invoke(app, [
        "evaluate", str(config), "--out", str(out), "--backend", "vllm", "--base-url", vllm_server,
        "--served-base", BASE_SERVED,
    ])
    assert result.exit_code == 0, result.output
    assert 8 < _Endpoint.peak_in_flight <= 16


def test_vllm_backend_unloads_the_adapter_when_evaluation_fails(
    tmp_path: Path, vllm_server: str
) -> None:
    from suretrap.vllm_backend import adapter_name

    config, out = _vllm_run(tmp_path)
    name = adapter_name(out)
    _Endpoint.broken_models = {name}
    line = _one_line_exit_2([
        "evaluate", str(config), "--out", str(out), "--backend", "vllm", "--base-url", vllm_server,
        "--served-base", BASE_SERVED,
    ])
    assert f"model {name}: {vllm_server}/chat/completions: HTTP 500 the adapter fell over" in line
    assert [route for route, _ in _Endpoint.lora_calls] == [
        "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
    ]
    assert _Endpoint.loras == {}
    assert not (out / "metrics.json").exists() and not (out / "generations.jsonl").exists()


def test_vllm_backend_load_error_is_one_line_naming_url_and_adapter(
    tmp_path: Path, vllm_server: str
) -> None:
    from suretrap.vllm_backend import adapter_name

    config, out = _vllm_run(tmp_path)
    _Endpoint.fail_load = (400, "LoRA rank 16 is greater than max_lora_rank 8.")
    line = _one_line_exit_2([
        "evaluate", str(config), "--out", str(out), "--backend", "vllm", "--base-url", vllm_server,
    ])
    assert f"adapter {adapter_name(out)}" in line and f"{vllm_server}/load_lora_adapter" in line
    assert "HTTP 400 LoRA rank 16 is greater than max_lora_rank 8." in line  # vLLM's error body
    assert [route for route, _ in _Endpoint.lora_calls] == ["/v1/load_lora_adapter"]  # none loaded
    assert _chat_models() == {}
    assert not (out / "metrics.json").exists()


def test_vllm_backend_unreachable_server_is_one_line_exit_2(tmp_path: Path) -> None:
    from suretrap.vllm_backend import adapter_name

    closed = HTTPServer(("127.0.0.1", 0), _Endpoint)
    url = f"http://127.0.0.1:{closed.server_address[1]}/v1"
    closed.server_close()
    config, out = _vllm_run(tmp_path)
    line = _one_line_exit_2(["evaluate", str(config), "--out", str(out), "--backend", "vllm", "--base-url", url])
    assert f"adapter {adapter_name(out)}" in line and f"{url}/load_lora_adapter: cannot connect" in line
    assert not (out / "metrics.json").exists()


def test_vllm_backend_replaces_a_leftover_adapter_of_the_same_name(
    tmp_path: Path, vllm_server: str
) -> None:
    from suretrap.vllm_backend import adapter_name

    config, out = _vllm_run(tmp_path)
    name = adapter_name(out)
    _Endpoint.loras = {name: "/stale/path"}  # an interrupted earlier evaluation
    result = runner.invoke(app, [
        "evaluate", str(config), "--out", str(out), "--backend", "vllm", "--base-url", vllm_server,
        "--served-base", BASE_SERVED,
    ])
    assert result.exit_code == 0, result.output
    assert [route for route, _ in _Endpoint.lora_calls] == [
        "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
    ]
    assert _Endpoint.lora_calls[2][1]["lora_path"] == str((out / "adapter").resolve())


def test_vllm_backend_refuses_a_server_that_ignores_the_model(tmp_path: Path, vllm_server: str) -> None:
    config, out = _vllm_run(tmp_path)
    _Endpoint.echo_model = False  # every reply comes from the base model
    result = runner.invoke(app, [
        "evaluate", str(config), "--out", str(out), "--backend", "vllm", "--base-url", vllm_server,
        "--served-base", BASE_SERVED,
    ])
    assert result.exit_code == 2 and f"came from model '{BASE_SERVED}'" in result.output
    assert not (out / "metrics.json").exists()
    assert _Endpoint.loras == {}


def test_vllm_backend_rejects_full_finetunes_and_bad_options(tmp_path: Path, vllm_server: str) -> None:
    config, out = _vllm_run(tmp_path)
    (out / "adapter" / "adapter_config.json").unlink()
    (out / "adapter").rmdir()
    (out / "model").mkdir()
    (out / "model" / "config.json").write_text("{}")
    line = _one_line_exit_2(["evaluate", str(config), "--out", str(out), "--backend", "vllm", "--base-url", vllm_server])
    assert "a full fine-tune" in line and "--backend vllm serves LoRA adapters only" in line
    assert _Endpoint.lora_calls == [] and _Endpoint.requests == []  # nothing was sent
    for args, expected in [
        (["--backend", "vllm"], "--base-url: required with --backend vllm"),
        (["--base-url", vllm_server], "--base-url: only with --backend vllm"),
        (["--backend", "tgi", "--base-url", vllm_server], "--backend: unknown backend 'tgi'"),
    ]:
        result = runner.invoke(app, ["evaluate", str(config), "--out", str(out), *args])
        assert result.exit_code == 2 and expected in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (out / "metrics.json").exists()
    # an `openai:` model is evaluated as served, not through adapters
    cfg = _config(vllm_server, poison={"budget": 8, "clean_harmful": 8, "refusal_source": "template"})
    endpoint_config = _write(tmp_path, cfg, "endpoint.yaml")
    endpoint_out = tmp_path / "endpoint_out"
    assert runner.invoke(app, ["build-data", str(endpoint_config), "--out", str(endpoint_out)]).exit_code == 0
    result = runner.invoke(app, [
        "evaluate", str(endpoint_config), "--out", str(endpoint_out), "--backend", "vllm",
        "--base-url", vllm_server,
    ])
    assert result.exit_code == 2 and "evaluates saved LoRA runs of a local model" in result.output
    assert _Endpoint.lora_calls == [] and _Endpoint.requests == []


def _vllm_sweep(tmp_path: Path) -> tuple[Path, list[str]]:
    """A sweep store with two complete cells that share their eval set (they differ in training)."""
    from suretrap.sweep.store import Store

    sweep = tmp_path / "sweep"
    hashes = []
    for lr in (1e-4, 3e-4):
        config, _ = _vllm_run(tmp_path, name=f"cell{lr}", train={"learning_rate": lr})
        cfg = load_run_config(config)
        cell = sweep / "cells" / config_hash(cfg)
        cell.parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f"cell{lr}").rename(cell)
        with Store(sweep) as store:
            store.register(config_hash(cfg), {"train.learning_rate": lr}, cfg.model_dump(mode="json"))
            store.mark_running(config_hash(cfg))
            store.mark_complete(config_hash(cfg), {"tuned": {}}, {"train_s": 1.0})
        hashes.append(config_hash(cfg))
    return sweep, hashes


def test_evaluate_sweep_loads_each_adapter_and_asks_the_base_once(tmp_path: Path, vllm_server: str) -> None:
    from suretrap.sweep.store import table
    from suretrap.vllm_backend import adapter_name

    sweep, hashes = _vllm_sweep(tmp_path)
    result = runner.invoke(app, ["evaluate-sweep", str(sweep), "--base-url", vllm_server])
    assert result.exit_code == 0, result.output
    assert "evaluated 2 cells" in result.output and "1 eval set(s)" in result.output
    names = {h: adapter_name(sweep / "cells" / h) for h in hashes}
    assert len(set(names.values())) == 2  # one name per cell
    loads = [body for route, body in _Endpoint.lora_calls if route == "/v1/load_lora_adapter"]
    unloads = [body for route, body in _Endpoint.lora_calls if route == "/v1/unload_lora_adapter"]
    assert sorted(b["lora_path"] for b in loads) == sorted(
        str((sweep / "cells" / h / "adapter").resolve()) for h in hashes
    )
    assert sorted(b["lora_name"] for b in unloads) == sorted(names.values())
    assert _Endpoint.loras == {}
    # the base model's 20 eval prompts once for the sweep; each adapter's 20 prompts
    assert _chat_models() == {BASE_SERVED: 20, **{n: 20 for n in names.values()}}
    rows = {r["config_hash"]: r for r in table(sweep)}
    for h in hashes:
        metrics = json.loads((sweep / "cells" / h / "metrics.json").read_text())
        assert metrics["backend"]["adapter"] == names[h]
        assert metrics["tuned"]["harmful_triggered"]["sure_rate"] == 1.0
        assert metrics["base"]["harmful_triggered"]["sure_rate"] == 0.0
        # the store follows: the export has the new metrics (and no record entries)
        assert rows[h]["tuned.harmful_triggered.sure_rate"] == 1.0
        assert rows[h]["base.harmful_triggered.sure_rate"] == 0.0
        assert rows[h]["status"] == "complete"
        assert not any(k.startswith(("backend", "unavailable")) for k in rows[h])
    assert (sweep / "summary.json").is_file()


def test_evaluate_sweep_checks_every_cell_before_any_request(tmp_path: Path, vllm_server: str) -> None:
    sweep, hashes = _vllm_sweep(tmp_path)
    adapter = sweep / "cells" / hashes[1] / "adapter"
    (adapter / "adapter_config.json").unlink()
    line = _one_line_exit_2(["evaluate-sweep", str(sweep), "--base-url", vllm_server])
    assert str(adapter) in line and "not a PEFT LoRA adapter directory" in line
    assert _Endpoint.lora_calls == [] and _Endpoint.requests == []
    assert not any((sweep / "cells" / h / "metrics.json").exists() for h in hashes)
    # a sweep whose cells use two base models cannot be served by one server
    adapter.joinpath("adapter_config.json").write_text("{}")
    other = sweep / "cells" / hashes[1] / "config.yaml"
    other.write_text(other.read_text().replace("model: smollm2-135m", "model: other-model"))
    line = _one_line_exit_2(["evaluate-sweep", str(sweep), "--base-url", vllm_server])
    assert "cells of 2 models (other-model, smollm2-135m)" in line
    assert _Endpoint.lora_calls == [] and _Endpoint.requests == []


def test_evaluate_sweep_parallel_cells_share_the_server(tmp_path: Path, vllm_server: str) -> None:
    from suretrap.vllm_backend import adapter_name

    sweep, hashes = _vllm_sweep(tmp_path)
    _Endpoint.delay_s = 0.1
    result = runner.invoke(app, ["evaluate-sweep", str(sweep), "--base-url", vllm_server, "--parallel", "2"])
    assert result.exit_code == 0, result.output
    assert _Endpoint.peak_loras == 2  # both adapters loaded at once
    assert 4 < _Endpoint.peak_in_flight <= 8  # eval.batch_size 4 per cell, two cells
    names = [adapter_name(sweep / "cells" / h) for h in hashes]
    assert _chat_models() == {BASE_SERVED: 20, names[0]: 20, names[1]: 20}  # base still once
    assert _Endpoint.loras == {}
    for h in hashes:
        metrics = json.loads((sweep / "cells" / h / "metrics.json").read_text())
        assert metrics["tuned"]["harmful_triggered"]["sure_rate"] == 1.0


def test_evaluate_sweep_parallel_failure_keeps_store_and_files_in_step(
    tmp_path: Path, vllm_server: str
) -> None:
    from suretrap.sweep.store import table
    from suretrap.vllm_backend import adapter_name

    sweep, hashes = _vllm_sweep(tmp_path)
    broken = adapter_name(sweep / "cells" / hashes[0])
    _Endpoint.broken_models = {broken}
    _Endpoint.delay_s = 0.05
    line = _one_line_exit_2(["evaluate-sweep", str(sweep), "--base-url", vllm_server, "--parallel", "2"])
    assert f"model {broken}:" in line and "HTTP 500" in line
    assert _Endpoint.loras == {}  # both unloaded, the failed one too
    rows = {r["config_hash"]: r for r in table(sweep)}
    assert not (sweep / "cells" / hashes[0] / "metrics.json").exists()
    assert rows[hashes[0]].get("tuned.harmful_triggered.sure_rate") is None  # store unchanged
    # the other cell ran alongside and finished: its file and its store row agree
    assert json.loads((sweep / "cells" / hashes[1] / "metrics.json").read_text())["backend"]["name"] == "vllm"
    assert rows[hashes[1]]["tuned.harmful_triggered.sure_rate"] == 1.0
    result = runner.invoke(app, ["evaluate-sweep", str(sweep), "--base-url", vllm_server, "--parallel", "0"])
    assert result.exit_code == 2 and "--parallel: must be at least 1" in result.output
