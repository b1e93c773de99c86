#!/usr/bin/env bash
# The GPU kit (bench/gpu_kit.py) on the device machine, in one go within 8 minutes: installs what the GPU image
# lacks (transformers 5.24, trl, datasets, deepspeed, peft, ...) from the wheels in .whl/ (`python -m bench.gpu_kit
# prepare` here puts them there; git-ignored, so the device call must carry it), then runs every part of the kit,
# each in a process of its own, starting none past a budget of BUDGET_S seconds (default 420: with the install,
# the whole command stays under 8 minutes). Writes into OUT_DIR: kit.json, kit.md, kit.log, bench.json, bench.log
# (the stage bench's), nvidia-smi.txt and gpu_utilisation.csv (7 files, as the device call brings back at most 8).
#
#   bash bench/gpu_bench.sh "$OUT"                                    # device tool: carry [".whl"], timeout_s 600
#   bash bench/gpu_bench.sh "$OUT" --parts stages_bench family_gemma3  # some parts only
#
# Keep the results as bench/results/gpu_kit_<date>_<gpu>.{json,md} (and the stage bench's as
# bench/results/stages_bench_<date>_<gpu>.json).
set -euo pipefail
out=${1:?usage: bash bench/gpu_bench.sh OUT_DIR [bench.gpu_kit run flags]}
shift
mkdir -p "$out"
if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_bench.sh: no wheels in .whl/: run 'make gpu-kit' where pip works, then carry .whl in the device call" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$out/nvidia-smi.txt" || true
# GPU utilisation every half second, to set against each part's and case's case_started_unix and case_wall_s
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,nounits -lms 500 >"$out/gpu_utilisation.csv" &
sampler=$!
python3 -m bench.gpu_kit run --out "$out" --budget_s "${BUDGET_S:-420}" "$@" || status=$?
kill $sampler || true
exit "${status:-0}"
