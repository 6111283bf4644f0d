"""Which process owns a run folder, and which run each of its files belongs to.

Next to a run's files (:mod:`~avalanche_sdlora.runner.run_folder`) the runner keeps:

- ``.avalanche_sdlora_run``, the marker: its format, when the run started, and the sha256 of the run's
  ``config.json`` (canonical JSON), with the earlier hashes of a config a resume changed. A new run
  starts only in a new or empty folder, so the runner never writes into a folder that holds
  anything else.
- ``.lock``: the pid and host of the one process that writes the folder, and since when; created
  atomically when the run starts, removed when it ends.
- provenance: every ``progress.json`` (key ``provenance``) and ``checkpoint.pkl`` (a
  ``provenance.json`` record in its zip archive, so both are renamed into place together) names the
  method, seed and config hash of the run that wrote it, and the versions that wrote it.

Standard library only: the command line checks all of this before any heavy import.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import zipfile
from collections.abc import Mapping
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "LOCK",
    "MARKER",
    "PROVENANCE_RECORD",
    "checkpoint_provenance",
    "config_sha256",
    "new_folder_problem",
    "provenance",
    "record_config",
    "release_lock",
    "resume_problems",
    "take_lock",
]

MARKER, LOCK = ".avalanche_sdlora_run", ".lock"
MARKER_FORMAT = 1
PROVENANCE_RECORD = "provenance.json"
"""The record, in a checkpoint's zip archive, that holds its provenance."""

_DISTRIBUTIONS = ("avalanche-sdlora", "torch", "avalanche-lib")


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def config_sha256(config: Mapping[str, Any]) -> str:
    """The sha256 of ``config`` as canonical JSON (sorted keys, no spaces): the same for a resolved
    config and for the ``config.json`` it was written to."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "not installed"


def provenance(method: str, seed: int, config: Mapping[str, Any]) -> dict[str, Any]:
    """What a run's ``progress.json`` and ``checkpoint.pkl`` record about the run that wrote them."""
    return {
        "method": method,
        "seed": seed,
        "config_sha256": config_sha256(config),
        "versions": {name: _version(name) for name in _DISTRIBUTIONS},
    }


def checkpoint_provenance(path: Path) -> dict[str, Any] | None:
    """The provenance record of the checkpoint ``path``; None when it has none (written before
    provenance) or cannot be read (:func:`~avalanche_sdlora.runner.preflight.check_run_files` names
    an unreadable one)."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(
                (n for n in archive.namelist() if n.endswith(f"/{PROVENANCE_RECORD}")), None
            )
            return None if name is None else json.loads(archive.read(name))
    except (OSError, ValueError, zipfile.BadZipFile):
        return None


def _progress_provenance(path: Path) -> dict[str, Any] | None:
    """The provenance of a ``progress.json``; None as for :func:`checkpoint_provenance`."""
    try:
        return json.loads(path.read_text()).get("provenance")
    except (OSError, ValueError):
        return None


def _read_marker(run_dir: Path) -> dict[str, Any] | None:
    """The marker of ``run_dir``; None for a folder without one (a run from before markers);
    ``ValueError`` for one that is not the runner's."""
    path = run_dir / MARKER
    if not path.exists():
        return None
    marker = json.loads(path.read_text())
    if (
        not isinstance(marker, dict)
        or not {"config_sha256", "earlier_config_sha256"} <= marker.keys()
    ):
        raise ValueError("not a marker the runner wrote")
    return marker


def record_config(run_dir: Path, config: Mapping[str, Any]) -> None:
    """Write ``config.json`` and the marker with its hash, in the order that keeps a crash between
    the two from looking like a hand edit: a new run's config first (a config without a marker
    resumes as a run from before markers), a changed config after the marker, which keeps the hash
    before it, accepted by :func:`resume_problems`."""
    from avalanche_sdlora.runner.outputs import write_json  # imports Avalanche: only when running

    digest, config_file, marker = (
        config_sha256(config),
        run_dir / "config.json",
        _read_marker(run_dir),
    )
    if marker is None:
        write_json(config_file, config)
        fresh = {"format": MARKER_FORMAT, "created": _now(), "config_sha256": digest}
        write_json(run_dir / MARKER, {**fresh, "earlier_config_sha256": []})
    elif marker["config_sha256"] != digest:
        earlier = [*marker["earlier_config_sha256"], marker["config_sha256"]]
        write_json(
            run_dir / MARKER, {**marker, "config_sha256": digest, "earlier_config_sha256": earlier}
        )
        write_json(config_file, config)


def new_folder_problem(run_dir: Path) -> str | None:
    """Why a new run cannot start in ``run_dir``, which the runner then never writes into: it holds a
    run, or anything else; None for a new or empty folder (a lock alone counts as empty: it then
    names the run that is starting there)."""
    try:
        run_dir.exists()
    except OSError as error:  # a name the file system cannot hold (over 255 bytes, say)
        return f"{run_dir} cannot be a folder here: {error.strerror}"
    if (run_dir / MARKER).exists() or (run_dir / "config.json").exists():
        return f"{run_dir} already holds a run; use --resume {run_dir} to continue it"
    if run_dir.exists() and not run_dir.is_dir():
        return f"{run_dir} is a file, not a folder; choose a new or empty folder for the run"
    if run_dir.exists() and any(entry.name != LOCK for entry in run_dir.iterdir()):
        return (
            f"{run_dir} is not empty and holds no run (it has no {MARKER}); choose a new or empty "
            "folder, so that nothing in it is overwritten"
        )
    return None


