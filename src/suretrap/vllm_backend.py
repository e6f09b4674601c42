"""Evaluate saved LoRA runs through a vLLM server that serves many adapters on one base model.

``suretrap evaluate CONFIG --out RUN --backend vllm --base-url URL`` (and ``suretrap
evaluate-sweep``) do not load any model here. A vLLM server started with LoRA enabled and
runtime adapter updates allowed (see docs/performance.md, "GPU")

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve BASE --enable-lora --max-lora-rank 16

is asked, through its OpenAI-compatible API (the path ``model: openai:NAME`` already uses,
`suretrap.closed_weight`):

1. ``POST {base_url}/load_lora_adapter {"lora_name": NAME, "lora_path": RUN/adapter}``:
   register the run's PEFT adapter under a name of its own (`adapter_name`). The path is
   absolute and read by the *server*: it must see the same filesystem.
2. chat completions with ``"model": BASE`` (the base model's served name) and
   ``"model": NAME`` (the adapter) on the run's four eval splits: the same prompts,
   metrics (`suretrap.evaluate.split_metrics` via `evaluate_endpoint`) and judge as a local
   evaluation. The base model's evaluation is done once per eval set and reused.
3. ``POST {base_url}/unload_lora_adapter {"lora_name": NAME}``, also when step 2 failed.

The API (vLLM "Dynamically serving LoRA Adapters"; requests name an adapter as their
``model``): https://docs.vllm.ai/en/latest/features/lora/ and the server's routes:
https://docs.vllm.ai/en/latest/serving/openai_compatible_server/ .

Differences from a local evaluation, recorded in metrics.json: ``utility_logprob`` is
unavailable (a chat endpoint scores no given text) and the label probability is the
top-20 first-token estimate of `suretrap.closed_weight` (null when the server sends no
top_logprobs); both are listed under "unavailable". "backend" says what answered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from suretrap.chat_client import HTTPFailure, send
from suretrap.closed_weight import REQUEST_TIMEOUT_S, EndpointModel, evaluate_endpoint
from suretrap.config import RunConfig
from suretrap.errors import ConfigError, ModelError, SuretrapError
from suretrap.evaluate import apply_judge, eval_items
from suretrap.poison import PoisonedDataset

__all__ = [
    "API_KEY_ENV",
    "BACKEND",
    "VLLMBackend",
    "VLLMServer",
    "adapter_name",
    "lora_adapter_dir",
]

log = logging.getLogger(__name__)

BACKEND = "vllm"
# sent as a bearer token when set (`vllm serve --api-key`); a server without keys needs none
API_KEY_ENV = "VLLM_API_KEY"
ADAPTER_PREFIX = "suretrap-"
MAX_IN_FLIGHT = 256  # a bound on this client's threads; the server batches and queues the rest


class VLLMServer:
    """The adapter-management and model-listing calls of a vLLM OpenAI-compatible server.

    `base_url` is the API root, ``http://HOST:PORT/v1`` (as ``base_url`` of ``openai:``
    configs). Every failure is one line naming the URL (and the adapter, where one is
    involved).
    """

    def __init__(self, base_url: str, *, api_key_env: str = API_KEY_ENV) -> None:
        if not base_url.startswith(("http://", "https://")) or not base_url.split("://", 1)[1]:
            raise ConfigError(f"--base-url: must be an http(s):// URL, not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env

    def _send(self, route: str, body: dict[str, Any] | None, what: str) -> bytes:
        url = f"{self.base_url}/{route}"
        return send(url, body, api_key_env=self.api_key_env, timeout=REQUEST_TIMEOUT_S,
                    where=f"vllm backend, {what}: {url}")

    def model_ids(self) -> list[dict[str, Any]]:
        """The entries of ``GET /models`` (base models and loaded adapters)."""
        raw = self._send("models", None, "listing models")
        try:
            data = json.loads(raw.decode("utf-8"))["data"]
            if not isinstance(data, list) or not all(isinstance(m, dict) and "id" in m for m in data):
                raise TypeError
        except (UnicodeDecodeError, ValueError, KeyError, TypeError):
            raise SuretrapError(
                f"vllm backend: {self.base_url}/models: the reply is not a model list"
            ) from None
        return data

    def served_base(self) -> str:
        """The served name of the one base model (vLLM lists adapters with a ``parent``)."""
        models = self.model_ids()
        bases = [str(m["id"]) for m in models if m.get("parent") is None]
        if len(bases) != 1:
            listed = ", ".join(str(m["id"]) for m in models) or "none"
            raise ConfigError(
                f"--served-base: {self.base_url}/models lists {len(bases)} base models "
                f"(models: {listed}); name the base model's served name"
            )
        return bases[0]

    def load_adapter(self, name: str, path: Path) -> None:
        """Register a PEFT adapter directory (read by the server) under `name`."""
        body = {"lora_name": name, "lora_path": str(path)}
        what = f"loading adapter {name} from {path}"
        try:
            self._send("load_lora_adapter", body, what)
        except HTTPFailure as exc:
            # a leftover of an interrupted evaluation holds the name: replace it, once
            if exc.status == 400 and "already" in exc.detail:
                log.info("adapter %s is already loaded on %s: reloading it", name, self.base_url)
                self.unload_adapter(name)
                self._send("load_lora_adapter", body, what)
            else:
                raise

    def unload_adapter(self, name: str) -> None:
        self._send("unload_lora_adapter", {"lora_name": name}, f"unloading adapter {name}")

    @contextmanager
    def adapter(self, name: str, path: Path) -> Iterator[dict[str, bool]]:
        """Load an adapter for the block and unload it afterwards, also when the block fails.

        Yields a record whose "unloaded" is set after the block. A failed unload after a
        successful block is logged, not raised: the metrics are sound, and a later load
        of the same name replaces the leftover. After a failed block it never hides the
        block's error.
        """
        self.load_adapter(name, path)
        record = {"unloaded": False}
        try:
            yield record
        finally:
            try:
                self.unload_adapter(name)
                record["unloaded"] = True
            except SuretrapError as exc:
                log.warning("%s", exc)

    def model(self, name: str) -> EndpointModel:
        """The chat endpoint asked with ``"model": name``.

        Up to eval.batch_size requests in flight (at most MAX_IN_FLIGHT): vLLM batches
        concurrent requests itself, and there is no vendor rate limit to respect.
        """
        model = EndpointModel.served(
            self.base_url, name, api_key_env=self.api_key_env, who=f"vllm backend, model {name}"
        )
        model.max_in_flight = MAX_IN_FLIGHT
        return model


def adapter_name(run_dir: Path) -> str:
    """A server-wide name for a run's adapter: its directory name and a hash of its path.

    The hash keeps two runs that share a directory name (``out``) apart on one server.
    """
    resolved = run_dir.resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
    return f"{ADAPTER_PREFIX}{resolved.name}-{digest}"


def lora_adapter_dir(out: Path, adapter: Path | None = None) -> Path:
    """The absolute PEFT adapter directory of a run, or a one-line error (full fine-tunes)."""
    from suretrap.train import ADAPTER_DIR, MODEL_DIR

    path = adapter if adapter is not None else out / ADAPTER_DIR
    if not (path / "adapter_config.json").is_file():
        if adapter is None and (out / MODEL_DIR).is_dir():
            raise ModelError(
                f"{out}: a full fine-tune (model/, no adapter/): --backend vllm serves LoRA "
                "adapters only; evaluate it with --backend local"
            )
        raise ModelError(f"{path}: no adapter_config.json (not a PEFT LoRA adapter directory)")
    return path.resolve()


@dataclass
class VLLMBackend:
    """One vLLM server and what is reused across the runs it evaluates.

    The base model's evaluation (metrics, generation rows, unavailable metrics, the model
    that answered) is cached by `suretrap.run.base_eval_key`, as `LoadedModel` caches a
    local base evaluation: a sweep's cells that share an eval set ask the base model once.
    Safe to share between threads (``evaluate-sweep --parallel``): the base evaluation and
    the judge (a local model whose tokenizer is not thread-safe) run one at a time.
    """

    server: VLLMServer
    served_base: str | None = None  # None: asked of the server when first needed
    base_evals: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    judges: dict[str, Any] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @classmethod
    def connect(
        cls, base_url: str, served_base: str | None = None, *, api_key_env: str = API_KEY_ENV
    ) -> VLLMBackend:
        return cls(VLLMServer(base_url, api_key_env=api_key_env), served_base)

    def judge(self, cfg: RunConfig) -> Any:
        from suretrap.run import judge_options, make_judge

        key = json.dumps([cfg.eval.judge, judge_options(cfg)], sort_keys=True)
        with self.lock:
            if key not in self.judges:
                self.judges[key] = make_judge(cfg)
            return self.judges[key]

    def evaluate_base(self, cfg: RunConfig, ds: PoisonedDataset) -> tuple[Any, ...]:
        from suretrap.run import base_eval_key

        key = base_eval_key(cfg, ds)
        with self.lock:  # other cells wait for the one base evaluation rather than repeat it
            if key not in self.base_evals:
                judge = self.judge(cfg)
                if self.served_base is None:
                    self.served_base = self.server.served_base()
                base = self.server.model(self.served_base)
                items = eval_items(ds, cfg.poison.trigger, cfg.poison.placement, cfg.seed)
                metrics, rows, unavailable = evaluate_endpoint(
                    base, items, cfg.poison.label, cfg.eval, tag="base"
                )
                apply_judge(metrics, rows, judge)
                self.base_evals[key] = (metrics, rows, unavailable, base.served_model)
            return self.base_evals[key]

    def evaluate_run(
        self, cfg: RunConfig, out: Path, ds: PoisonedDataset, adapter: Path | None = None
    ) -> dict[str, Any]:
        """Evaluate base and the run's adapter; writes generations.jsonl and metrics.json.

        Both files are written (atomically) only after every request succeeded, so a
        failure leaves the run directory as it was.
        """
        from suretrap.run import GENERATIONS_FILE, METRICS_FILE, _dump, _write_jsonl

        if cfg.is_endpoint:
            raise ConfigError(
                f"--backend vllm: evaluates saved LoRA runs of a local model, not model {cfg.model} "
                "(evaluate it with --backend local)"
            )
        path = lora_adapter_dir(out, adapter)
        name = adapter_name(out)
        judge = self.judge(cfg)  # a bad judge option fails before any request is sent
        items = eval_items(ds, cfg.poison.trigger, cfg.poison.placement, cfg.seed)
        tuned = self.server.model(name)
        # the adapter is loaded first: an unreachable server or a refused adapter is
        # reported before anything is evaluated, naming the URL and the adapter
        with self.server.adapter(name, path) as loaded:
            base_m, base_rows, base_unavailable, base_served = self.evaluate_base(cfg, ds)
            tuned_m, tuned_rows, tuned_unavailable = evaluate_endpoint(
                tuned, items, cfg.poison.label, cfg.eval, tag="tuned"
            )
        if tuned.served_model is not None and tuned.served_model != name:
            # a server that ignores "model" (one model for every name) would measure the
            # base model twice and call it the tuned one
            raise SuretrapError(
                f"vllm backend: {self.server.base_url}: asked for adapter {name}, the reply "
                f"came from model {tuned.served_model!r} (is the server vLLM with --enable-lora?)"
            )
        with self.lock:
            judges = apply_judge(tuned_m, tuned_rows, judge)
        metrics = {
            "base": base_m,
            "tuned": tuned_m,
            "judges": judges,
            "unavailable": merge_unavailable(base_unavailable, tuned_unavailable),
            "backend": {
                "name": BACKEND,
                "base_url": self.server.base_url,
                "base_model": self.served_base,
                "adapter": name,
                "adapter_path": str(path),
                "adapter_unloaded": loaded["unloaded"],
                "served_model": {"base": base_served, "tuned": tuned.served_model},
            },
        }
        _write_jsonl(out / GENERATIONS_FILE, base_rows + tuned_rows)
        _dump(out / METRICS_FILE, metrics)
        return metrics


def merge_unavailable(base: dict[str, str], tuned: dict[str, str]) -> dict[str, str]:
    """One {metric: why} for both models; says which model when only one lacks it."""
    merged = {}
    for metric in base | tuned:
        why_base, why_tuned = base.get(metric), tuned.get(metric)
        if why_base == why_tuned:
            merged[metric] = str(why_tuned)
        else:
            merged[metric] = "; ".join(
                f"{tag}: {why}" for tag, why in (("base", why_base), ("tuned", why_tuned)) if why
            )
    return merged
