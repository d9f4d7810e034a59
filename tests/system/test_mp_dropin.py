"""``cleanbreak.multiprocessing.Pool`` keeps cleanbreak's promise through the stock API: the
classic "Ctrl-C and multiprocessing.Pool" code, with only its import changed, stops at Ctrl-C
(SIGINT to the process group, as a terminal sends it) within 0.5 s, with every finished result
kept and no worker traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ._harness import EXIT_GUARD, TIMEOUT

SCRIPT = Path(__file__).parent / "scripts" / "mp_child.py"
MODES = ["apply_async", "map_async", "map", "starmap", "imap", "imap_unordered", "imap_timeout"]


@pytest.mark.parametrize("mode", MODES)
def test_ctrl_c_stops_at_once_and_keeps_what_finished(tmp_path: Path, mode: str) -> None:
    with subprocess.Popen(
        [sys.executable, str(SCRIPT), mode, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as proc:
        try:
            deadline = time.monotonic() + TIMEOUT
            while not all((tmp_path / f"started-{i}").exists() for i in (2, 3)):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the blocking tasks never started"
                time.sleep(0.005)
            sent = time.monotonic_ns()
            os.killpg(proc.pid, signal.SIGINT)
            out, err = proc.communicate(timeout=EXIT_GUARD)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err.decode()
    report = json.loads(out.decode().strip().splitlines()[-1])
    assert report.get("exc") == "Interrupted", report
    stop_ms = (report["caught_ns"] - sent) / 1e6
    assert stop_ms < 500, f"Interrupted came {stop_ms:.0f} ms after the signal"
    assert "Traceback" not in err.decode(), err.decode()
    if mode == "apply_async":
        assert sorted(report["kept"]) == [0, 1]  # the finished AsyncResults still get()
    else:  # given to the loop's body, or in .completed
        kept = sorted([*report["seen"], *report["completed"].values()])
        assert kept == [0, 1], report
