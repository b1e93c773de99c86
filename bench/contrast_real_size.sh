#!/usr/bin/env bash
# Real-size check of stages.contrast on one GPU: a randomly initialised model with Qwen2.5-VL-3B's
# configuration (as bench/pretrain_real_size.sh builds it), bf16, LoRA r64, DeepSpeed ZeRO-2, the cached
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

"$python" -m stages.base_model --config recipes/tiny.yaml --output_dir "$work/base" --dtype bfloat16 \
    --hidden_size 2048 --num_hidden_layers 36 --num_attention_heads 16 --num_key_value_heads 2 \
    --intermediate_size 11008 --embedding_rows 151936 --tie_word_embeddings true \
    --vision_depth 32 --vision_hidden_size 1280 --vision_num_heads 16 --vision_intermediate_size 3420 \
    --max_pixels 1003520 "$@" 2>&1 | tee "$out/base_model.log"

"$python" -m torch.distributed.run --nproc_per_node 1 -m stages.contrast --config recipes/tiny.yaml \
    --model_name_or_path "$work/base" --output_dir "$work/contrast" --deepspeed recipes/deepspeed/zero2.json \
    --max_steps 3 --contrastive_batch_size 64 --mini_batch_size 16 --lora_r 64 --lora_alpha 128 \
    --max_text_tokens 650 --image_max_side 700 --eval_steps 0 --logging_steps 1 2>&1 | tee "$out/contrast.log"

cp "$work/contrast/final/run_record.json" "$out/contrast_run_record.json"
rm -rf "$work"
