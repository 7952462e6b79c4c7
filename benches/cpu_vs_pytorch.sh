#!/usr/bin/env bash
# speedrun's CPU backend against eager PyTorch on the same CPU (issue 18): one epoch of the
# airbench94 recipe plus the final TTA, PyTorch first (benches/pytorch_airbench94.py), then
# `speedrun train --backend cpu`, one after the other so neither slows the other, and the
# ratio of their total times (whitening init + training + TTA, the recipe's clock).
#
#   benches/cpu_vs_pytorch.sh [DATA_DIR]        DATA_DIR defaults to target/test-data/cifar10
#
# Environment:
#   EPOCHS=1          epochs for both (fractions allowed; the recipe's full run is 9.9)
#   THREADS=N         threads for both (default: every CPU; sets RAYON_NUM_THREADS for speedrun)
#   PYTORCH_ARGS=...  extra flags for the PyTorch script (e.g. --no-channels-last)
#   SPEEDRUN_ARGS=... extra flags for `speedrun train`
#   SPEEDRUN=PATH     the speedrun binary (default target/release/speedrun, which this script
#                     does not build: `cargo build --release --features cuda`)
#   VENV=DIR          the PyTorch virtual environment (default target/torch-venv, made if missing)
#
# A quick check of the whole pipeline (3 steps of each, 1,000 test images):
#   EPOCHS=0.0625 PYTORCH_ARGS="--test-limit 1000" SPEEDRUN_ARGS="--test-limit 1000" benches/cpu_vs_pytorch.sh
#
# Both runs append JSON rows to target/cpu_vs_pytorch/ (pytorch.jsonl, speedrun.jsonl).
set -euo pipefail

# A DATA_DIR given is relative to where the script was called from; everything else to the
# repository root, where the script runs.
data_dir="${1:+$(realpath -m -- "$1")}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
data_dir="${data_dir:-target/test-data/cifar10}"
epochs="${EPOCHS:-1}"
speedrun="${SPEEDRUN:-target/release/speedrun}"
venv="${VENV:-target/torch-venv}"
out_dir="target/cpu_vs_pytorch"

die() { echo "error: $*" >&2; exit 1; }

# ---- checks first: a missing input should not cost a multi-GB install or a long run ----
batches="$data_dir"
[ -f "$batches/data_batch_1.bin" ] || batches="$data_dir/cifar-10-batches-bin"
for f in data_batch_1.bin data_batch_2.bin data_batch_3.bin data_batch_4.bin data_batch_5.bin test_batch.bin; do
    [ -f "$batches/$f" ] || die "no CIFAR-10 binary batches in $data_dir ($f is missing).
  Unpack the project's copy:   $(realpath -m "$root/../shared/cifar10-jpeg/unpack.sh") $data_dir
  or download the original:    $speedrun download --data-dir $data_dir
  or pass another folder:      $0 DATA_DIR"
done
[ -x "$speedrun" ] || die "$speedrun does not exist: build it with \`cargo build --release --features cuda\` (or set SPEEDRUN=PATH)"

# ---- PyTorch for the CPU in an ignored virtual environment (target/ is in .gitignore) ----
py="$venv/bin/python"
if ! { [ -x "$py" ] && "$py" -c 'import torch' 2>/dev/null; }; then
    echo "installing PyTorch (CPU) into $venv ..."
    [ -x "$py" ] || python3 -m venv "$venv" || die "python3 -m venv failed: install python3-venv (apt-get install python3-venv)"
    # The CPU-only wheels (~200 MB) first. Where their host cannot be reached, PyPI's torch is
    # the CUDA build (~3 GB with its nvidia-* libraries); it runs on the CPU all the same.
    if ! "$py" -m pip install --quiet --retries 1 --timeout 30 torch --index-url https://download.pytorch.org/whl/cpu; then
        echo "download.pytorch.org unreachable or failing: installing torch from PyPI instead"
        "$py" -m pip install --quiet torch || die "pip could not install torch into $venv"
    fi
    # torch imports without numpy but warns; numpy silences that where it is reachable.
    "$py" -c 'import numpy' 2>/dev/null || "$py" -m pip install --quiet numpy || true
fi
torch_version="$("$py" -c 'import torch; print(torch.__version__)')"

threads="${THREADS:-$("$py" -c 'import os; print(os.cpu_count())')}"
export RAYON_NUM_THREADS="$threads"
cpu_model="$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)"
mkdir -p "$out_dir"
pt_json="$out_dir/pytorch.jsonl"
sr_json="$out_dir/speedrun.jsonl"

echo "CPU: ${cpu_model:-unknown} ($(nproc) CPUs available, $threads threads for both)"
echo "data: $data_dir; epochs: $epochs; torch $torch_version; speedrun: $speedrun"
echo

echo "== (a) PyTorch $torch_version, eager, float32 =="
# shellcheck disable=SC2086  # PYTORCH_ARGS is a list of flags
"$py" benches/pytorch_airbench94.py --data-dir "$data_dir" --epochs "$epochs" --threads "$threads" ${PYTORCH_ARGS:-} |
    tee "$out_dir/pytorch.log"
tail -n 1 "$out_dir/pytorch.log" >>"$pt_json"
echo

echo "== (b) speedrun, CPU backend =="
# A fresh JSON file per run: speedrun appends, and the comparison wants this run's row.
sr_row="$(mktemp "$out_dir/speedrun.XXXXXX.json")"
trap 'rm -f "$sr_row"' EXIT
# shellcheck disable=SC2086  # SPEEDRUN_ARGS is a list of flags
SPEEDRUN_PROGRESS_SECONDS=0 "$speedrun" train --backend cpu --epochs "$epochs" --data-dir "$data_dir" --json "$sr_row" ${SPEEDRUN_ARGS:-}
cat "$sr_row" >>"$sr_json"
echo

echo "== comparison =="
"$py" - "$out_dir/pytorch.log" "$sr_row" "$cpu_model" "$threads" <<'EOF'
import json, sys
pt = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
sr = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
print(f"CPU {sys.argv[3]}, {sys.argv[4]} threads, {sr['steps']} steps of {sr['batch_size']} (PyTorch: {pt['steps']})")
print(f"{'':10}{'whitening s':>13}{'training s':>12}{'TTA s':>9}{'total s':>10}{'accuracy':>10}{'TTA acc':>9}")
for name, r in (("PyTorch", pt), ("speedrun", sr)):
    print(f"{name:10}{r['whiten_seconds']:>13.2f}{r['train_seconds']:>12.2f}{r['tta_seconds']:>9.2f}"
          f"{r['time_seconds']:>10.2f}{r['accuracy']:>10.4f}{r['tta_accuracy']:>9.4f}")
print(f"PyTorch total / speedrun total: {pt['time_seconds'] / sr['time_seconds']:.2f}"
      f"  (training {pt['train_seconds'] / sr['train_seconds']:.2f}, TTA {pt['tta_seconds'] / sr['tta_seconds']:.2f})")
EOF
