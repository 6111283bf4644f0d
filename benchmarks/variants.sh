#!/usr/bin/env bash
# The study's SD-LoRA-RR and SD-LoRA-KD rows (benchmarks/RESULTS.md): exps/tiny_imagenet.json, three
# seeds, two runs at a time with one thread each, beside the rows of benchmarks/results.sh (same
# settings). RR's schedule is LibContinual's scaled to the study's base rank 8: ranks 10 -> 8 -> 6
# (x0.8 from experience 4, x0.6 from experience 8) become 8 -> 6 -> 5. KD uses LibContinual's
# threshold, 9e-4. The run folder is runs/results_variants; its outputs go to
# benchmarks/results/variants/, with the residuals' distribution and the accuracy-per-parameter plot
# of every SD-LoRA row of both runs.
# Usage: bash benchmarks/variants.sh DATA_ROOT   (the cl/ split of Tiny-ImageNet: cl/train, cl/val)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/records.sh
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/results_variants}
DATA=${1:?usage: bash $0 DATA_ROOT (the cl/ split of Tiny-ImageNet)}
OUT=benchmarks/results/variants
/usr/bin/time -f "%e s wall" "$PY" -m avalanche_sdlora.run --config exps/tiny_imagenet.json \
  --output "$RUN" --set benchmark.root="$DATA" --set experiment.strategy=sdlora_rr \
  --compare sdlora_kd --set 'sdlora.rank_schedule={"4":6,"8":5}'
mkdir -p "$OUT"
cp "$RUN"/{summary.md,metrics.json,accuracy_matrix.csv,absorption.csv,config.json} "$OUT"/
cp "$RUN"/plots/*.png "$OUT"/
record_root "$OUT/config.json" "$DATA"
"$PY" benchmarks/absorption_stats.py "$RUN/metrics.json" > "$OUT/absorption.md"
"$PY" benchmarks/params_vs_accuracy.py benchmarks/results/metrics.json "$RUN/metrics.json" \
  --output "$OUT/params_vs_accuracy_all.png" > "$OUT/params_vs_accuracy_all.md"
