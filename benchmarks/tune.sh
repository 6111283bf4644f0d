#!/usr/bin/env bash
# Learning-rate sweep behind benchmarks/RESULTS.md: every method gets the same three learning rates
# (low / default / high), run on a 3-experience prefix of exps/tiny_imagenet.json (its first 30
# classes), one seed, the table's epochs. Results: runs/tune-<step>/, whose summary is copied to
# benchmarks/results/tuning/<step>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BASELINES=(naive ewc lwf replay cumulative)
run_step() {  # name, SD-LoRA lr, baseline lr
  local sets=(--set sdlora.lr="$2")
  for b in "${BASELINES[@]}"; do sets+=(--set "baselines.$b.lr=$3"); done
  "$PY" -m avalanche_sdlora.run --config exps/tiny_imagenet.json --output "runs/tune-$1" \
    --compare sdlora_joint,sdlora_plain,naive,ewc,lwf,replay,cumulative \
    --set benchmark.num_classes=30 --set benchmark.n_experiences=3 \
    --set experiment.seeds=[0] --set experiment.baseline_seeds=[0] --set experiment.checkpoint=false \
    --set experiment.workers=2 --set experiment.threads=1 \
    "${sets[@]}"
  mkdir -p benchmarks/results/tuning
  cp "runs/tune-$1/summary.md" "benchmarks/results/tuning/$1.md"
}
run_step low 0.003 0.0001
run_step default 0.01 0.001
run_step high 0.03 0.01
