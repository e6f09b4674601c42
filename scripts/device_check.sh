#!/bin/bash
# The GPU checks of issue #6, as one short script for a lent device machine (the `device`
# tool runs it in the repo root with .devkit carried; see scripts/device_kit.sh):
#   run(command="bash scripts/device_check.sh", carry=[".devkit"], timeout_s=540)
# Writes $OUT/bench-<shape>.json and $OUT/log. Random weights of real shapes: no download.
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
for shape in $SHAPES; do
  echo "== bench $DEVICE $shape ($(date -u +%T))"
  "$PY" -m suretrap.cli bench --device "$DEVICE" --random-init "$shape" --tokenizer .devkit/tokenizer \
    --out "$OUT/bench-$shape.json" || status=1
done
exit $status
