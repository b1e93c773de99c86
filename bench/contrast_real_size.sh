#!/usr/bin/env bash
# Real-size check of stages.contrast on one GPU: the randomly initialised Qwen2.5-VL-3B-sized model of
# bench/real_size_base.sh, bf16, LoRA r64, DeepSpeed ZeRO-2, the cached
# loss at a contrastive batch of 64 in mini-batches of 16, a few steps on pairs built from the embedded
# default's pages. Peak GPU memory is printed at the end.
#
#   bash bench/contrast_real_size.sh OUT_DIR [base_model flags, e.g. --num_hidden_layers 2 for a dry run]
set -euo pipefail
out=${1:?usage: bash bench/contrast_real_size.sh OUT_DIR [base_model flags]}
shift
python=${PYTHON:-python3}
work=$(mktemp -d)
mkdir -p "$out"

bash bench/real_size_base.sh "$work/base" "$@" 2>&1 | tee "$out/base_model.log"

"$python" -m torch.distributed.run --nproc_per_node 1 -m stages.contrast --config recipes/tiny.yaml \
    --model_name_or_path "$work/base" --output_dir "$work/contrast" --deepspeed recipes/deepspeed/zero2.json \
    --max_steps 3 --contrastive_batch_size 64 --mini_batch_size 16 --lora_r 64 --lora_alpha 128 \
    --max_text_tokens 650 --image_max_side 700 --eval_steps 0 --logging_steps 1 2>&1 | tee "$out/contrast.log"

cp "$work/contrast/final/run_record.json" "$out/contrast_run_record.json"
rm -rf "$work"
