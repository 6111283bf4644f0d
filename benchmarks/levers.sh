#!/usr/bin/env bash
# Screening of the levers that could make SD-LoRA's adapters pay on the study's stream (issue
# "Adapters must matter"). Every probe: validation split (50 training images per class held out; no
# test image is read), seed 0, plain SD-LoRA against the head-only control at the same settings.
# Queues a and b: the first 30 classes in 3 experiences; queue c (one-*): the first 10 classes in
# one experience, whether adaptation pays within a task at all (queue e: at 10 epochs). Queues run
# one thread each. Queue f (all-*): the whole stream, 100 classes in 10 experiences.
# Usage: bash benchmarks/levers.sh DATA_ROOT [QUEUE]   (QUEUE a to f; default a and b;
# "collect" copies the finished probes to benchmarks/results/levers/)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/records.sh
PY=${PY:-.venv/bin/python}
DATA=${1:?usage: bash $0 DATA_ROOT (the cl/ split of Tiny-ImageNet) [a|b]}
OUT=${OUT:-runs/levers}

probe() {  # probe NAME [--set ...]
  local name=$1; shift
  [ -f "$OUT/$name/metrics.json" ] && return 0
  local resume=()
  [ -d "$OUT/$name" ] && resume=(--resume "$OUT/$name")
  if [ ${#resume[@]} -gt 0 ]; then "$PY" -m avalanche_sdlora.run "${resume[@]}"; return; fi
  "$PY" -m avalanche_sdlora.run --config exps/tiny_imagenet.json --output "$OUT/$name" \
    --set benchmark.root="$DATA" --set benchmark.validation_per_class=50 \
    --set benchmark.num_classes=30 --set benchmark.n_experiences=3 \
    --set experiment.strategy=sdlora_plain --set experiment.compare=head_only \
    --set experiment.seeds=[0] --set experiment.workers=1 --set experiment.threads=1 "$@" \
    > "$OUT/$name.log" 2>&1
}

ADAM=(--set sdlora.optimizer=adam --set sdlora.lr=3e-3 --set sdlora.head_lr=1e-3 --set sdlora.alpha_lr=1e-2)
SGD01=(--set sdlora.lr=0.1 --set sdlora.head_lr=0.01)

queue_a() {
  probe sgd-0.01
  probe sgd-0.1 "${SGD01[@]}"
  probe adam-3e-3 "${ADAM[@]}"
  probe sgd-0.1-6ep "${SGD01[@]}" --set training.epochs=6
}
queue_b() {
  probe invert-sgd-0.01 --set benchmark.rendition=invert
  probe contour-sgd-0.01 --set benchmark.rendition=contour
  probe crop35-sgd-0.1 "${SGD01[@]}" --set benchmark.crop_scale=[0.35,1.0]
}

ONE=(--set benchmark.num_classes=10 --set benchmark.n_experiences=1 "${SGD01[@]}")
queue_c() {
  for rendition in solarize posterize contour invert grayscale; do
    probe "one-$rendition-sgd-0.1" "${ONE[@]}" --set benchmark.rendition=$rendition
  done
}

queue_d() {
  probe one-lowres-sgd-0.1 "${ONE[@]}" --set benchmark.rendition=lowres
  probe lowres-sgd-0.1 --set benchmark.rendition=lowres "${SGD01[@]}"
  probe contour-sgd-0.1 --set benchmark.rendition=contour "${SGD01[@]}"
}

queue_e() {
  probe one-natural-10ep-sgd-0.1 "${ONE[@]}" --set training.epochs=10
  probe one-natural-10ep-r32-sgd-0.1 "${ONE[@]}" --set training.epochs=10 --set sdlora.rank=32
  probe one-contour-10ep-sgd-0.1 "${ONE[@]}" --set training.epochs=10 --set benchmark.rendition=contour
}

ALL=(--set benchmark.num_classes=100 --set benchmark.n_experiences=10)
queue_f() {
  probe all-contour-sgd-0.01 "${ALL[@]}" --set benchmark.rendition=contour
  probe all-contour-sgd-0.1 "${ALL[@]}" --set benchmark.rendition=contour "${SGD01[@]}"
}

collect() {  # each finished probe's metrics and config, and the table, into benchmarks/results/levers
  local dest=benchmarks/results/levers
  collect_runs "$OUT" "$dest" "$DATA" config.json
  "$PY" benchmarks/lever_table.py "$dest"/*/metrics.json > "$dest/table.md"
}

mkdir -p "$OUT"
case "${2:-both}" in
  a) queue_a ;;
  b) queue_b ;;
  c) queue_c ;;
  d) queue_d ;;
  e) queue_e ;;
  f) queue_f ;;
  collect) collect; cat benchmarks/results/levers/table.md; exit 0 ;;
  *) queue_a & queue_b & wait ;;
esac
"$PY" benchmarks/lever_table.py "$OUT"/*/metrics.json > "$OUT/table.md"
cat "$OUT/table.md"
