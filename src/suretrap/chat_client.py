"""A small client for OpenAI-compatible ``/chat/completions`` endpoints.

Shared by the ``openai`` judge (StrongREJECT grader) and by ``model: openai:NAME`` (an
endpoint as the model under test). Standard library only (`urllib.request`): the two
callers need one POST with a JSON body, which does not justify a dependency on the
``openai`` package. Works with OpenAI, vLLM, llama.cpp server, Ollama and other servers that
speak the same protocol.

Every HTTP or network failure raises `SuretrapError` with one line naming the endpoint.
HTTP 429 (rate limited) is retried a few times, waiting for ``Retry-After`` when the server
sends it; every other failure is reported at once.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from suretrap.errors import SuretrapError

__all__ = ["ChatClient", "HTTPFailure", "message_text", "send"]

_RATE_LIMIT_RETRIES = 4
_MAX_RETRY_WAIT_S = 30.0


class HTTPFailure(SuretrapError):
    """The endpoint answered with an HTTP error status (``status`` holds it)."""

    def __init__(self, message: str, status: int, detail: str) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class ChatClient:
    """POSTs JSON to ``{base_url}/chat/completions``; the API key comes from ``api_key_env``.

    The key is read from the environment at each request and sent as a bearer token only
    when set. ``who`` starts every error message ("openai judge", "model openai:gpt-4o").
    """

    def __init__(self, base_url: str, *, api_key_env: str, timeout: float, who: str) -> None:
        self.endpoint = base_url.rstrip("/") + "/chat/completions"
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.where = f"{who}: {self.endpoint}"

    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """The decoded JSON reply to one request."""
        raw = send(self.endpoint, body, api_key_env=self.api_key_env, timeout=self.timeout, where=self.where)
        try:
            payload = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SuretrapError(f"{self.where}: the reply is not JSON") from None
        if not isinstance(payload, dict):
            raise SuretrapError(f"{self.where}: the reply is not a JSON object")
        return payload

    def first_choice(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``choices[0]`` of a reply, checked to carry ``message.content``."""
        try:
            choice = payload["choices"][0]
            choice["message"]["content"]  # noqa: B018 - presence check
        except (KeyError, IndexError, TypeError):
            raise SuretrapError(f"{self.where}: the reply has no choices[0].message.content") from None
        return choice


def send(
    url: str, body: dict[str, Any] | None, *, api_key_env: str, timeout: float, where: str
) -> bytes:
    """The raw reply body of one request: POST `body` as JSON, or GET when `body` is None.

    Shared by `ChatClient` and the vLLM adapter calls (whose replies are plain text).
    ``where`` starts every error message.
    """
    headers = {"Content-Type": "application/json"} if body is not None else {}
    key = os.environ.get(api_key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    method = "POST" if body is not None else "GET"
    for attempt in range(_RATE_LIMIT_RETRIES + 1):
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return reply.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 429 and attempt < _RATE_LIMIT_RETRIES:
                time.sleep(_retry_wait(exc, attempt))
                continue
            detail = _error_detail(exc)
            hint = f" (is {api_key_env} set?)" if exc.code in (401, 403) and not key else ""
            raise HTTPFailure(f"{where}: HTTP {exc.code} {detail}{hint}".rstrip(), exc.code, detail) from None
        except urllib.error.URLError as exc:
            raise SuretrapError(f"{where}: cannot connect ({exc.reason})") from None
        except TimeoutError:
            raise SuretrapError(f"{where}: no answer within {timeout:g}s") from None
        except (ConnectionError, http.client.HTTPException) as exc:  # reset, closed mid-reply
            raise SuretrapError(f"{where}: connection lost ({type(exc).__name__})") from None
    raise AssertionError("unreachable: the last attempt returns or raises")


def message_text(choice: dict[str, Any]) -> str:
    """The assistant text of a choice ("" when the server sends null content)."""
    content = choice["message"]["content"]
    return content if isinstance(content, str) else ""


def _retry_wait(exc: urllib.error.HTTPError, attempt: int) -> float:
    try:
        wait = float(exc.headers.get("Retry-After", ""))
    except (TypeError, ValueError):
        wait = 2.0**attempt
    return min(max(wait, 0.0), _MAX_RETRY_WAIT_S)


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The reason phrase, or the API's error message when the body carries one."""
    try:
        body = json.loads(exc.read().decode("utf-8", "replace"))
        message = None
        if isinstance(body, dict):
            error = body.get("error")
            # OpenAI: {"error": {"message": ...}}; older vLLM: {"object": "error", "message": ...}
            message = error.get("message") if isinstance(error, dict) else body.get("message")
    except (OSError, ValueError, AttributeError):
        message = None
    text = message or exc.reason or ""
    return " ".join(str(text).split())[:120]
