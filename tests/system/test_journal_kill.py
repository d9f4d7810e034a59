"""The journal commits as soon as its writer is free: a parent killed with SIGKILL 50 ms after
results reached the caller has every one of them on disk, and the next run does not compute
them again. (A writer that waited to gather a batch, up to 0.1 s, lost them.)"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cleanbreak

from ._harness import EXIT_GUARD, METHODS, TIMEOUT

SCRIPT = Path(__file__).parent / "scripts" / "journal_kill_child.py"


def _read_line(proc: subprocess.Popen[bytes]) -> str:
    """The child's next line, waited for at most TIMEOUT (a deadlock guard)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
    assert ready, f"the child said nothing in {TIMEOUT} s"
    return proc.stdout.readline().decode().strip()


@pytest.mark.parametrize(
    ("n", "chunksize", "method", "big"),
    [
        (1, 1, METHODS[0], False),
        (10, 1, METHODS[0], False),
        (200, 25, METHODS[0], False),
        (10, 1, "fork", False),
        (6, 1, METHODS[0], True),
    ],
)
def test_results_are_on_disk_50_ms_after_they_arrived(
    tmp_path: Path, n: int, chunksize: int, method: str, big: bool
) -> None:
    """With ``big``, results of 2 MiB, each in a file beside the journal: every row names a
    complete file."""
    journal = tmp_path / "run.sqlite"
    args = [str(journal), str(n), str(chunksize), method, *(["big"] if big else [])]
    with subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        stdout=subprocess.PIPE,
        start_new_session=True,
    ) as proc:
        _kill_after_results(proc, n)
    status = cleanbreak.Journal.status(journal)
    assert (status.done, status.failed) == (n, 0), f"{n - status.done} of {n} results lost"
    if big:
        with contextlib.closing(sqlite3.connect(journal)) as conn:
            named = [row[0] for row in conn.execute("SELECT value FROM outcomes")]
        values = []
        for value in named:
            assert value.startswith(b"cleanbreak-file:"), value[:40]
            path = Path(f"{journal}.d") / value.removeprefix(b"cleanbreak-file:").decode()
            values.append(pickle.loads(path.read_bytes()))
        assert sorted(values) == [bytes([x]) * (2 << 20) for x in range(n)]


def _kill_after_results(proc: subprocess.Popen[bytes], n: int) -> None:
    try:
        assert _read_line(proc) == f"got {n}"
        time.sleep(0.05)  # the moment under test, not a wait for something
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(EXIT_GUARD) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
