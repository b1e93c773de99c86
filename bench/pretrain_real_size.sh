#!/usr/bin/env bash
# Real-size check of stages.pretrain on one GPU: the randomly initialised Qwen2.5-VL-3B-sized model of
# bench/real_size_base.sh, bf16, DeepSpeed ZeRO-2, a few full fine-tuning steps on the embedded
# default's page images at the real pixel budget. The run record's `throughput` holds tokens/s and
# peak GPU memory.
#
#   bash bench/pretrain_real_size.sh OUT_DIR [base_model flags, e.g. --num_hidden_layers 2 for a dry run]
#
# Needs the pages prepared by `make demo` (the recipes/tiny.yaml pretrain datasets). The tokenizer is
# the tiny one (4096 tokens), so page text costs other token counts than Qwen's own tokenizer gives.
set -euo pipefail
out=${1:?usage: bash bench/pretrain_real_size.sh OUT_DIR [base_model flags]}
shift
python=${PYTHON:-python3}
work=$(mktemp -d)
mkdir -p "$out"

bash bench/real_size_base.sh "$work/base" "$@" 2>&1 | tee "$out/base_model.log"

"$python" -m torch.distributed.run --nproc_per_node 1 -m stages.pretrain --config recipes/tiny.yaml \
    --model_name_or_path "$work/base" --output_dir "$work/pretrain" --deepspeed recipes/deepspeed/zero2.json \
    --max_steps 12 --per_device_train_batch_size 4 --gradient_accumulation_steps 1 --checkpointing all \
    --max_length 4096 --max_pixels 1003520 --learning_rate 1.0e-5 --warmup_steps 2 \
    --eval_strategy no --save_strategy no --logging_steps 1 --cer_pages 1 2>&1 | tee "$out/pretrain.log"

cp "$work/pretrain/final/run_record.json" "$out/pretrain_run_record.json"
rm -rf "$work"
