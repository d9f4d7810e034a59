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

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from tests import tasks
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
    elif moment == "mid-restore":  # SIGINT's default handler back, SIGTERM's not yet
        import signal

        real = signal.signal

        def parked_signal(signum, handler):
            old = real(signum, handler)
            if signum == signal.SIGINT and handler is signal.default_int_handler:
                signal.signal = real
                print("importing", flush=True)
                os.read(0, 1)
            return old

        signal.signal = parked_signal
    elif moment == "arguments":  # map's, after the import, before its pool is made
        from cleanbreak import _pool

        flag = _pool._flag

        def parked_flag(*args):
            _pool._flag = flag
            print("importing", flush=True)
            os.read(0, 1)
            return flag(*args)

        _pool._flag = parked_flag
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


MOMENTS = ("import", "restore", "mid-restore")


def _signal_parked(
    args: list[str], parked: str, sig: signal.Signals
) -> tuple[subprocess.Popen[bytes], bytes, bytes]:
    """Run ``python -c *args`` in a session of its own; once it prints ``parked`` (and waits
    for a byte on stdin), signal it as a terminal would (Ctrl-C to the group; SIGTERM to the
    process), let it go on, and return it with its output."""
    proc = subprocess.Popen(
        [sys.executable, "-c", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == f"{parked}\n".encode()
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # Ctrl-C, as a terminal sends it
        else:
            os.kill(proc.pid, sig)
        out, err = proc.communicate(b"x", timeout=GUARD)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc, out, err


@pytest.mark.parametrize(
    ("name", "moment"),
    [
        *((name, moment) for name in ("Pool", "map") for moment in MOMENTS),
        ("map", "arguments"),  # (Pool() checks its own inside its window: see the next test)
    ],
)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("catch", [True, False])
def test_a_signal_while_the_first_touch_imports_gives_interrupted(
    name: str, sig: signal.Signals, catch: bool, moment: str
) -> None:
    # "mid-restore": the import done, SIGINT's default handler is back and SIGTERM's is not
    # yet (a Ctrl-C there raised a plain KeyboardInterrupt in the restore: a stress run saw it
    # twice in 300). "arguments": map() checks its arguments, the package's window closed and
    # the pool's not yet open (a plain KeyboardInterrupt, or SIGTERM's death, before).
    proc, out, err = _signal_parked(
        [CHILD, name, "catch" if catch else "raise", moment], "importing", sig
    )  # the import goes on
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


CHECKING = textwrap.dedent(
    """
    import os, sys
    import cleanbreak
    from cleanbreak.multiprocessing import Pool as DropIn

    def parked():  # the arguments, as Pool() checks them: until the test has sent its signal
        print("checking", flush=True)
        os.read(0, 1)
        yield from ()

    face, which = sys.argv[1], sys.argv[2]
    make = cleanbreak.Pool if face == "cleanbreak" else DropIn
    if which == "second":  # the pool's modules imported, and its handler put back, before
        with make(1) as pool:
            pass
    try:
        with make(1, initializer=dict, initargs=parked()) as pool:
            pass
        print("finished", flush=True)
    except cleanbreak.Interrupted as exc:
        print("Interrupted", exc.signal.name, flush=True)
    """
)


@pytest.mark.parametrize("face", ["cleanbreak", "drop-in"])
@pytest.mark.parametrize("which", ["first", "second"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_pool_checks_its_arguments_gives_interrupted(
    face: str, which: str, sig: signal.Signals
) -> None:
    # From the first instruction of Pool(), before its handler is in place for the pool: a
    # SIGTERM there would end the process by its default action, a Ctrl-C raise a plain
    # KeyboardInterrupt. Both are recorded, and Pool() raises Interrupted; no worker starts.
    proc, out, err = _signal_parked([CHECKING, face, which], "checking", sig)
    assert (proc.returncode, out.decode()) == (0, f"Interrupted {sig.name}\n"), err.decode()
    assert err == b""
    # No process of its group is left (a fork server ends a moment after its parent).
    assert tasks.wait_for_condition(lambda: not _group_alive(proc.pid), 1.0)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group ``pgid`` still runs (a zombie has ended)."""
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


STARTING = textwrap.dedent(
    """
    import multiprocessing, os, sys
    import cleanbreak
    from cleanbreak import _manager
    from cleanbreak.multiprocessing import Pool as DropIn

    made = _manager.LocalBackend.__init__

    def parked(self, *args):  # as the pool makes its backend: its handler is in place
        _manager.LocalBackend.__init__ = made
        print("starting", flush=True)
        os.read(0, 1)  # until the test has sent its signal
        made(self, *args)

    _manager.LocalBackend.__init__ = parked
    make = cleanbreak.Pool if sys.argv[1] == "cleanbreak" else DropIn
    try:
        with make(2) as pool:
            pass
        print("finished", flush=True)
    except cleanbreak.Interrupted as exc:
        # Its workers are gone when Interrupted comes, not at the program's exit.
        workers = len(multiprocessing.active_children())
        print("Interrupted", exc.signal.name, workers, "workers", flush=True)
    """
)


@pytest.mark.parametrize("face", ["cleanbreak", "drop-in"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_once_pools_handler_is_in_place_is_the_pools(
    face: str, sig: signal.Signals
) -> None:
    # Once Pool() has put its handler in place for itself, the signal is no longer recorded
    # for the end of Pool(): the pool takes it, stops what it started, and Pool() raises
    # Interrupted; nothing of it is left.
    proc, out, err = _signal_parked([STARTING, face], "starting", sig)
    expected = f"Interrupted {sig.name} 0 workers\n"
    assert (proc.returncode, out.decode()) == (0, expected), err.decode()
    assert err == b""
    assert tasks.wait_for_condition(lambda: not _group_alive(proc.pid), 1.0)
