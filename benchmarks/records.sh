# Sourced by the study's scripts: how a finished run's records are copied into benchmarks/results/.

# record_root CONFIG DATA_ROOT: the record names the project's default data folder, not this machine's
record_root() {
  sed -i "s|\"root\": \"$2\"|\"root\": \"data/tiny-imagenet-200/cl\"|" "$1"
}

# collect_runs RUNS DEST DATA_ROOT FILE...: every finished run folder RUNS/NAME (one with a
# metrics.json) into DEST/NAME, with its metrics.json and FILE... (config.json among them)
collect_runs() {
  local runs=$1 dest=$2 data=$3
  shift 3
  local run name file
  for run in "$runs"/*/metrics.json; do
    name=$(basename "$(dirname "$run")")
    mkdir -p "$dest/$name"
    for file in metrics.json "$@"; do
      cp "$(dirname "$run")/$file" "$dest/$name/"
    done
    record_root "$dest/$name/config.json" "$data"
  done
}
