#!/bin/bash
# The GPU checks of issue #6, as one short script for a lent device machine (the `device`
# tool runs it in the repo root with .devkit carried; see scripts/device_kit.sh):
#   run(command="bash scripts/device_check.sh", carry=[".devkit"], timeout_s=540)
# Writes $OUT/log, $OUT/tiny_run_*.{yaml,json} (one whole run on a tiny random model) and
# $OUT/bench-<shape>.json (random weights of real shapes: no download).
# DEVICE and SHAPES override what runs (DEVICE=cpu SHAPES=tiny checks the script itself).
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
DEVICE=${DEVICE:-cuda}
SHAPES=${SHAPES:-smollm2-135m llama-3.2-1b}
PY=${PYTHON:-python3}
exec > >(tee -a "$OUT/log") 2>&1
if [ -d .devkit/wheels ] && [ "${DEVKIT_INSTALL:-1}" = 1 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/suretrap-site .devkit/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/suretrap-site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi -L
"$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__, "peft", peft.__version__)'
status=0
# one whole run (build data, LoRA training, generation, metrics) on a tiny random model on
# the device: the train and evaluate code paths, not their speed
echo "== run on $DEVICE, tiny random Llama ($(date -u +%T))"
"$PY" - "$OUT" "$DEVICE" <<'PY' || status=1
import json, sys
from pathlib import Path
import torch, yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
out, device = Path(sys.argv[1]), sys.argv[2]
tok = AutoTokenizer.from_pretrained(".devkit/tokenizer")
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
model_dir = Path("/tmp/suretrap-tiny")
LlamaForCausalLM(cfg).save_pretrained(model_dir, safe_serialization=True)
tok.save_pretrained(model_dir)
run = {"name": "device-check", "model": str(model_dir), "seed": 0, "data": {"total_size": 40},
       "poison": {"budget": 8, "clean_harmful": 8, "refusal_source": "template"},
       "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "device": device},
       "eval": {"n_harmful": 6, "n_benign": 4, "max_new_tokens": 6, "judge": "keyword"}}
(out / "tiny_run.yaml").write_text(yaml.safe_dump(run))
PY
"$PY" -m suretrap.cli run "$OUT/tiny_run.yaml" --out /tmp/suretrap-tiny-run --force || status=1
for f in metrics timings env; do  # at most 8 files come back from $OUT
  [ -f "/tmp/suretrap-tiny-run/$f.json" ] && cp "/tmp/suretrap-tiny-run/$f.json" "$OUT/tiny_run_$f.json"
done
for shape in $SHAPES; do
  echo "== bench $DEVICE $shape ($(date -u +%T))"
  "$PY" -m suretrap.cli bench --device "$DEVICE" --random-init "$shape" --tokenizer .devkit/tokenizer \
    --out "$OUT/bench-$shape.json" || status=1
done
exit $status
