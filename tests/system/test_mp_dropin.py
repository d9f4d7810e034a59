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
    the two running tasks finish when let go, and all four finished results are kept. (Items 0
    and 1 return at once, 2 to 7 wait to be let go: the Ctrl-C comes once two of those run,
    whichever two the scheduler started.)"""
    blocking = range(2, 8)
    with subprocess.Popen(
        [sys.executable, str(SCRIPT), "drain", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as proc:
        try:
            deadline = time.monotonic() + TIMEOUT
            while sum((tmp_path / f"started-{i}").exists() for i in blocking) < 2:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "two tasks never ran at once"
                time.sleep(0.005)
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
    started = [i for i in range(8) if (tmp_path / f"started-{i}").exists()]
    assert len(started) == 4 and started[:2] == [0, 1], started  # no third one started
    assert report["completed"] == {str(i): i * i for i in started}, report
    assert "Traceback" not in err.decode(), err.decode()


def _wait_for(folder: Path, names: list[str], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not all((folder / name).exists() for name in names):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{names} never appeared"
        time.sleep(0.005)
