"""Files of a run folder: written atomically (a crash never leaves a half-written file behind), and
CSV logs that survive a resume."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from avalanche.logging import CSVLogger

__all__ = [
    "ResumableCSVLogger",
    "atomic_write",
    "trim_csv_logs",
    "write_csv",
    "write_json",
    "write_text",
]


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file: ``0o666`` less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill a temporary file beside ``path``, then rename it over ``path``.

    The file gets the usual permissions (``mkstemp`` would leave it readable by its owner only).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, _file_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda target: target.write_text(text))


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    """Strict JSON: non-finite numbers are written as ``null``."""
    write_text(path, json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


class ResumableCSVLogger(CSVLogger):
    """Avalanche's ``CSVLogger``, made safe for ``--resume``.

    The stock logger truncates its files when built and pickles open file handles, so a resumed run
    would lose the rows of the experiences before the checkpoint. This one keeps what the files
    already hold, appends to them, and pickles by path.
    """

    FILES = ("training_results.csv", "eval_results.csv")

    def __init__(self, log_folder: str | Path):
        folder = Path(log_folder)
        kept = {
            name: (folder / name).read_text() for name in self.FILES if (folder / name).exists()
        }
        super().__init__(str(folder))
        if kept:
            self._close()
            for name, text in kept.items():
                (folder / name).write_text(text)
            self._open()

    def _open(self) -> None:
        folder = Path(self.log_folder)
        self.training_file = open(folder / self.FILES[0], "a")  # noqa: SIM115 (the logger's lifetime)
        self.eval_file = open(folder / self.FILES[1], "a")  # noqa: SIM115

    def _close(self) -> None:
        self.training_file.close()
        self.eval_file.close()

    def __getstate__(self) -> dict:
        for handle in (self.training_file, self.eval_file):
            handle.flush()
        state = self.__dict__.copy()
        del state["training_file"], state["eval_file"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()


def trim_csv_logs(folder: Path, finished: int) -> None:
    """Drop the rows of experiences from ``finished`` on from a run's CSV logs.

    A run killed during an experience leaves that experience's rows behind; a resumed run trains it
    again, so they would appear twice. The files are rewritten in place, which keeps open handles
    (append mode) valid.
    """
    for name in ResumableCSVLogger.FILES:
        path = folder / name
        if not path.exists():
            continue
        header, *rows = path.read_text().splitlines(keepends=True)
        column = header.strip().split(",").index("training_exp")
        kept = [row for row in rows if int(row.split(",")[column]) < finished]
        if len(kept) < len(rows):
            with open(path, "r+") as handle:
                handle.write("".join([header, *kept]))
                handle.truncate()
