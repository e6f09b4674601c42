#!/bin/bash
# Prepare .devkit/ (git-ignored) for a GPU machine that receives only the working tree:
# the SmolLM2 tokenizer (no weights) and Python 3.12 wheels of the packages suretrap needs
# that the device image lacks or holds in other versions (pinned to this venv's versions).
# Then run the checks there with `scripts/device_check.sh`, carrying .devkit (about 19 MB).
# Usage (here, in the repo root): scripts/device_kit.sh
set -euo pipefail
py=${PYTHON:-.venv/bin/python}
kit=.devkit
rm -rf "$kit" && mkdir -p "$kit/wheels" "$kit/tokenizer"
# the embedded model's tokenizer and config, from the converted cache (converts once if needed)
src=$("$py" -c 'from suretrap.models import resolve_model, weights_dir; print(weights_dir(resolve_model("smollm2-135m")))')
for f in config.json tokenizer.json tokenizer_config.json chat_template.jinja generation_config.json special_tokens_map.json; do
  [ -f "$src/$f" ] && cp "$src/$f" "$kit/tokenizer/"
done
pins=$("$py" - <<'PY'
import importlib.metadata as m
names = ["pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions",
         "transformers", "peft", "regex", "typer"]
print(" ".join(f"{n}=={m.version(n)}" for n in names))
PY
)
# shellcheck disable=SC2086
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$kit/wheels" $pins 2>&1 | grep -v "^WARNING: Location" || true
ls "$kit/wheels"
du -sh "$kit"
