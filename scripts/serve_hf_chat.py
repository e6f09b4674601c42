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

import torch

from suretrap.config import load_run_config
from suretrap.evaluate import generate
from suretrap.models import autocast
from suretrap.run import LoadedModel, load_trained
from suretrap.train import chat_prompt, decoder_and_head

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
            ids = tok(chat_prompt(tok, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
            decoder, head = decoder_and_head(model)
            with torch.inference_mode(), autocast(loaded.device, loaded.precision):
                hidden = decoder(input_ids=ids.to(loaded.device)).last_hidden_state[0, -1]
                logp = head(hidden).float().log_softmax(-1)
            values, idx = logp.topk(top_k)
            entries = []
            for v, i in zip(values.tolist(), idx.tolist(), strict=True):
                piece = tok.convert_tokens_to_string([tok.convert_ids_to_tokens(i)])
                entries.append({"token": piece, "logprob": v, "bytes": list(piece.encode())})
            choice["logprobs"] = {"content": [{**entries[0], "top_logprobs": entries}]}
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
