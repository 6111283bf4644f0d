"""Command line: ``python -m avalanche_sdlora.run --config exps/c100.json``.

Exit codes: 0 success, 2 bad input (reported before any work, no run folder left), 1 a failure while
running (the run folder keeps what finished; ``--resume`` continues it).
"""

from __future__ import annotations

import argparse
import errno
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from avalanche_sdlora.runner import ownership
from avalanche_sdlora.runner.config import (
    FREE_FORM_SETTINGS,
    METHODS,
    ConfigError,
    concerns,
    describe_schema,
    load_config,
    methods_of,
    read_config,
)
from avalanche_sdlora.runner.data_path import data_path

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m avalanche_sdlora.run",
        description="Run a class-incremental SD-LoRA experiment (and Avalanche baselines).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="settings (--set key=value), with their defaults:\n  "
        + "\n  ".join(describe_schema()),
    )
    parser.add_argument("--config", type=Path, help="JSON experiment config (see exps/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.SUB=VALUE",
        help="override one setting, typed by the schema (repeatable), e.g. --set training.epochs=1",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="run folder (default: runs/<experiment.name>, or runs/<name>-<time> if that exists)",
    )
    parser.add_argument("--seed", type=int, help="run this one seed (sets experiment.seeds)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (sets experiment.device)")
    parser.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR")
    parser.add_argument(
        "--compare",
        metavar="METHODS",
        help=f"comma-separated methods to run too: {','.join(METHODS)} (sets experiment.compare; "
        "sdlora_joint: gate trained in one joint phase, sdlora_plain: gate off)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and plan; train nothing"
    )
    return parser


