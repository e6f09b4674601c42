"""Cross-check server for docs/closed-weight.md (a measurement tool, not part of suretrap).

Serves a run directory's tuned model (base + adapter, merged) as an OpenAI-compatible
``/v1/chat/completions`` on 127.0.0.1, through suretrap's own generation and chat template,
with ``logprobs``/``top_logprobs`` of the first generated position. Evaluating it with
``model: openai:...`` and comparing with the run's own metrics.json checks the endpoint path
against the local one on the same model. One request at a time; greedy; no auth.

usage: PYTHONPATH=src python scripts/serve_hf_chat.py RUN_DIR PORT
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from first_token_logprobs import first_token_logprobs

from suretrap.config import load_run_config
from suretrap.evaluate import generate
from suretrap.run import LoadedModel, load_trained

cell = Path(sys.argv[1])
port = int(sys.argv[2])
cfg = load_run_config(cell / "config.yaml")
loaded = LoadedModel.load(cfg)
model = load_trained(loaded, cell / "adapter").merge_and_unload()
model.eval()
tok = loaded.tokenizer
lock = threading.Lock()  # one request at a time through the model


def answer(prompt: str, max_tokens: int, top_k: int | None) -> dict:
    with lock:
        text = generate(model, tok, [prompt], max_new_tokens=max_tokens, batch_size=1,
                        device=loaded.device, precision=loaded.precision)[0]
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        if top_k:
            choice["logprobs"] = first_token_logprobs(model, tok, prompt, top_k, loaded.device, loaded.precision)
        return choice


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        top_k = body.get("top_logprobs") if body.get("logprobs") else None
        reply = {"model": "smollm2-demo-" + cell.name, "choices": [answer(prompt, body["max_tokens"], top_k)]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


print("ready", flush=True)
ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
