"""No shared-memory segment outlives its pool when the parent is interrupted or killed, even
one that was sent to a worker that never read it (issue 4, part 3). The other cases (normal
finish, a worker's death) are in ``tests/test_shm.py``."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from cleanbreak import _shm
from tests import tasks

from ._harness import EXIT_GUARD, METHODS, ORPHAN_GUARD, TIMEOUT

SCRIPT = Path(__file__).parent / "scripts" / "shm_child.py"


def _segments(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir(_shm.SHM_DIR) if n.startswith(prefix))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_no_segment_is_left_when_the_parent_stops_or_dies(
    tmp_path: Path, method: str, how: str
) -> None:
    started = str(tmp_path / "started")
    with open(tmp_path / "stderr", "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), method, started],
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
        assert ready, "the child did not start its pool"
        info = json.loads(proc.stdout.readline())
        prefix, workers = info["prefix"], [psutil.Process(p) for p in info["pids"]]
        sent = f"{prefix}{proc.pid}-"
        # Handshakes: the worker runs the first item, and the second one's segment exists.
        assert tasks.wait_for_path(started), "the first task did not start"
        assert tasks.wait_for_condition(
            lambda: any(n.startswith(sent) for n in _segments(prefix))
        ), "the large argument was not sent ahead"

        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        elif how == "sigterm":
            os.kill(proc.pid, signal.SIGTERM)
        else:
            os.kill(proc.pid, signal.SIGKILL)
        status = proc.wait(EXIT_GUARD)
        assert status == (-signal.SIGKILL if how == "sigkill" else 130), status
        _gone, alive = psutil.wait_procs(workers, timeout=ORPHAN_GUARD)
        assert alive == [], f"workers left: {alive}"
        assert _segments(prefix) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
