#!/usr/bin/env bash
# The longer tiny recipe (README, "A longer recipe"): the same configs as `python3 lab.py demo`, with the
# base trained 4 more epochs and the parallel stage 3 more. It continues from the shipped base checkpoint,
# so it needs no other run. Every step is skipped when its final/ exists, and SFT resumes from its last
# checkpoint, so an interrupted run picks up where it stopped. About 32 min on 2 CPU cores (27 of them training).
#
#   bash scripts/long_recipe.sh [OUT]        (OUT defaults to runs/long)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/long}
py=${PYTHON:-python}
sft() {  # sft NAME CONFIG [--set k=v ...]: one SFT stage into $out/NAME, skipped when done
  local name=$1 config=$2; shift 2
  if [ -d "$out/$name/final" ]; then echo "[$name] done already"; return; fi
  "$py" -m twlib sft --config "$config" --set out_dir="$out/$name" "$@"
}
evaluate() {  # evaluate NAME [--parallel]: 500 held-out problems, greedy, per-problem CSV
  local name=$1; shift
  echo "[eval $name]"
  [ -f "$out/$name/eval.csv" ] || "$py" -m twlib eval --model "$out/$name/final" --n 500 "$@" --out "$out/$name/eval.csv"
}
# 1-2. The base: two more cosine cycles of 2 epochs at a lower peak, from the shipped 1.5-epoch base.
sft base-long  configs/tiny-base.yaml --set model=assets/checkpoints/tiny-base --set lr=1e-3 --set epochs=2 --set warmup=0.02
sft base-long2 configs/tiny-base.yaml --set model="$out/base-long/final" --set lr=1e-3 --set epochs=2 --set warmup=0.02
# 3. Sequential SFT on the long base (the demo's config unchanged).
sft sequential configs/tiny-sequential.yaml --set model="$out/base-long2/final"
# 4-5. Trie SFT on the long base: the demo's config, then 3 more epochs.
sft parallel  configs/tiny-parallel.yaml --set model="$out/base-long2/final"
sft parallel2 configs/tiny-parallel.yaml --set model="$out/parallel/final" --set epochs=3 --set lr=1e-3
evaluate base-long2
evaluate sequential
evaluate parallel --parallel
evaluate parallel2 --parallel