def _foreign(path: Path, origin: Mapping[str, Any], known: list[str] | None) -> str | None:
    """Why the file ``path``, with provenance ``origin``, belongs to another run than its folder's;
    ``known``: the hashes this run's config has had (None for a run from before markers)."""
    folder = path.parent
    way_out = (
        f"put back this run's own file, or delete {folder} to train that run again from its start"
    )
    method, seed = origin.get("method"), origin.get("seed")
    if (method, f"seed{seed}") != (folder.parent.name, folder.name):
        return (
            f"{path} belongs to another run: it was written by {method} seed {seed}, but sits in "
            f"the folder of {folder.parent.name} {folder.name}; {way_out}"
        )
    if known is not None and origin.get("config_sha256") not in known:
        return (
            f"{path} belongs to another run: it was written with other settings (config sha256 "
            f"{origin.get('config_sha256')}, which this run's config.json never had); {way_out}"
        )
    return None


def resume_problems(run_dir: Path) -> list[str]:
    """Why ``run_dir`` cannot be resumed as it is: a ``config.json`` edited by hand since the runner
    wrote it, and a ``progress.json`` or ``checkpoint.pkl`` of another run (method, seed or
    settings). Files from before markers and provenance are trusted as they are."""
    try:
        marker = _read_marker(run_dir)
    except ValueError as error:
        return [
            f"{run_dir / MARKER} is unreadable ({error}); delete it to resume without checking "
            f"{run_dir / 'config.json'} against the settings the run started with"
        ]
    problems, known = [], None
    if marker is not None:
        known = [*marker["earlier_config_sha256"], marker["config_sha256"]]
        try:
            digest = config_sha256(json.loads((run_dir / "config.json").read_text()))
        except (OSError, ValueError):
            digest = None  # an unreadable config.json is reported when it is read
        if digest is not None and digest not in known[-2:]:  # [-2]: a crash in record_config
            problems.append(
                f"config.json was edited by hand after the run started: {run_dir / 'config.json'} "
                f"no longer matches the sha256 recorded in {run_dir / MARKER}, so it would no "
                "longer say which settings trained the finished work; put the file back as the run "
                f"wrote it; to change settings use --resume {run_dir} --set key=value for the "
                "settings a resume may change, or start a new run"
            )
    for folder in sorted(run_dir.glob("*/seed*")):
        for path, origin in (
            (folder / "progress.json", _progress_provenance(folder / "progress.json")),
            (folder / "checkpoint.pkl", checkpoint_provenance(folder / "checkpoint.pkl")),
        ):
            problem = None if origin is None else _foreign(path, origin, known)
            if problem is not None:
                problems.append(problem)
    return problems


def _create_lock(lock: Path) -> None:
    """Create ``lock`` with this process's pid and host, or raise ``FileExistsError``; atomic."""
    handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}, file)
    except BaseException:
        lock.unlink(missing_ok=True)
        raise


def _running(owner: Mapping[str, Any]) -> bool:
    """Whether the lock's owner may still run: always for another host, which cannot be checked."""
    if owner["host"] != socket.gethostname():
        return True
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def take_lock(run_dir: Path, new_run: bool) -> str | None:
    """Make this process the one that writes ``run_dir`` (created if needed): None once it holds
    ``run_dir/.lock``, else why not. A stale lock (a process of this host that is gone) is taken
    over, with a note on stderr. A ``new_run`` checks :func:`new_folder_problem` again under the
    lock, since another run may have started there after the first check."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK
    try:
        _create_lock(lock)
    except FileExistsError:
        try:
            owner = json.loads(lock.read_text())
            pid, host, since = owner["pid"], owner["host"], owner["since"]
        except FileNotFoundError:  # its owner ended just now
            return take_lock(run_dir, new_run)
        except (ValueError, KeyError, TypeError) as error:
            return (
                f"{run_dir} is in use: {lock} exists but does not say by whom ({error}); another "
                f"run may be starting there; if none is, delete {lock}"
            )
        if _running(owner):
            return (
                f"{run_dir} is in use by another run: pid {pid} on {host}, since {since} ({lock}); "
                f"wait for it to end, or choose another folder; if that process is not a run, "
                f"delete {lock}"
            )
        print(
            f"note: took over the stale lock {lock} of pid {pid} on {host} (since {since}), which "
            "is no longer running",
            file=sys.stderr,
        )
        lock.unlink(missing_ok=True)
        return take_lock(run_dir, new_run)
    problem = new_folder_problem(run_dir) if new_run else None
    if problem is not None:
        release_lock(run_dir)
    return problem


def release_lock(run_dir: Path) -> None:
    """Remove ``run_dir/.lock`` if this process holds it (a folder removed since holds none)."""
    lock = run_dir / LOCK
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return
    if (owner.get("pid"), owner.get("host")) == (os.getpid(), socket.gethostname()):
        lock.unlink(missing_ok=True)
