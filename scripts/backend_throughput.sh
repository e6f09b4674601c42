#!/bin/bash
# Wall time of the same 4 real SmolLM2 cells (configs/backend_throughput.yaml) on the local
# backend (one process, torch on both cores) and on Ray (two one-core workers), side by
# side in one run, with the summed RSS of every process sampled each second.
# Usage: scripts/backend_throughput.sh OUT_DIR
set -euo pipefail
out=${1:?usage: $0 OUT_DIR}
mkdir -p "$out"
suretrap=${SURETRAP:-.venv/bin/suretrap}
unset OMP_NUM_THREADS
export HF_HUB_OFFLINE=1
rss_monitor() {  # peak of the summed RSS (KiB) of all processes, every second, into $1
  local peak=0 now
  while :; do
    now=$(ps -eo rss= | awk '{s += $1} END {print s}')
    (( now > peak )) && peak=$now && echo "$peak" > "$1"
    sleep 1
  done
}
for backend in local ray; do
  rss_monitor "$out/$backend.peak_rss_kib" & mon=$!
  base_rss=$(ps -eo rss= | awk '{s += $1} END {print s}')
  s=$(date +%s.%N)
  "$suretrap" sweep configs/backend_throughput.yaml --out "$out/$backend" --backend "$backend"
  e=$(date +%s.%N)
  kill "$mon"
  echo "$backend wall_s $(echo "$e - $s" | bc) peak_rss_kib $(cat "$out/$backend.peak_rss_kib") idle_rss_kib $base_rss"
done
