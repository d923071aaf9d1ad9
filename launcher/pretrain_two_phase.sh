#!/usr/bin/env bash
# Two-phase BERT pretraining (NVIDIA's recipe): phase 1 at 128 tokens, then phase 2 at 512 tokens starting from
# phase 1's weights with a fresh optimizer and schedule. Both phases resume automatically when re-run.
#
#   launcher/pretrain_two_phase.sh OUTPUT_DIR [more launcher/pretrain.py flags, e.g. --data-dir DIR]
#
# Environment (defaults in brackets): LAUNCH [deepspeed] e.g. "deepspeed --num_gpus 8" or
# "deepspeed --hostfile launcher/hostfile.example", MODEL [large], PHASE1_CONFIG [ds_configs/large_seq128_fp16_zero2.json],
# PHASE1_STEPS [7038], PHASE2_CONFIG [ds_configs/large_seq512_bf16_zero2.json], PHASE2_STEPS [1563].
set -euo pipefail
out=${1:?usage: launcher/pretrain_two_phase.sh OUTPUT_DIR [pretrain.py flags]}
shift
here=$(cd "$(dirname "$0")" && pwd)
read -r -a launch <<< "${LAUNCH:-deepspeed}"
model=${MODEL:-large}

"${launch[@]}" "$here/pretrain.py" --model "$model" --max-len 128 --resume auto \
  --deepspeed_config "${PHASE1_CONFIG:-$here/../ds_configs/large_seq128_fp16_zero2.json}" \
  --max-steps "${PHASE1_STEPS:-7038}" --output-dir "$out/phase1" "$@"
"${launch[@]}" "$here/pretrain.py" --model "$model" --max-len 512 --resume auto --init-from "$out/phase1" \
  --deepspeed_config "${PHASE2_CONFIG:-$here/../ds_configs/large_seq512_bf16_zero2.json}" \
  --max-steps "${PHASE2_STEPS:-1563}" --output-dir "$out/phase2" "$@"
