"""A task busy in Python code (no sleep, no read: nothing that a signal interrupts) stops at
Ctrl-C through its worker's SIGTERM handler, long before the SIGKILL that comes 0.5 s later.

Python 3.13 does not run a signal's handler at the next bytecode in a process forked from a
thread other than the main one, which is every fork-method worker: the worker relays the
signal to its main thread itself (``_worker._start_signal_relay``). Without that, this test
fails on 3.13 with fork: the stop takes the full 0.5 s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cleanbreak

from ._harness import METHODS, record, session_of

GUARD = 60.0  # seconds: only a deadlock guard
# The SIGKILL of a worker that did not stop comes STOP_GRACE (0.5 s) after the SIGTERM.
WITHIN = 0.3

SCRIPT = """
import json, os, sys, time
import cleanbreak

def busy(i):
    os.write(1, f"started {i}\\n".encode())
    x = 0
    while True:  # pure Python: no call that a signal would interrupt
        x += 1

if __name__ == "__main__":
    try:
        cleanbreak.map(busy, range(2), workers=2, chunksize=1, mp_context=sys.argv[1])
    except cleanbreak.Interrupted:
        print(json.dumps({"caught": time.monotonic()}), flush=True)
"""


@pytest.mark.parametrize("method", METHODS)
def test_ctrl_c_stops_a_task_busy_in_python_code_at_once(tmp_path: Path, method: str) -> None:
    script = tmp_path / "busy.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(cleanbreak.__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, str(script), method],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        started: set[str] = set()
        while len(started) < 2:
            line = proc.stdout.readline()
            assert line.startswith("started"), line
            started.add(line.split()[1])
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=GUARD)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=GUARD)
        for p in session_of(proc.pid):
            p.kill()
    assert proc.returncode == 0, err
    took = json.loads(out.strip().splitlines()[-1])["caught"] - sent
    record(f"busy task: Ctrl-C to Interrupted, {method} (ms)", took * 1000)
    assert took < WITHIN, f"Interrupted {took * 1000:.0f} ms after Ctrl-C: SIGKILL, not SIGTERM"