def _resolve(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The config and every problem found in it and in the options; raises ``ConfigError`` only
    when there is no config to check."""
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"experiment.seeds=[{args.seed}]")
    if args.device is not None:
        overrides.append(f"experiment.device={args.device}")
    if args.compare is not None:
        methods = [m.strip() for m in args.compare.split(",") if m.strip()]
        overrides.append(f"experiment.compare={json.dumps(methods)}")
    if args.resume is not None:
        saved, conflicts = args.resume / "config.json", _resume_conflicts(args)
        if not saved.is_file():
            raise ConfigError(
                [*conflicts, f"--resume {args.resume}: no config.json there (not a run folder)"]
            )
        config, problems = read_config(saved, overrides, recorded=True)
        problems += conflicts + ownership.resume_problems(args.resume)
        changed = [
            f"{path}: {old!r} -> {new!r}"
            for path, old, new in _changed_settings(load_config(saved, recorded=True), config)
            if path not in RESUME_MAY_CHANGE
        ]
        if changed and _finished_experiences(args.resume):
            problems.append(
                f"--resume {args.resume}: these changes would alter finished work, so they are "
                f"refused (start a new run instead): {'; '.join(changed)}; a resume may change "
                f"only {', '.join(RESUME_MAY_CHANGE)}"
            )
        return config, problems
    if args.config is None:
        raise ConfigError(["--config is required (or --resume DIR)"])
    config, problems = read_config(args.config, overrides)
    taken = None if args.output is None else ownership.new_folder_problem(args.output)
    if taken is not None:
        problems.append(f"--output {taken}")
    return config, problems


def _resume_conflicts(args: argparse.Namespace) -> list[str]:
    """``--config`` and ``--output`` next to ``--resume``, which would ignore them: a run keeps its
    folder and its config."""
    conflicts = []
    if args.config is not None:
        conflicts.append(
            f"--config {args.config} cannot go with --resume {args.resume}: a resume continues "
            f"with the run's own {args.resume / 'config.json'}; leave out --config (--set "
            "key=value changes the settings a resume may change), or start a new run"
        )
    if args.output is not None:
        conflicts.append(
            f"--output {args.output} cannot go with --resume {args.resume}: a resume continues in "
            "the run's own folder; leave out --output, or copy the folder and resume the copy"
        )
    return conflicts


def _run_dir(args: argparse.Namespace, config: dict) -> Path:
    """The resumed folder, ``--output``, or a fresh ``runs/<experiment.name>``."""
    if args.resume is not None:
        return args.resume
    if args.output is not None:
        return args.output
    return _fresh_run_dir(Path("runs") / config["experiment"]["name"])


RESUME_MAY_CHANGE = (
    "experiment.compare",
    "experiment.seeds",
    "experiment.baseline_seeds",
    "experiment.workers",
    "experiment.threads",
    "experiment.device",
    "benchmark.num_workers",
)
"""Settings a resume may change: they add runs or move work, never alter a finished run."""


def _changed_settings(old: dict, new: dict, path: str = "") -> list[tuple[str, object, object]]:
    """``(dotted path, old value, new value)`` of every setting that differs."""
    changed = []
    for key in old.keys() | new.keys():
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key not in FREE_FORM_SETTINGS:
            changed += _changed_settings(a, b, f"{path}{key}.")
        elif a != b:
            changed.append((f"{path}{key}", a, b))
    return sorted(changed)


def _fresh_run_dir(default: Path) -> Path:
    """``runs/<name>``, or ``runs/<name>-<time>`` when that already holds a run."""
    if not default.exists():
        return default
    return default.with_name(f"{default.name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _plan(config: dict, run_dir: Path) -> str:

    b, t = config["benchmark"], config["training"]
    first = "" if b["initial_classes"] is None else f", the first of {b['initial_classes']} classes"
    return "\n".join(
        [
            f"run folder: {run_dir}",
            f"benchmark: {b['name']} ({b['root']}), {b['n_experiences']} experiences{first}",
            f"backbone: {config['backbone']['name']} ({config['backbone']['precision']})",
            f"methods: {', '.join(methods_of(config))}; seeds: {config['experiment']['seeds']}"
            f" (baselines: {config['experiment']['baseline_seeds'] or config['experiment']['seeds']})",
            f"training: {t['epochs']} epochs per experience, batch {t['batch_size']}",
            data_path(config).describe(),
        ]
    )


def _finished_experiences(run_dir: Path) -> int:
    """Experiences that some run in ``run_dir`` finished (its ``progress.json`` files)."""
    total = 0
    for progress in run_dir.glob("*/seed*/progress.json"):
        try:
            total += len(json.loads(progress.read_text()).get("eval_results", []))
        except (OSError, ValueError):
            continue
    return total


def _way_on(run_dir: Path, fresh: bool) -> str:
    """After a stop: ``--resume`` where finished work exists; else the new run folder is removed."""
    if run_dir.exists() and _finished_experiences(run_dir):
        return f"finished experiences are kept; continue with --resume {run_dir}"
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
        return "no experience had finished; the run folder was removed"
    return f"no experience had finished in {run_dir}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; under ``torchrun`` every process runs it and trains the run together."""
    args = _parser().parse_args(argv)
    try:
        config, problems = _resolve(args)
        from avalanche_sdlora import distributed  # heavy imports after the cheap checks
        from avalanche_sdlora.runner.preflight import preflight

        processes = distributed.launched_processes()
        if not concerns(problems, "experiment", "training.batch_size"):
            problems += distributed.launch_problems(config, processes)

        backbone = preflight(config, args.resume, problems, output=args.output)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    run_dir = _run_dir(args, config)
    if args.dry_run:
        print(json.dumps(config, indent=2))
        print(_plan(config, run_dir))
        return EXIT_OK
    from avalanche_sdlora.runner.experiment import run_experiment

    fresh = not run_dir.exists()
    if processes > 1:
        distributed.init_process_group(config["experiment"]["device"])
        # rank 0's folder: a time-stamped default name may differ by a second between ranks
        run_dir, fresh = distributed.share_from_main((run_dir, fresh))
    main_process = distributed.is_main_process()
    where = f" (rank {distributed.rank()} of {processes})" if processes > 1 else ""
    started, held = time.perf_counter(), False
    try:
        # one process writes a run folder: under torchrun rank 0 holds the lock for every rank
        refusal = ownership.take_lock(run_dir, args.resume is None) if main_process else None
        held = main_process and refusal is None
        if processes > 1:
            refusal = distributed.share_from_main(refusal)
        if refusal is not None:
            print(f"error: {refusal}", file=sys.stderr)
            return EXIT_BAD_INPUT
        run_experiment(config, run_dir, backbone)
    except KeyboardInterrupt:
        print(f"interrupted{where}", file=sys.stderr)
        if main_process:
            print(_way_on(run_dir, fresh), file=sys.stderr)
        return EXIT_FAILURE
    except Exception as error:  # a failure while running: keep what finished, say how to go on
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            print(
                f"error while running{where}: no space left on device for the run folder "
                f"{run_dir} ({error}); free some space on its disk first",
                file=sys.stderr,
            )
        else:
            print(f"error while running{where}: {type(error).__name__}: {error}", file=sys.stderr)
        if main_process:
            print(_way_on(run_dir, fresh), file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if held:
            ownership.release_lock(run_dir)
        if processes > 1:
            distributed.leave_process_group()
    if main_process:
        print((run_dir / "summary.md").read_text())
        print(f"done in {time.perf_counter() - started:.0f} s; results in {run_dir}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
