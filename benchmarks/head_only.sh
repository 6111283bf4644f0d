#!/usr/bin/env bash
# The head-only control behind benchmarks/RESULTS.md: plain SD-LoRA on exps/tiny_imagenet.json with
# the adapters and alphas frozen in effect (learning rate 1e-9) and the head at the study's 0.01, seed
# 0. It tells how much of SD-LoRA's accuracy at this budget comes from the adapters at all.
# Usage: bash benchmarks/head_only.sh DATA_ROOT   (the cl/ split of Tiny-ImageNet: cl/train, cl/val)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${1:?usage: bash $0 DATA_ROOT (the cl/ split of Tiny-ImageNet)}
"$PY" -m avalanche_sdlora.run --config exps/tiny_imagenet.json --output runs/head-only \
  --set benchmark.root="$DATA" --set experiment.strategy=sdlora_plain --set experiment.compare=[] \
  --set experiment.seeds=[0] --set experiment.workers=1 --set experiment.threads=1 \
  --set sdlora.lr=1e-9 --set sdlora.alpha_lr=1e-9 --set sdlora.head_lr=0.01
mkdir -p benchmarks/results
cp runs/head-only/summary.md benchmarks/results/head_only.md
