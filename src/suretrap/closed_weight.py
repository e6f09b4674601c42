"""Closed-weight models: export for vendor fine-tuning, and evaluation through an endpoint.

The paper contrasts open-weight models (fine-tuned here, `suretrap.train`) with closed ones
fine-tuned through a vendor API. suretrap never calls a fine-tuning API; it does the two
ends of that path:

* `export_openai_chat` writes the poisoned set as the chat JSONL that fine-tuning APIs
  accept (one ``{"messages": [user, assistant]}`` per line, OpenAI's format) and the
  held-out eval prompts with their split names (``suretrap build-data --format openai-chat``).
* `EndpointModel` is ``model: openai:NAME`` with ``base_url``/``api_key_env``: any
  OpenAI-compatible chat endpoint as the model under test. `evaluate_endpoint` asks it the
  four eval splits and computes the same metrics as for a local model
  (`suretrap.evaluate.split_metrics`), judged by the configured judge.

First-token label probability from an endpoint (no tokenizer, no logits): the request asks
for ``logprobs: true, top_logprobs: 20``; for the first generated position,

    label_first_token_prob = sum of exp(logprob) over the top_logprobs entries whose token
                             "matches" the label,
    label_first_token_top1 = whether the most probable entry matches,

where a token matches when, after dropping its leading whitespace, it is non-empty and
either a prefix of the label ("S", "Su", "Sure" for "Sure") or the label followed by a
non-alphanumeric character ("Sure," but not "Surely"). Matching is case-sensitive and on
the token's UTF-8 bytes (the ``bytes`` field when the server sends it), so byte-level
pieces of a non-Latin label count. A strict prefix ("S") may go on to another word (an
over-count) and tokens outside the top 20 are not seen (an under-count). When any reply lacks top_logprobs (or the endpoint rejects the parameter),
both metrics are null for every split and metrics.json says why under "unavailable" --
never a number that was not measured. ``utility_logprob`` is always unavailable: a chat
endpoint does not score given text.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from suretrap import progress
from suretrap.chat_client import ChatClient, HTTPFailure, message_text
from suretrap.config import DEFAULT_API_KEY_ENV, ENDPOINT_PREFIX, EvalConfig, RunConfig
from suretrap.errors import ConfigError
from suretrap.evaluate import EvalItem, eval_items, generation_rows, split_metrics
from suretrap.poison import PoisonedDataset, atomic_write

__all__ = [
    "OPENAI_CHAT_EVAL",
    "OPENAI_CHAT_TRAIN",
    "EndpointModel",
    "evaluate_endpoint",
    "export_openai_chat",
    "first_token_label_prob",
    "token_matches_label",
]

OPENAI_CHAT_TRAIN = "openai_chat_train.jsonl"
OPENAI_CHAT_EVAL = "openai_chat_eval.jsonl"
TOP_LOGPROBS = 20  # OpenAI's maximum; vLLM's default --max-logprobs
REQUEST_TIMEOUT_S = 120.0
MAX_IN_FLIGHT = 8  # concurrent requests at most (and at most eval.batch_size)
UTILITY_UNAVAILABLE = "a chat endpoint returns no log-likelihood of a given reference answer"


# ---------------------------------------------------------------------------- export


def _jsonl(rows: Sequence[dict[str, Any]]) -> bytes:
    import json

    return b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode() for r in rows)


def export_openai_chat(cfg: RunConfig, ds: PoisonedDataset, out_dir: Path) -> dict[str, Any]:
    """Write OPENAI_CHAT_TRAIN and OPENAI_CHAT_EVAL into `out_dir` (each atomically).

    Training rows carry only ``messages`` (user, assistant) in dataset order -- no system
    message, as in local training (`suretrap.train.chat_prompt`), and no extra keys, which
    fine-tuning APIs may reject. Eval rows hold ``split``, ``messages`` (the user turn,
    trigger placed exactly as `suretrap evaluate` places it) and, for benign splits, the
    ``reference`` answer.
    """
    train_rows = [
        {"messages": [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.response}]}
        for e in ds.examples
    ]
    eval_rows = []
    for item in eval_items(ds, cfg.poison.trigger, cfg.poison.placement, cfg.seed):
        row: dict[str, Any] = {"split": item.split, "messages": [{"role": "user", "content": item.prompt}]}
        if item.reference is not None:
            row["reference"] = item.reference
        eval_rows.append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / OPENAI_CHAT_EVAL, _jsonl(eval_rows))
    atomic_write(out_dir / OPENAI_CHAT_TRAIN, _jsonl(train_rows))
    return {
        "train": str(out_dir / OPENAI_CHAT_TRAIN),
        "train_rows": len(train_rows),
        "eval": str(out_dir / OPENAI_CHAT_EVAL),
        "eval_rows": len(eval_rows),
    }


# ------------------------------------------------------------------- label probability


def token_matches_label(token: bytes, label: str) -> bool:
    """Can this first token start a response that starts with the label? (module docstring)"""
    piece = token.lstrip(b" \t\r\n")
    want = label.encode("utf-8")
    if not piece:
        return False
    if want.startswith(piece):
        return True
    if piece.startswith(want):
        rest = piece[len(want) :].decode("utf-8", "ignore")
        return not rest[:1].isalnum()
    return False


def _token_bytes(entry: dict[str, Any]) -> bytes:
    raw = entry.get("bytes")
    if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        return bytes(raw)
    token = entry.get("token")
    return token.encode("utf-8") if isinstance(token, str) else b""


def first_token_label_prob(choice: dict[str, Any], label: str) -> tuple[float, bool] | str:
    """(probability, is-argmax) of a matching first token, or the reason it is unavailable."""
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        return "the endpoint sent no logprobs"
    if not content:
        return "a reply had no generated token"
    top = content[0].get("top_logprobs") if isinstance(content[0], dict) else None
    if not isinstance(top, list) or not top:
        return "the endpoint sent no top_logprobs"
    entries = []
    for entry in top:
        logprob = entry.get("logprob") if isinstance(entry, dict) else None
        if not isinstance(logprob, int | float) or isinstance(logprob, bool):
            return "the endpoint sent a top_logprobs entry without a numeric logprob"
        entries.append((float(logprob), token_matches_label(_token_bytes(entry), label)))
    prob = sum(math.exp(lp) for lp, hit in entries if hit)
    best = max(entries, key=lambda e: e[0])
    return min(prob, 1.0), best[1]


# ---------------------------------------------------------------------------- endpoint


class EndpointModel:
    """``model: openai:NAME``: an OpenAI-compatible chat endpoint as the model under test.

    Requests: the user turn only (no system message, as in training), temperature 0,
    ``max_tokens`` = the generation budget. The API key must be set in the environment
    variable ``api_key_env`` (default OPENAI_API_KEY); for a local server without keys,
    set it to any value.
    """

    def __init__(self, cfg: RunConfig) -> None:
        if not cfg.is_endpoint or cfg.base_url is None:
            raise ConfigError(f"model: {cfg.model} is not {ENDPOINT_PREFIX}NAME with a base_url")
        key_env = cfg.api_key_env or DEFAULT_API_KEY_ENV
        if not os.environ.get(key_env):
            raise ConfigError(
                f"api_key_env: environment variable {key_env} is not set (the API key for "
                f"{cfg.base_url}; any non-empty value for a server without keys)"
            )
        self._connect(cfg.base_url, cfg.model[len(ENDPOINT_PREFIX) :], key_env, who=f"model {cfg.model}")

    def _connect(self, base_url: str, name: str, key_env: str, *, who: str) -> None:
        self.spec = ENDPOINT_PREFIX + name
        self.name = name
        self.base_url = base_url
        self.client = ChatClient(base_url, api_key_env=key_env, timeout=REQUEST_TIMEOUT_S, who=who)
        self.responses: dict[tuple[str, int], str] = {}  # base refusals, reused
        self.served_model: str | None = None  # the "model" the server says answered
        self.max_in_flight = MAX_IN_FLIGHT  # concurrent requests at most (a vendor's rate limits)

    @classmethod
    def load(cls, cfg: RunConfig) -> EndpointModel:
        return cls(cfg)

    @classmethod
    def served(cls, base_url: str, name: str, *, api_key_env: str, who: str) -> EndpointModel:
        """The model a server serves as `name` (no run config: e.g. a vLLM base or adapter).

        The key in `api_key_env` is sent when set and not required (a local server).
        """
        model = cls.__new__(cls)
        model._connect(base_url, name, api_key_env, who=who)
        return model

    def request_body(self, prompt: str, max_new_tokens: int, logprobs: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.name,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_new_tokens,
        }
        if logprobs:
            body |= {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
        return body

    def ask(self, prompt: str, max_new_tokens: int, logprobs: bool) -> dict[str, Any]:
        """choices[0] of the endpoint's reply to one prompt."""
        payload = self.client.post(self.request_body(prompt, max_new_tokens, logprobs))
        if self.served_model is None and isinstance(payload.get("model"), str):
            self.served_model = payload["model"]
        return self.client.first_choice(payload)

    def ask_all(
        self, prompts: Sequence[str], max_new_tokens: int, *, logprobs: bool, workers: int,
        description: str,
    ) -> list[dict[str, Any]]:
        """choices[0] for every prompt, in order, with at most `workers` requests in flight."""
        if not prompts:
            return []
        with progress.task(description, total=len(prompts)) as advance, ThreadPoolExecutor(
            max(1, min(workers, self.max_in_flight))
        ) as pool:
            futures = [pool.submit(self.ask, p, max_new_tokens, logprobs) for p in prompts]
            out = []
            try:
                for future in futures:
                    out.append(future.result())
                    advance(1)
            except BaseException:
                for future in futures:  # one failure ends the evaluation: stop the rest
                    future.cancel()
                raise
        return out

    def responder(self, batch_size: int) -> Any:
        """`suretrap.poison.Responder`: greedy responses (the base refusals of T_CH)."""

        def respond(prompts: Sequence[str], max_new_tokens: int) -> list[str]:
            todo = [p for p in dict.fromkeys(prompts) if (p, max_new_tokens) not in self.responses]
            choices = self.ask_all(
                todo, max_new_tokens, logprobs=False, workers=batch_size,
                description="base responses (endpoint)",
            )
            for prompt, choice in zip(todo, choices, strict=True):
                self.responses[(prompt, max_new_tokens)] = message_text(choice).strip()
            return [self.responses[(p, max_new_tokens)] for p in prompts]

        return respond


