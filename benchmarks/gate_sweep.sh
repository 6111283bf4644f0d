#!/usr/bin/env bash
# The measurements behind the gate's defaults (benchmarks/RESULTS.md, "What makes the gate learn"):
# gated SD-LoRA on a 4-experience prefix of exps/tiny_imagenet.json (its first 40 classes), seed 0,
# 2 epochs (the earlier study's budget), one setting changed at a time; the last two probes measure
# phase 1's length at the study's 3 epochs (1 or 2 epochs of phase 1). Settings are chosen by what
# the gate does (logit spread, agreement, adapters kept, training loss), never by test accuracy.
# Usage: bash benchmarks/gate_sweep.sh DATA_ROOT   (the cl/ split of Tiny-ImageNet: cl/train, cl/val)
# Results: runs/gate-<name>/, summarised in benchmarks/results/gate_sweep.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${1:?usage: bash $0 DATA_ROOT (the cl/ split of Tiny-ImageNet)}
probe() {  # name, settings...
  local name=$1
  shift
  local sets=()
  for s in "$@"; do sets+=(--set "$s"); done
  "$PY" -m avalanche_sdlora.run --config exps/tiny_imagenet.json --output "runs/gate-$name" \
    --set benchmark.root="$DATA" --set benchmark.num_classes=40 --set benchmark.n_experiences=4 \
    --set experiment.seeds=[0] --set experiment.compare=[] --set experiment.checkpoint=false \
    --set training.epochs=2 \
    --set experiment.workers=1 --set experiment.threads=1 "${sets[@]}" > "runs/gate-$name.log" 2>&1
}
mkdir -p runs
NAMES=(sgd-0.04 sgd-0.5 adam-0.05 adam-0.2 adam-0.05-sparsity0 adam-0.05-sparsity1 adam-0.05-init-1
  adam-0.05-3ep adam-0.05-3ep-phase1-2ep)
SETTINGS=(
  "sdlora.gate_optimizer=null sdlora.gate_lr=0.04"
  "sdlora.gate_optimizer=null sdlora.gate_lr=0.5"
  "sdlora.gate_optimizer=adam sdlora.gate_lr=0.05"
  "sdlora.gate_optimizer=adam sdlora.gate_lr=0.2"
  "sdlora.gate_optimizer=adam sdlora.gate_lr=0.05 sdlora.lambda_sparsity=0"
  "sdlora.gate_optimizer=adam sdlora.gate_lr=0.05 sdlora.lambda_sparsity=1"
  "sdlora.gate_optimizer=adam sdlora.gate_lr=0.05 sdlora.init_logit=-1"
  "sdlora.gate_optimizer=adam sdlora.gate_lr=0.05 training.epochs=3"
  "sdlora.gate_optimizer=adam sdlora.gate_lr=0.05 training.epochs=3 sdlora.phase1_fraction=0.67"
)
for i in "${!NAMES[@]}"; do
  # shellcheck disable=SC2086
  probe "${NAMES[$i]}" ${SETTINGS[$i]} &
  if (( i % 2 == 1 )); then wait; fi
done
wait
mkdir -p benchmarks/results
"$PY" benchmarks/gate_stats.py runs/gate-*/metrics.json > benchmarks/results/gate_sweep.md
cat benchmarks/results/gate_sweep.md
