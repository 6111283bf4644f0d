"""Wall time of the demo on 2 CPU cores: 1 process x 2 threads against torchrun's 2 processes x 1 thread.

Runs ``exps/demo.json`` (SD-LoRA and Naive, seed 0) ``--repeats`` times each way, interleaved, and
writes the medians, their ratio and the accuracy difference between the two to ``--out``:

    python benchmarks/ddp.py [--repeats 3] [--out benchmarks/results/ddp.md] [-- --set key=value ...]

Arguments after ``--`` go to both runs (``--set training.epochs=1`` for a shorter demo,
``--set experiment.seeds=[0,1,2]`` for the accuracy difference over several seeds: the table then
gives the mean over the seeds and each seed's difference).

Wall time is the whole command (start-up included); training is the run's own ``wall_seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
RUN = ["-m", "avalanche_sdlora.run", "--config", str(ROOT / "exps" / "demo.json")]
WAYS = {
    "1 process x 2 threads": ([sys.executable, *RUN], 2),
    "2 processes x 1 thread": (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *RUN],
        1,
    ),
}


def measure(command: list[str], threads: int, output: Path, extra: list[str]) -> tuple[float, dict]:
    """Seconds the command took, and its ``metrics.json``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    command = [*command, *extra, "--output", str(output), "--set", f"experiment.threads={threads}"]
    began = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - began, json.loads((output / "metrics.json").read_text())


def report(
    times: dict[str, list[float]], runs: dict[str, list[dict]], load: list[float], extra: list[str]
) -> str:
    one, two = WAYS
    separator = ["--"] if extra else []
    call = " ".join(
        ["python benchmarks/ddp.py", f"--repeats {len(times[one])}", *separator, *extra]
    )
    lines = [
        f"# Demo on 2 CPU cores: {one} against {two}",
        "",
        f"`{call}`: `exps/demo.json` (SD-LoRA and Naive, 5 experiences of 2 digits, global "
        f"batch 32), medians of {len(times[one])} interleaved runs.",
        "",
        "| | wall time, whole command (s) | run's own wall time (s) |",
        "|---|---|---|",
    ]
    own = {way: [m["wall_seconds"] for m in runs[way]] for way in WAYS}
    for way in WAYS:
        lines.append(
            f"| {way} | {statistics.median(times[way]):.1f} | {statistics.median(own[way]):.1f} |"
        )
    lines += [
        f"| ratio (2 processes / 1) | "
        f"{statistics.median(times[two]) / statistics.median(times[one]):.2f} | "
        f"{statistics.median(own[two]) / statistics.median(own[one]):.2f} |",
        "",
        "| method | metric | seeds | 1 process | 2 processes | difference (points) | per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, entry in runs[one][0]["methods"].items():
        seeds = list(entry["seeds"])
        for metric in ("last_accuracy", "average_incremental_accuracy"):
            a, b = (
                [runs[way][0]["methods"][method]["seeds"][seed][metric] for seed in seeds]
                for way in WAYS
            )
            each = ", ".join(f"{y - x:+.2f}" for x, y in zip(a, b, strict=True))
            mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
            lines.append(
                f"| {method} | {metric} | {', '.join(seeds)} | {mean_a:.2f} | {mean_b:.2f} | "
                f"{mean_b - mean_a:+.2f} | {each} |"
            )
    same = all(_accuracies(r) == _accuracies(runs[way][0]) for way in WAYS for r in runs[way])
    lines += [
        "",
        f"Accuracies identical across repeats of each way: {same}. Load average (1 min) at the "
        f"start and end: {load[0]:.2f}, {load[1]:.2f}.",
        "",
    ]
    return "\n".join(lines)


def _accuracies(metrics: dict) -> dict:
    return {
        (m, seed): report["accuracy_matrix"]
        for m, e in metrics["methods"].items()
        for seed, report in e["seeds"].items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ddp.md")
    args, extra = parser.parse_known_args()
    extra = extra[1:] if extra[:1] == ["--"] else extra
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for index, (way, (command, threads)) in enumerate(WAYS.items()):
                output = Path(folder) / f"{index}-{repeat}"
                seconds, metrics = measure(command, threads, output, extra)
                times[way].append(seconds)
                runs[way].append(metrics)
                print(f"{way}, repeat {repeat}: {seconds:.1f} s", flush=True)
    load.append(os.getloadavg()[0])
    args.out.write_text(report(times, runs, load, extra))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
