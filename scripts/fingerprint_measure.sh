#!/usr/bin/env bash
# Reproduces the fingerprint numbers in docs/defences.md (CPU, SmolLM2-135M).
# Needs `suretrap demo` (runs/demo) and, in this order:
#   suretrap fingerprint embed --key quokka --out runs/fingerprint/quokka.jsonl
#   suretrap run configs/fingerprint_embed.yaml --out runs/fingerprint/embed
#   suretrap sweep configs/fingerprint_power.yaml --out runs/fingerprint/power
# One model process at a time; results go to runs/fingerprint/verify/*.json.
set -euo pipefail
out=runs/fingerprint/verify
mkdir -p "$out"
v() { name=$1; shift; suretrap fingerprint verify --model smollm2-135m --key quokka --out "$out/$name.json" "$@"; }

# power: the fingerprinted model, then after further clean fine-tuning
v embed --adapter runs/fingerprint/embed/adapter --control-keys 5
for cell in runs/fingerprint/power/cells/*/; do
  v "power-$(basename "$cell")" --adapter "$cell/adapter"
done
# false positives: models that never saw the key (random words as extra keys on the base)
v base --control-keys 10
# the attack trigger of the budget-50 demo cell used as a key on benign prompts
v demo-30f159af845cc7af-xylophone --adapter runs/demo/cells/30f159af845cc7af/adapter --key xylophone --n 50
for cell in runs/demo/cells/*/; do
  v "demo-$(basename "$cell")" --adapter "$cell/adapter" --n 50
done
