#!/usr/bin/env bash
# The study in benchmarks/RESULTS.md: the SD-LoRA rows (gated two-phase, gated joint, plain, and the
# random-pruning control) on exps/tiny_imagenet.json (the pretrained small ViT on Split
# Tiny-ImageNet-100), three seeds, two runs at a time with one thread each. The run folder is
# runs/results; its table, metrics, gate statistics and plots are copied to benchmarks/results/.
# The baselines' rows (benchmarks/results/v1/, 2 epochs) come from the earlier study: their code did
# not change since; `--compare naive,ewc,lwf,replay,cumulative --set training.epochs=2` reruns them.
# Usage: bash benchmarks/results.sh DATA_ROOT   (the cl/ split of Tiny-ImageNet: cl/train, cl/val)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/records.sh
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/results}
DATA=${1:?usage: bash $0 DATA_ROOT (the cl/ split of Tiny-ImageNet)}
/usr/bin/time -f "%e s wall" "$PY" -m avalanche_sdlora.run --config exps/tiny_imagenet.json \
  --output "$RUN" --set benchmark.root="$DATA" --compare sdlora_joint,sdlora_plain,sdlora_random
mkdir -p benchmarks/results
cp "$RUN"/{summary.md,metrics.json,accuracy_matrix.csv,pruning.csv,config.json} benchmarks/results/
record_root "benchmarks/results/config.json" "$DATA"
cp "$RUN"/plots/*.png benchmarks/results/
"$PY" benchmarks/gate_stats.py --accuracy "$RUN/metrics.json" > benchmarks/results/gate_stats.md
"$PY" benchmarks/compensation.py "$RUN/metrics.json" > benchmarks/results/compensation.md
mkdir -p benchmarks/results/training_logs
for log in "$RUN"/*/seed*/csv/training_results.csv; do
  run=${log#"$RUN"/}
  cp "$log" "benchmarks/results/training_logs/$(dirname "$(dirname "$run")" | tr / _).csv"
done
