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
# One chunk of all four items: item 3 waits behind item 2 in the same worker.
CHUNKED = ["map_async_chunk", "map_chunk"]


@pytest.mark.parametrize("mode", MODES + CHUNKED)
def test_ctrl_c_stops_at_once_and_keeps_what_finished(tmp_path: Path, mode: str) -> None:
    blocking = (2,) if mode in CHUNKED else (2, 3)
    with subprocess.Popen(
        [sys.executable, str(SCRIPT), mode, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as proc:
        try:
            _wait_for(tmp_path, [f"started-{i}" for i in blocking], proc)
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


def test_drain_lets_the_running_tasks_finish_and_keeps_them(tmp_path: Path) -> None:
    """``on_interrupt="drain"`` through the stock API: after the Ctrl-C, nothing new starts,
    the two running tasks finish when let go, and all four finished results are kept."""
    with subprocess.Popen(
        [sys.executable, str(SCRIPT), "drain", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as proc:
        try:
            _wait_for(tmp_path, ["started-2", "started-3"], proc)
            os.killpg(proc.pid, signal.SIGINT)
            _wait_for(tmp_path, ["draining"], proc)
            (tmp_path / "release").touch()
            out, err = proc.communicate(timeout=EXIT_GUARD)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err.decode()
    report = json.loads(out.decode().strip().splitlines()[-1])
    assert report.get("exc") == "Interrupted", report
    assert sorted(report["completed"].values()) == [0, 1, 4, 9], report
    assert not any((tmp_path / f"started-{i}").exists() for i in range(4, 8))
    assert "Traceback" not in err.decode(), err.decode()


def _wait_for(folder: Path, names: list[str], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not all((folder / name).exists() for name in names):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{names} never appeared"
        time.sleep(0.005)
