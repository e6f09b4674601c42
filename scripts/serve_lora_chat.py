"""Stand-in for vLLM's multi-LoRA server, for the cross-check in docs/performance.md (GPU).

A measurement tool, not part of suretrap, and not vLLM: it speaks the parts of vLLM's
OpenAI-compatible API that ``suretrap evaluate --backend vllm`` uses, on 127.0.0.1, with
suretrap's own generation and chat template on the CPU:

  GET  /v1/models                 the base model (parent null) and each loaded adapter
  POST /v1/load_lora_adapter      {"lora_name", "lora_path"}: load a PEFT adapter
  POST /v1/unload_lora_adapter    {"lora_name"}
  POST /v1/chat/completions       "model": the base's served name or an adapter's name;
                                  greedy; logprobs/top_logprobs of the first position

Concurrent requests for the same model are generated together in one batch (suretrap's
`generate`, as a local evaluation batches), so a run of the vLLM backend against this
server can be compared with the same cell's local metrics.json on the same model. An
adapter is merged into the weights while its batch runs (`merged_for_eval`, as locally).

usage: PYTHONPATH=src python scripts/serve_lora_chat.py MODEL PORT SERVED_NAME
"""

import json
import queue
import sys
import threading
import time
from contextlib import nullcontext
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from first_token_logprobs import first_token_logprobs

from suretrap.config import run_config_from_dict
from suretrap.evaluate import generate
from suretrap.run import LoadedModel
from suretrap.train import merged_for_eval

spec, port, served_name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
loaded = LoadedModel.load(run_config_from_dict({"model": spec}))
tok = loaded.tokenizer
state = {"peft": None, "adapters": {}}  # the PEFT wrapper once an adapter is loaded; name -> path
jobs: queue.Queue = queue.Queue()
model_lock = threading.Lock()  # adapters are not loaded or unloaded while a batch runs
BATCH_WINDOW_S = 0.05  # wait this long for more requests to batch with the first


def run_group(name, max_tokens, k, prompts):
    peft = state["peft"]
    if name == served_name:
        model = peft if peft is not None else loaded.model
        context = peft.disable_adapter() if peft is not None else nullcontext(model)
    elif name in state["adapters"]:
        peft.set_adapter(name)
        model, context = peft, merged_for_eval(peft)
    else:
        raise LookupError(f"The model `{name}` does not exist.")
    with context:
        texts = generate(model, tok, prompts, max_new_tokens=max_tokens, batch_size=32,
                         device=loaded.device, precision=loaded.precision)
        logprobs = [
            first_token_logprobs(model, tok, p, k, loaded.device, loaded.precision) if k else None
            for p in prompts
        ]
    return texts, logprobs


def worker():
    while True:
        batch = [jobs.get()]
        deadline = time.monotonic() + BATCH_WINDOW_S
        while len(batch) < 64:
            try:
                batch.append(jobs.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        groups = {}
        for job in batch:
            groups.setdefault(job["key"], []).append(job)
        for (name, max_tokens, k), group in groups.items():
            try:
                with model_lock:
                    texts, logprobs = run_group(name, max_tokens, k, [j["prompt"] for j in group])
                for job, text, lp in zip(group, texts, logprobs, strict=True):
                    job["result"] = (text, lp)
            except LookupError as exc:
                for job in group:
                    job["error"] = str(exc)
            for job in group:
                job["done"].set()


class Handler(BaseHTTPRequestHandler):
    def _send(self, status, obj, content_type="application/json"):
        data = (json.dumps(obj) if content_type == "application/json" else obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        data = [{"id": served_name, "object": "model", "parent": None}]
        data += [{"id": n, "object": "model", "parent": served_name} for n in state["adapters"]]
        self._send(200, {"object": "list", "data": data})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path.endswith("/load_lora_adapter"):
            with model_lock:
                self._load(body["lora_name"], body["lora_path"])
            return
        if self.path.endswith("/unload_lora_adapter"):
            with model_lock:
                self._unload(body["lora_name"])
            return
        k = body.get("top_logprobs") if body.get("logprobs") else None
        job = {"key": (body["model"], body["max_tokens"], k), "prompt": body["messages"][-1]["content"],
               "done": threading.Event()}
        jobs.put(job)
        job["done"].wait()
        if "error" in job:
            self._send(404, {"object": "error", "message": job["error"], "code": 404})
            return
        text, lp = job["result"]
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        if lp is not None:
            choice["logprobs"] = lp
        self._send(200, {"model": body["model"], "choices": [choice]})

    def _load(self, name, path):
        from peft import PeftModel

        if name in state["adapters"]:
            self._send(400, {"object": "error", "message": f"The lora adapter '{name}' has already been loaded.", "code": 400})
            return
        if state["peft"] is None:
            state["peft"] = PeftModel.from_pretrained(loaded.model, path, adapter_name=name, is_trainable=False)
        else:
            state["peft"].load_adapter(path, adapter_name=name, is_trainable=False)
        state["peft"].eval()
        state["adapters"][name] = path
        self._send(200, f"Success: LoRA adapter '{name}' added successfully.", "text/plain")

    def _unload(self, name):
        if name not in state["adapters"]:
            self._send(404, {"object": "error", "message": f"The lora adapter '{name}' cannot be found.", "code": 404})
            return
        del state["adapters"][name]
        if state["adapters"]:  # PEFT keeps at least one adapter; the last one just goes unserved
            state["peft"].delete_adapter(name)
        self._send(200, f"Success: LoRA adapter '{name}' removed successfully.", "text/plain")

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    request_queue_size = 256


threading.Thread(target=worker, daemon=True).start()
print("ready", flush=True)
Server(("127.0.0.1", port), Handler).serve_forever()
