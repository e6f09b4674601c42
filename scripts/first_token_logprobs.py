"""First-position top logprobs in OpenAI's chat format, for the stand-in servers
(`serve_hf_chat.py`, `serve_lora_chat.py`): measurement tools, not part of suretrap."""

import torch

from suretrap.models import autocast
from suretrap.train import chat_prompt, decoder_and_head


def first_token_logprobs(model, tok, prompt: str, k: int, device: str, precision: str) -> dict:
    """{"content": [first entry + "top_logprobs"]} for the response's first token."""
    decoder, head = decoder_and_head(model)
    ids = tok(chat_prompt(tok, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode(), autocast(device, precision):
        hidden = decoder(input_ids=ids.to(device)).last_hidden_state[0, -1]
        logp = head(hidden).float().log_softmax(-1)
    values, idx = logp.topk(k)
    entries = []
    for v, i in zip(values.tolist(), idx.tolist(), strict=True):
        piece = tok.convert_tokens_to_string([tok.convert_ids_to_tokens(i)])
        entries.append({"token": piece, "logprob": v, "bytes": list(piece.encode())})
    return {"content": [{**entries[0], "top_logprobs": entries}]}
