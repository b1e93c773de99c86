#!/usr/bin/env bash
# Real-size check of stages.pretrain on one GPU: a randomly initialised model with Qwen2.5-VL-3B's
# configuration (36 layers of 2048, vision tower 32 x 1280, 151936 embedding rows, tied), bf16,
# DeepSpeed ZeRO-2, a few full fine-tuning steps on the embedded default's page images at the real
# pixel budget. The run record's `throughput` holds tokens/s and peak GPU memory.
#
#   bash bench/pretrain_real_size.sh OUT_DIR [base_model flags, e.g. --num_hidden_layers 2 for a dry run]
#
# Needs the pages prepared by `make demo` (checkpoints/tiny/pages). The tokenizer is the tiny one
# (4096 tokens), so page text costs other token counts than Qwen's own tokenizer gives.
set -euo pipefail
out=${1:?usage: bash bench/pretrain_real_size.sh OUT_DIR [base_model flags]}
shift
python=${PYTHON:-python3}
work=$(mktemp -d)
mkdir -p "$out"

"$python" -m stages.base_model --config recipes/tiny.yaml --output_dir "$work/base" --dtype bfloat16 \
    --hidden_size 2048 --num_hidden_layers 36 --num_attention_heads 16 --num_key_value_heads 2 \
    --intermediate_size 11008 --embedding_rows 151936 --tie_word_embeddings true \
    --vision_depth 32 --vision_hidden_size 1280 --vision_num_heads 16 --vision_intermediate_size 3420 \
    --max_pixels 1003520 "$@" 2>&1 | tee "$out/base_model.log"

"$python" -m torch.distributed.run --nproc_per_node 1 -m stages.pretrain --config recipes/tiny.yaml \
    --model_name_or_path "$work/base" --output_dir "$work/pretrain" --deepspeed recipes/deepspeed/zero2.json \
    --max_steps 12 --per_device_train_batch_size 4 --gradient_accumulation_steps 1 --gradient_checkpointing true \
    --max_length 4096 --max_pixels 1003520 --learning_rate 1.0e-5 --warmup_steps 2 \
    --eval_strategy no --save_strategy no --logging_steps 1 --cer_pages 1 2>&1 | tee "$out/pretrain.log"

cp "$work/pretrain/final/run_record.json" "$out/pretrain_run_record.json"
rm -rf "$work"
