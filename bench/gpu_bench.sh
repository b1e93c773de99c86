#!/usr/bin/env bash
# Issue 8's benchmark on one GPU in one go: installs what the GPU image lacks (trl, datasets, deepspeed, peft,
# transformers 5.24, ...) from the wheels in .whl/ (git-ignored: the device call must carry it), then runs
# bench/stages_bench.py at the Qwen2.5-VL-3B size, every case in a process of its own, starting no case past
# a budget of BUDGET_S seconds (default 420: with the install, the whole command stays under 8 minutes).
# Writes OUT_DIR/bench.json (figures), bench.log (every case's output), nvidia-smi.txt and gpu_utilisation.csv.
#
#   bash bench/gpu_bench.sh "$OUT"                        # device tool: carry [".whl"], timeout_s 600
#   bash bench/gpu_bench.sh "$OUT" --cases pretrain_ours  # some cases only (matmul_peak gives the MFU peak)
#
# Keep the JSON as bench/results/stages_bench_<date>_<gpu>.json.
set -euo pipefail
out=${1:?usage: bash bench/gpu_bench.sh OUT_DIR [stages_bench flags]}
shift
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$out/nvidia-smi.txt" || true
# GPU utilisation every half second, to set against each case's case_started_unix and case_wall_s
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,nounits -lms 500 >"$out/gpu_utilisation.csv" &
sampler=$!
python3 bench/stages_bench.py --out "$out/bench.json" --budget_s "${BUDGET_S:-420}" "$@"
kill $sampler || true
