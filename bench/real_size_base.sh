#!/usr/bin/env bash
# A randomly initialised model with Qwen2.5-VL-3B's configuration (36 layers of 2048, vision tower
# 32 x 1280, 151936 embedding rows, tied), bf16, with the tiny tokenizer: the real-size checks' base.
#
#   bash bench/real_size_base.sh MODEL_DIR [base_model flags, e.g. --num_hidden_layers 2 for a dry run]
set -euo pipefail
folder=${1:?usage: bash bench/real_size_base.sh MODEL_DIR [base_model flags]}
shift
"${PYTHON:-python3}" -m stages.base_model --config recipes/tiny.yaml --output_dir "$folder" --dtype bfloat16 \
    --hidden_size 2048 --num_hidden_layers 36 --num_attention_heads 16 --num_key_value_heads 2 \
    --intermediate_size 11008 --embedding_rows 151936 --tie_word_embeddings true \
    --vision_depth 32 --vision_hidden_size 1280 --vision_num_heads 16 --vision_intermediate_size 3420 \
    --max_pixels 1003520 "$@"