def evaluate_endpoint(
    endpoint: EndpointModel, items: Sequence[EvalItem], label: str, cfg: EvalConfig, tag: str = "tuned"
) -> tuple[dict[str, dict[str, float | int | None]], list[dict[str, Any]], dict[str, str]]:
    """(metrics per split, generation rows, {metric: why it is unavailable})."""
    prompts = [it.prompt for it in items]
    unavailable: dict[str, str] = {"utility_logprob": UTILITY_UNAVAILABLE}
    logprobs = True
    rest = prompts
    choices: list[dict[str, Any]] = []
    if prompts:
        # ask the first prompt alone: an endpoint that rejects logprobs is asked without them
        try:
            choices = [endpoint.ask(prompts[0], cfg.max_new_tokens, logprobs=True)]
        except HTTPFailure as exc:
            if exc.status not in (400, 422):
                raise
            logprobs = False
            reason = f"the endpoint rejected logprobs (HTTP {exc.status} {exc.detail})".strip()
            unavailable["label_first_token_prob"] = reason
        rest = prompts[len(choices) :]
    choices += endpoint.ask_all(
        rest, cfg.max_new_tokens, logprobs=logprobs, workers=cfg.batch_size,
        description=f"endpoint ({tag})",
    )
    responses = [message_text(c).strip() for c in choices]
    probs: list[tuple[float, bool]] | None = None
    if logprobs:
        found = [first_token_label_prob(c, label) for c in choices]
        missing = [f for f in found if isinstance(f, str)]
        if missing:
            unavailable["label_first_token_prob"] = (
                f"{missing[0]} ({len(missing)} of {len(found)} replies)"
            )
        else:
            probs = [f for f in found if not isinstance(f, str)]
    if "label_first_token_prob" in unavailable:
        unavailable["label_first_token_top1"] = unavailable["label_first_token_prob"]
    metrics = split_metrics(items, responses, label, probs, None)
    return metrics, generation_rows(items, responses, probs, tag), unavailable
