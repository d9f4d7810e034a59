"""A pool used again after an ``Interrupted`` starts new workers, in a script too.

In a notebook a pool held in a variable lives on from cell to cell (``test_notebook.py``). In
a script, a ``with`` block ends at the ``Interrupted``, and so does its pool; a script that
catches the ``Interrupted`` inside the block and goes on gets the same pool with new workers,
and when the block ends, every worker is gone. Ctrl-C is sent as a terminal sends it: SIGINT to
the process group of a child started in a session of its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests.tasks import GUARD, wait_for_path

from ._harness import METHODS

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import cleanbreak
    from tests.tasks import touch

    MARKS = sys.argv[2]

    def task(i):
        if i >= 2:
            touch(os.path.join(MARKS, f"started-{i}"))
            time.sleep(60)  # until stopped
        return i * 10

    if __name__ == "__main__":
        out = {}
        with cleanbreak.Pool(2, mp_context=sys.argv[1]) as pool:
            got = []
            try:
                for result in pool.map(task, range(20), chunksize=1):
                    got.append(result)
            except cleanbreak.Interrupted as exc:
                out["kept"] = sorted([*got, *exc.completed.values()])
            # Caught inside the block: the script goes on, with new workers.
            out["again"] = list(pool.map(abs, [-1, -2, -3]))
            out["pid"] = pool.submit(os.getpid).result()
        print(json.dumps(out), flush=True)
    """
)


@pytest.mark.parametrize("method", METHODS)
def test_a_script_that_catches_the_interrupt_in_the_block_uses_the_pool_again(
    method: str, tmp_path: Path
) -> None:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    proc = subprocess.Popen(
        [sys.executable, str(script), method, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        for i in (2, 3):
            assert wait_for_path(tmp_path / f"started-{i}"), proc.stderr
        old = {int((tmp_path / f"started-{i}").read_text()) for i in (2, 3)}
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=GUARD)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    assert err == ""
    report = json.loads(out)
    assert report["kept"] == [0, 10]
    assert report["again"] == [1, 2, 3]
    assert report["pid"] not in old
    assert not (tmp_path / "started-4").exists()  # nothing started after the signal
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in old):
        time.sleep(0.01)
    left = [p for p in old if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert left == []
