#!/usr/bin/env bash
# The study in benchmarks/RESULTS.md: every method of the table on exps/tiny_imagenet.json (the
# pretrained small ViT on Split Tiny-ImageNet-100), three seeds for the SD-LoRA rows and one for the
# baselines, two runs at a time with one thread each. The run folder is runs/results; its table,
# metrics and plots are copied to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/results}
/usr/bin/time -f "%e s wall" "$PY" -m avalanche_sdlora.run --config exps/tiny_imagenet.json \
  --output "$RUN" --compare sdlora_joint,sdlora_plain,naive,ewc,lwf,replay,cumulative
mkdir -p benchmarks/results
cp "$RUN"/{summary.md,metrics.json,accuracy_matrix.csv,pruning.csv,config.json} benchmarks/results/
cp "$RUN"/plots/*.png benchmarks/results/
"$PY" benchmarks/compensation.py "$RUN/metrics.json" > benchmarks/results/compensation.md
mkdir -p benchmarks/results/training_logs
for log in "$RUN"/*/seed*/csv/training_results.csv; do
  run=${log#"$RUN"/}
  cp "$log" "benchmarks/results/training_logs/$(dirname "$(dirname "$run")" | tr / _).csv"
done
