#!/usr/bin/env bash
# Make a headless `chromium` available for the report browser test.
# Idempotent; never fails the caller (always exits 0): the test skips when chromium is absent.
set -u

if command -v chromium >/dev/null 2>&1; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-chromium: chromium not found and cannot install it (needs root and apt-get); browser test will skip"
  exit 0
fi

log="$(mktemp "${TMPDIR:-/tmp}/ensure-chromium.XXXXXX.log")"
if DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$log" 2>&1 \
  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >>"$log" 2>&1 \
  && command -v chromium >/dev/null 2>&1; then
  rm -f "$log"
else
  echo "ensure-chromium: apt-get install chromium failed (log: $log); browser test will skip"
fi
exit 0
