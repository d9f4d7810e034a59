"""``cleanbreak demo``, the main job, driven as a user at a terminal would: Ctrl-C to its
process group, SIGTERM, a bad option, and the run after a Ctrl-C, which resumes."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ._harness import session_of

GUARD = 40.0  # seconds: only a deadlock guard


@pytest.fixture(autouse=True)
def _journals_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo keeps its journal under $XDG_CACHE_HOME: a folder of this test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cleanbreak", "demo", *args],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_progress(proc: subprocess.Popen[str]) -> str:
    """Handshake: read stderr until the first progress line, which comes once results have
    arrived (so workers are up and tasks are running)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + GUARD
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = proc.stderr.readline()
        if line.startswith("blocks: ") and " done" in line:
            return line
        if not line:
            break
    pytest.fail(f"no progress line from the demo (exit status {proc.poll()})")


_session = session_of


@pytest.mark.parametrize(
    ("sig", "to_group", "status"),
    [(signal.SIGINT, True, 130), (signal.SIGINT, False, 130), (signal.SIGTERM, False, 143)],
    ids=["ctrl-c-to-group", "sigint-to-parent", "sigterm-to-parent"],
)
def test_demo_stops_at_once_and_reports_what_it_kept(
    sig: signal.Signals, to_group: bool, status: int
) -> None:
    proc = _start("--blocks", "100", "--workers", "2")
    try:
        _wait_for_progress(proc)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)]
        if to_group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=GUARD)
        assert proc.returncode == status, err
        assert "Traceback" not in err
        report = out.strip().splitlines()[-1]
        assert report.startswith(f"Stopped by {sig.name}"), out
        kept = int(report.split("kept ")[1].split(" of ")[0])
        assert 10 <= kept < 100, report  # the progress line said 10 were done
        assert "every worker has exited" in report
        assert report.endswith("Run the same command to go on from here.")
        summary = [line for line in err.splitlines() if line.startswith("interrupted: ")]
        assert summary, err
        _gone, alive = psutil.wait_procs(workers, timeout=GUARD)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not _session(proc.pid)
        if not to_group:
            return  # (the resume is the same after each signal: CI runs it once)
        # Run it again: it resumes from the journal, and says so.
        again = _start("--blocks", "100", "--workers", "2")
        out2, err2 = again.communicate(timeout=GUARD * 3)
        assert again.returncode == 0, err2
        lines = out2.strip().splitlines()
        assert lines[1].startswith(f"Resuming: the journal has {kept} of 100 blocks done"), out2
        assert lines[-1].startswith("Done: "), out2
        assert f"({kept} of them from the journal)" in err2, err2
    finally:
        for leftover in _session(proc.pid):
            leftover.kill()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_demo_runs_to_the_end() -> None:
    proc = _start("--blocks", "6", "--workers", "2")
    out, err = proc.communicate(timeout=GUARD)
    assert proc.returncode == 0, err
    assert out.strip().splitlines()[-1].startswith("Done: ")


@pytest.mark.parametrize("bad", [["--workers", "0"], ["--blocks", "x"], ["--on-interrupt", "no"]])
def test_bad_options_get_one_line_and_no_traceback(bad: list[str]) -> None:
    proc = _start(*bad)
    out, err = proc.communicate(timeout=GUARD)
    assert proc.returncode == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cleanbreak demo: error: ") and "--help" in lines[0]
