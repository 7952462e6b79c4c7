#!/usr/bin/env bash
# The CUDA backend's cold start with and without its start-up cache (issue 21): `speedrun bench
# --runs 1` three times in a row — the cache off, the cache empty (the run fills it), the cache
# filled — and for each, how long after launch the warm-up run began (libraries, NVRTC or the
# cache, data loading and upload) and how long the warm-up run took (it includes cuDNN's
# timing of every algorithm, or the cache's choices), and the process's whole wall time.
#
#   benches/cuda_cold_start.sh [DATA_DIR]      DATA_DIR defaults to target/test-data/cifar10
#
# Environment:
#   SPEEDRUN=PATH     the binary (default target/release/speedrun, built with `--features cuda`)
#   BACKEND=cuda      the backend (another one dry-runs the script: it has no start-up cache)
#   ARGS=...          extra flags for `speedrun bench` (e.g. "--epochs 1" for a shorter run)
#
# The logs go to target/cuda_cold_start/{off,empty,filled}.log.
set -euo pipefail

data_dir="${1:+$(realpath -m -- "$1")}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
data_dir="${data_dir:-target/test-data/cifar10}"
speedrun="${SPEEDRUN:-target/release/speedrun}"
backend="${BACKEND:-cuda}"
out_dir="target/cuda_cold_start"

[ -x "$speedrun" ] || { echo "error: $speedrun does not exist: build it with \`cargo build --release --features cuda\` (or set SPEEDRUN=PATH)" >&2; exit 1; }
mkdir -p "$out_dir"
cache="$(mktemp -d)"
trap 'rm -rf "$cache"' EXIT

for mode in off empty filled; do
    setting="$cache"
    [ "$mode" = off ] && setting=off
    log="$out_dir/$mode.log"
    started=$(date +%s.%N)
    # shellcheck disable=SC2086 # ARGS is a list of flags
    if ! SPEEDRUN_CACHE="$setting" "$speedrun" bench --backend "$backend" --data-dir "$data_dir" --runs 1 ${ARGS:-} >"$log" 2>&1; then
        echo "error: the run with the cache $mode failed; its output is in $log:" >&2
        tail -5 "$log" >&2
        exit 1
    fi
    ended=$(date +%s.%N)
    [ "$mode" = off ] && grep -m1 "^speedrun: " "$log"
    warm_up=$(grep -m1 "^warm-up run" "$log" | sed 's/^warm-up run (not counted): //')
    printf '%-13s warm-up run %s; process %.2f s; %s\n' "cache $mode:" "$warm_up" "$(awk -v a="$started" -v b="$ended" 'BEGIN { print b - a }')" \
        "$(grep -m1 -o 'kernels ready in .*' "$log" || echo "no CUDA kernels (backend $backend)")"
done
