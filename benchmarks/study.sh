#!/usr/bin/env bash
# The whole Tiny-ImageNet-100 study of benchmarks/RESULTS.md, every row at exps/tiny_imagenet.json's
# settings (3 epochs per experience): the SD-LoRA rows and head_only on seeds 0, 1 and 2, the
# baselines on seed 0. It runs in parts of at most about 90 minutes on one core each; a part's run
# folder is $OUT/PART, and running a part again resumes it (a finished part is skipped). Two parts
# can run at once (one thread each).
#   plain      sdlora_plain, head_only          3 seeds   about 50 min
#   variants   sdlora_rr, sdlora_kd             3 seeds   about 50 min
#   gated      sdlora, sdlora_random, sdlora_joint  3 seeds   about 80 min (the committed rows reuse
#              the gate table of results.sh, checked: benchmarks/results/study/gated/README.md)
#   baselines  naive, lwf, replay, l2p          seed 0    about 60 min (the committed part also ran
#              EWC before its importance cap: the row ewc (max_stiffness=null), NaN from experience 6)
#   ewc        ewc (importances capped below SGD's stability limit)   seed 0   about 20 min
#   cumulative cumulative                       seed 0    about 60 min
#   replay     replay                           seeds 1, 2 (a baseline within 2 points of an SD-LoRA row)
#   peers      simplecil, ranpac                3 seeds   about 15 min (estimated: one pass, no training)
#   growth_gain, growth_patience, growth_phase1   sdlora at issue 17's growth rules, 3 seeds each,
#              about 60 min: sdlora.growth=gain; gain with sdlora.prune_patience=3 (the library's
#              defaults); phase1. The config pins growth always and patience 1 (the gated part's rule)
#   table      benchmarks/results/study/: each part's metrics and config, table.md and survivors.md
# Usage: bash benchmarks/study.sh DATA_ROOT PART   (DATA_ROOT: the cl/ split of Tiny-ImageNet)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/records.sh
PY=${PY:-.venv/bin/python}
DATA=${1:?usage: bash $0 DATA_ROOT PART}
PART=${2:?usage: bash $0 DATA_ROOT PART}
OUT=${OUT:-runs/study}

part() {  # part NAME STRATEGY COMPARE SEEDS [--set KEY=VALUE ...]
  local name=$1 strategy=$2 compare=$3 seeds=$4
  shift 4
  [ -f "$OUT/$name/metrics.json" ] && return 0
  if [ -d "$OUT/$name" ]; then
    "$PY" -m avalanche_sdlora.run --resume "$OUT/$name" >> "$OUT/$name.log" 2>&1
    return
  fi
  /usr/bin/time -f "%e s wall" -a -o "$OUT/$name.time" \
    "$PY" -m avalanche_sdlora.run --config exps/tiny_imagenet.json --output "$OUT/$name" \
    --set benchmark.root="$DATA" --set experiment.strategy="$strategy" \
    --set experiment.compare="$compare" --set experiment.seeds="$seeds" \
    --set experiment.baseline_seeds="$seeds" \
    --set experiment.workers=1 --set experiment.threads=1 "$@" > "$OUT/$name.log" 2>&1
}

table() {
  local dest=benchmarks/results/study
  collect_runs "$OUT" "$dest" "$DATA" config.json summary.md
  "$PY" benchmarks/study_table.py "$dest"/*/metrics.json > "$dest/table.md"
  "$PY" benchmarks/survivors.py "$dest"/*/metrics.json > "$dest/survivors.md"
  cat "$dest/table.md" "$dest/survivors.md"
}

mkdir -p "$OUT"
case "$PART" in
  plain) part plain sdlora_plain '["head_only"]' "[0,1,2]" ;;
  variants) part variants sdlora_rr '["sdlora_kd"]' "[0,1,2]" ;;
  gated) part gated sdlora '["sdlora_random","sdlora_joint"]' "[0,1,2]" ;;
  baselines) part baselines naive '["lwf","replay","l2p"]' "[0]" ;;
  ewc) part ewc ewc "[]" "[0]" ;;
  cumulative) part cumulative cumulative "[]" "[0]" ;;
  replay) part replay replay "[]" "[1,2]" ;;
  peers) part peers simplecil '["ranpac"]' "[0,1,2]" ;;
  growth_gain) part growth_gain sdlora "[]" "[0,1,2]" --set sdlora.growth=gain ;;
  growth_patience)
    part growth_patience sdlora "[]" "[0,1,2]" --set sdlora.growth=gain --set sdlora.prune_patience=3 ;;
  growth_phase1) part growth_phase1 sdlora "[]" "[0,1,2]" --set sdlora.growth=phase1 ;;
  table) table ;;
  *) echo "unknown part $PART: plain, variants, gated, baselines, ewc, cumulative, replay, peers," \
    "growth_gain, growth_patience, growth_phase1 or table" >&2; exit 2 ;;
esac
