"""Ctrl-C while the first touch of ``cleanbreak.Pool`` or ``cleanbreak.map`` imports the
pool's modules (the package imports them on first use) ends the line with ``Interrupted``, not
with a plain ``KeyboardInterrupt`` in the middle of an import, nor with SIGTERM's default
action.

The child parks that import at its start (an import hook that reads a byte from stdin), or at
its very end, as the handlers that were there before are put back (``restore``), the test
signals it as a terminal would (the process group of a child in a session of its own), then
lets the import go on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.tasks import GUARD

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import importlib.abc, os, sys
    import cleanbreak

    class Park(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname == "cleanbreak._pool":
                sys.meta_path.remove(self)
                print("importing", flush=True)
                os.read(0, 1)  # until the test has sent its signal
            return None

    name, catch, moment = sys.argv[1], sys.argv[2] == "catch", sys.argv[3]
    if moment == "import":
        sys.meta_path.insert(0, Park())
    else:
        from cleanbreak import _signals

        restore = _signals._restore

        def parked():
            _signals._restore = restore
            print("importing", flush=True)
            os.read(0, 1)
            restore()

        _signals._restore = parked
    try:
        if name == "map":
            cleanbreak.map(abs, [-1, -2], workers=1)
        else:
            with cleanbreak.Pool(1) as pool:
                pool.submit(abs, -1).result()
        print("finished", flush=True)
    except cleanbreak.Interrupted as exc:
        if not catch:
            raise
        print("Interrupted", exc.signal.name, flush=True)
    """
)


@pytest.mark.parametrize("name", ["Pool", "map"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("catch", [True, False])
@pytest.mark.parametrize("moment", ["import", "restore"])
def test_a_signal_while_the_first_touch_imports_gives_interrupted(
    name: str, sig: signal.Signals, catch: bool, moment: str
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, name, "catch" if catch else "raise", moment],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == b"importing\n"
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # Ctrl-C, as a terminal sends it
        else:
            os.kill(proc.pid, sig)
        out, err = proc.communicate(b"x", timeout=GUARD)  # the import goes on
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if catch:
        assert out.decode() == f"Interrupted {sig.name}\n", err.decode()
        assert proc.returncode == 0
        assert err == b""
    else:
        # Uncaught, it ends the process as an uncaught KeyboardInterrupt does: killed by the
        # signal, after printing the exception.
        assert proc.returncode == -sig, err.decode()
        assert f"Interrupted: interrupted by {sig.name}" in err.decode()
        assert "finished" not in out.decode()
