"""Measurement 8c: where the journal keeps a large result, three ways, side by side.

Issue 20 asked to store large results out of SQLite's B-tree, as files beside the journal or
with SQLite's incremental blob I/O, and to measure both. This writes the same results (50 MB
numpy arrays, or ``bytes`` without numpy) from one thread, each made durable as the journal
makes a result (its row committed, in WAL mode, with the journal's own connection settings):

- **files beside the journal** (what cleanbreak does): the result is pickled straight into a
  file under a temporary name (no copy of the array into a pickle first), renamed into place,
  and a row naming it committed;
- **SQLite incremental blob I/O** (``Connection.blobopen``, Python 3.11+): the pickle is made
  (one copy: the blob's length must be known before it is written), a row with a
  ``zeroblob`` of that length inserted, the pickle written into it, and the row committed, in
  one transaction;
- **in the B-tree**: the pickle as the row's value (what the journal did before issue 20).

Then every result is read back, as a resume does. Each way runs in a fresh temporary folder on
the same filesystem, repetitions alternate the three, and the table shows medians. This is the
cost of the storage alone, in one process; measurement 8b has the whole job, where the workers
write the files in parallel.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from common import Section, Settings, fmt_ratio, median, progress

MB = 1_000_000
SIZE = 50 * MB
COUNT, COUNT_QUICK = 8, 4
WAYS = ("files", "blob", "btree")
LABELS = {
    "files": "files beside the journal (cleanbreak)",
    "blob": "SQLite incremental blob I/O",
    "btree": "SQLite B-tree (the value in the row)",
}


def _values(n: int) -> list[Any]:
    try:
        import numpy
    except ImportError:
        return [bytes([i]) * SIZE for i in range(n)]
    return [numpy.full(SIZE // 8, float(i)) for i in range(n)]


def _connect(path: str) -> Any:
    from cleanbreak._journal import _connect as journal_connect

    conn = journal_connect(path)
    conn.execute("CREATE TABLE IF NOT EXISTS t (key INTEGER PRIMARY KEY, value BLOB)")
    return conn


class _FileOut:
    """Writes what the pickler hands it straight to a descriptor (as cleanbreak's worker)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        while view:
            view = view[os.write(self.fd, view) :]
        return n


def _write_files(folder: str, conn: Any, values: list[Any]) -> None:
    for key, value in enumerate(values):
        tmp = os.path.join(folder, f".{key}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            pickle.Pickler(_FileOut(fd), protocol=5).dump(value)
        finally:
            os.close(fd)
        name = f"{key}.pickle"
        os.replace(tmp, os.path.join(folder, name))
        with conn:
            conn.execute("INSERT INTO t VALUES (?, ?)", (key, name.encode()))


def _write_blob(folder: str, conn: Any, values: list[Any]) -> None:
    for key, value in enumerate(values):
        data = pickle.dumps(value, protocol=5)
        with conn:
            conn.execute("INSERT INTO t VALUES (?, zeroblob(?))", (key, len(data)))
            with conn.blobopen("t", "value", key) as blob:
                blob.write(data)


def _write_btree(folder: str, conn: Any, values: list[Any]) -> None:
    for key, value in enumerate(values):
        with conn:
            conn.execute("INSERT INTO t VALUES (?, ?)", (key, pickle.dumps(value, protocol=5)))


def _read(way: str, folder: str, conn: Any, n: int) -> list[Any]:
    out = []
    for key in range(n):
        if way == "files":
            (name,) = conn.execute("SELECT value FROM t WHERE key = ?", (key,)).fetchone()
            with open(os.path.join(folder, name.decode()), "rb") as f:
                out.append(pickle.load(f))
        elif way == "blob":
            with conn.blobopen("t", "value", key, readonly=True) as blob:
                out.append(pickle.loads(blob.read()))
        else:
            (data,) = conn.execute("SELECT value FROM t WHERE key = ?", (key,)).fetchone()
            out.append(pickle.loads(data))
    return out


WRITERS: dict[str, Callable[[str, Any, list[Any]], None]] = {
    "files": _write_files,
    "blob": _write_blob,
    "btree": _write_btree,
}


def _once(way: str, values: list[Any]) -> tuple[float, float]:
    folder = tempfile.mkdtemp(prefix="cb-storage-")
    try:
        conn = _connect(os.path.join(folder, "journal.sqlite"))
        try:
            start = time.perf_counter()
            WRITERS[way](folder, conn, values)
            wrote = time.perf_counter() - start
            start = time.perf_counter()
            back = _read(way, folder, conn, len(values))
            read = time.perf_counter() - start
            del back
        finally:
            with contextlib.suppress(Exception):
                conn.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return wrote, read


def run_storage(settings: Settings) -> Section:
    n = COUNT_QUICK if settings.quick else COUNT
    reps = settings.repetitions(3, 1)
    values = _values(n)
    total = n * SIZE
    found: dict[str, tuple[list[float], list[float]]] = {way: ([], []) for way in WAYS}
    for rep in range(reps):
        for way in WAYS[rep % 3 :] + WAYS[: rep % 3]:
            progress(f"storage: {way}, repetition {rep + 1} of {reps}")
            wrote, read = _once(way, values)
            found[way][0].append(wrote)
            found[way][1].append(read)
    files_write = median(found["files"][0])
    section = Section(
        name="storage",
        title=f"8c. Where a large result is kept: {n} results of {SIZE // MB} MB, three ways",
        intro=(
            f"{n} results of {SIZE // MB} MB ({total // MB:,} MB) written from one thread, each "
            "with its row committed (WAL mode, the journal's connection settings), then read "
            f"back; a fresh folder in {tempfile.gettempdir()} per run, median of {reps}. "
            "Ratio: the time against the files' (above 1: slower than files)."
        ),
        header=["where", "write and commit", "MB/s", "vs files", "read back", "MB/s"],
    )
    for way in WAYS:
        wrote = median(found[way][0])
        read = median(found[way][1])
        section.rows.append(
            [
                LABELS[way],
                f"{wrote * 1000:,.0f} ms",
                f"{total / MB / wrote:,.0f}",
                fmt_ratio(wrote / files_write),
                f"{read * 1000:,.0f} ms",
                f"{total / MB / read:,.0f}",
            ]
        )
    section.notes.append(
        "Files are written straight from the array's memory; blob I/O needs the pickle's "
        "length before it writes, so it pickles into memory first (one more copy), and SQLite "
        "writes each page of the blob to the WAL and again into the file at the checkpoint."
    )
    return section
