#!/usr/bin/env bash
# Train the tiny track's base model from scratch: the shipped assets/checkpoints/tiny-base (model card:
# assets/checkpoints/tiny-base/README.md). The main job never runs this; it starts from the shipped base,
# as the paper starts from Qwen3-8B. Seven sequential SFT stages, ~52 min on 2 CPU cores (measured times
# in the model card). Every stage is skipped when its final/ exists and resumes from its last checkpoint,
# so an interrupted run continues where it stopped.
#
#   bash scripts/train_base.sh [OUT]        (OUT defaults to runs/base; the base lands in OUT/7-final/final)
#
# Stages 1-4 are the project's first recipes (questions list the groups in order, A B C); stages 5-7 teach
# the model to find a group by its name (`question_order: shuffled`, then `section_order: shuffled`), which
# is what makes the parallel format learnable in one epoch (README, "Why the base matters").
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/base}
py=${PYTHON:-python}
stage() {  # stage NAME FROM [--set k=v ...]: one sequential SFT stage of configs/tiny-base.yaml
  local name=$1 from=$2; shift 2
  if [ -d "$out/$name/final" ]; then echo "[$name] done already"; return; fi
  "$py" -m twlib sft --config configs/tiny-base.yaml --set out_dir="$out/$name" --set model="$from" \
    --set resume=true "$@"
}
ordered='task_options={question_order: groups}'
stage 1-scratch  tiny                       --set "$ordered"
stage 2-cycle    "$out/1-scratch/final"     --set "$ordered" --set lr=1e-3 --set epochs=2 --set warmup=0.02
stage 3-cycle    "$out/2-cycle/final"       --set "$ordered" --set lr=1e-3 --set epochs=2 --set warmup=0.02
stage 4-answers  "$out/3-cycle/final"       --set "$ordered" --set lr=1e-3 --set epochs=2 --set n_train=4000
stage 5-by-name  "$out/4-answers/final"     --set 'task_options={question_order: shuffled}' --set lr=2e-3 \
                                            --set epochs=1 --set n_train=8000 --set warmup=0.02
stage 6-sections "$out/5-by-name/final"     --set 'task_options={question_order: shuffled, section_order: shuffled}' \
                                            --set lr=3e-3 --set epochs=1 --set n_train=8000 --set data_seed=1 --set warmup=0.02
stage 7-final    "$out/6-sections/final"    --set 'task_options={question_order: shuffled, section_order: shuffled}' \
                                            --set lr=1e-3 --set epochs=1 --set n_train=16000 --set data_seed=2 --set warmup=0.02
echo "base: $out/7-final/final   (evaluate: $py -m twlib eval --model $out/7-final/final --n 500)"
