#!/usr/bin/env bash
# The joint controls of the study (issue "Adapters must matter"): every class of the study's stream
# in one experience, so that nothing is forgotten and the rows show only how much adaptation can buy
# on this backbone: head_only (a trained head on the frozen backbone), sdlora_plain (one adapter)
# and naive (full fine-tuning). Seed 0, the study's epochs, scored on the test images.
#   bash benchmarks/joint.sh DATA_ROOT NAME [--set key=value ...]
# runs into runs/joint-NAME and copies summary.md, metrics.json and config.json to
# benchmarks/results/joint/NAME/. NAME "landed" is the study's settings before the issue, "chosen"
# the settings it chose (the --set arguments given).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/records.sh
PY=${PY:-.venv/bin/python}
DATA=${1:?usage: bash $0 DATA_ROOT NAME [--set key=value ...]}
NAME=${2:?usage: bash $0 DATA_ROOT NAME [--set key=value ...]}
shift 2
RUN=runs/joint-$NAME
if [ -d "$RUN" ] && [ ! -f "$RUN/metrics.json" ]; then
  "$PY" -m avalanche_sdlora.run --resume "$RUN"
elif [ ! -f "$RUN/metrics.json" ]; then
  /usr/bin/time -f "%e s wall" "$PY" -m avalanche_sdlora.run --config exps/tiny_imagenet.json \
    --output "$RUN" --set benchmark.root="$DATA" --set benchmark.n_experiences=1 \
    --set experiment.strategy=head_only --set experiment.compare=sdlora_plain,naive \
    --set experiment.seeds=[0] --set experiment.baseline_seeds=[0] "$@"
fi
OUTDIR=benchmarks/results/joint/$NAME
mkdir -p "$OUTDIR"
cp "$RUN"/{summary.md,metrics.json,config.json} "$OUTDIR"/
record_root "$OUTDIR/config.json" "$DATA"
"$PY" benchmarks/lever_table.py "$OUTDIR/metrics.json" > "$OUTDIR/table.md"
cat "$OUTDIR/table.md"
