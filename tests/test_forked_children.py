"""A process forked while a pool lives is not the pool's: it gets back the handlers it would
have had without cleanbreak.

While a pool is open, cleanbreak's SIGINT and SIGTERM handler is in place, and a process forked
then (a stock ``multiprocessing.Process`` or ``Pool`` with the fork start method, ``os.fork``)
is a copy with that handler in it. It used to ignore both signals there, so that
``Process.terminate()`` and a stock pool's ``terminate()`` waited for ever. Real processes;
handshakes through events, deadlock guards only.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any

import pytest

import cleanbreak
import cleanbreak.multiprocessing
from tests import tasks

GUARD = 30.0  # only reached when the child ignores the signal
FORK = multiprocessing.get_context("fork")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX-only")


def _wait_then_exit(ready: Any, code_on_interrupt: int) -> None:
    try:
        ready.set()  # in the try: the signal may come before set() has returned
        time.sleep(GUARD)
    except KeyboardInterrupt:
        os._exit(code_on_interrupt)
    os._exit(0)


def _ended(proc: Any) -> int | None:
    proc.join(GUARD)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        return None
    return int(proc.exitcode)


@pytest.mark.parametrize(
    ("sig", "code"),
    [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 7)],  # 7: the child's KeyboardInterrupt
    ids=["sigterm", "sigint"],
)
def test_a_forked_process_takes_signals_as_it_would_without_the_pool(
    sig: signal.Signals, code: int
) -> None:
    with cleanbreak.Pool(1) as pool:
        assert pool.submit(tasks.square, 3).result() == 9  # the pool is live, its handler in
        ready = FORK.Event()
        proc = FORK.Process(target=_wait_then_exit, args=(ready, 7))
        proc.start()
        assert ready.wait(GUARD)
        assert proc.pid is not None
        os.kill(proc.pid, sig)  # SIGTERM: what Process.terminate() sends
        assert _ended(proc) == code
        # The parent keeps its handler and its pool.
        assert getattr(signal.getsignal(signal.SIGINT), "__module__", None) == "cleanbreak._signals"
        assert pool.submit(tasks.square, 4).result() == 16


def test_os_fork_child_dies_of_sigterm_while_a_pool_lives() -> None:
    with cleanbreak.Pool(1) as pool:
        assert pool.submit(tasks.square, 3).result() == 9
        pid = os.fork()
        if pid == 0:  # the child
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(GUARD)
            finally:
                os._exit(3)
        deadline = time.monotonic() + GUARD
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if not done:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert done and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def test_a_stock_fork_pool_beside_the_drop_in_terminates() -> None:
    # Where it was found. The stock pool's terminate() sends its workers SIGTERM and joins
    # them; it hung only when a worker had not yet taken its exit sentinel, so this one may
    # pass without the fix (the tests above may not).
    with cleanbreak.multiprocessing.Pool(2) as ours, FORK.Pool(2) as stock:
        assert ours.map(tasks.square, range(10)) == stock.map(tasks.square, range(10))
        workers = list(stock._pool)  # type: ignore[attr-defined]
        # terminate() joins every worker: it hangs if one ignores SIGTERM. Called in a thread,
        # so that a hang is a failure that names the workers left (killed, to let it return),
        # not a CI run that never ends.
        ended = threading.Event()

        def terminate() -> None:
            stock.terminate()
            ended.set()

        threading.Thread(target=terminate, daemon=True).start()
        if not ended.wait(GUARD):
            alive = [w.pid for w in workers if w.is_alive()]
            for pid in alive:
                os.kill(pid, signal.SIGKILL)
            ended.wait(GUARD)
            pytest.fail(f"the stock pool's terminate() hung on its workers {alive} (killed)")
    assert all(w.exitcode is not None for w in workers)


# ── a process a task forks, inside a worker ──────────────────────────────────────────────────

# Run as a script, so that its stderr (the workers' too, on every start method) is the test's to
# read: a stock fork pool inside a task (its exit terminates its workers with SIGTERM), then a
# forked Process that the task terminates, and one it sends SIGINT.
NESTED = """
import json, multiprocessing, os, signal, sys, time
import cleanbreak

def sq(x):
    return x * x

def wait_then_exit(ready):
    # Short sleeps, each followed by an explicit check for signals (os.kill(pid, 0)): on
    # Python 3.13, in a process descended from a fork made in a thread other than the main one
    # (a fork-method worker is), a handler runs only when a call checks for signals, so a
    # SIGINT that came between two calls would wait for the next interrupted one.
    try:
        ready.set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.01)
            os.kill(os.getpid(), 0)
    except KeyboardInterrupt:
        os._exit(7)
    os._exit(0)

def nested(n):
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as p:
        total = sum(p.map(sq, range(n)))
    codes = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        ready = ctx.Event()
        q = ctx.Process(target=wait_then_exit, args=(ready,))
        q.start()
        ready.wait(30)
        os.kill(q.pid, sig)
        q.join(30)
        if q.exitcode is None:
            q.kill()
            q.join()
        codes.append(q.exitcode)
    return total, codes

if __name__ == "__main__":
    out = {}
    for method in ("fork", "forkserver", "spawn"):
        with cleanbreak.Pool(1, mp_context=method) as pool:
            out[method] = pool.submit(nested, 100).result()
    print(json.dumps(out))
"""


def test_a_process_a_task_forks_is_not_a_worker(tmp_path: Any) -> None:
    script = tmp_path / "nested.py"
    script.write_text(NESTED)
    done = tasks.run_script(script, 3 * GUARD)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no traceback from the worker's handler in a forked child
    expected = [sum(x * x for x in range(100)), [-signal.SIGTERM, 7]]
    assert json.loads(done.stdout) == {m: expected for m in ("fork", "forkserver", "spawn")}
