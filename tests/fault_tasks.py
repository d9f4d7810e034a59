"""Task functions for ``test_faults.py``: tasks that crash, hang, spawn children or misbehave.

They live at module level in an importable module so that they pickle by reference under
every start method (spawn and forkserver workers import ``tests.fault_tasks`` afresh).

Handshakes go through files. A task that has started writes a *start file* holding its worker's
pid (and, where asked, a grandchild's pid and the moment it started); the test waits for that
file. A task that must block waits for a file the test creates when it is done with it, or for
the file ``release`` in the same folder, which the test creates on its way out: a broken build
fails a test instead of hanging the run. Every wait is bounded by ``GUARD``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import resource
import signal
import subprocess
import threading
import time
from typing import Any

# Upper bound on any wait inside a task: only reached when something is broken.
GUARD = 60.0
_POLL = 0.005
RELEASE = "release"


# ── handshakes ───────────────────────────────────────────────────────────────────────────────


def write_atomic(path: str, text: str) -> None:
    """Create ``path`` holding ``text``: it appears complete or not at all."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def report(path: str, **extra: Any) -> None:
    """Say "I am running": the worker's pid, the start time (monotonic, which is one clock for
    every process on Linux) and whatever else the test needs."""
    write_atomic(path, json.dumps({"pid": os.getpid(), "t": time.monotonic(), **extra}))


def wait_for(path: str, timeout: float = GUARD) -> bool:
    """Wait until ``path`` exists, or a file named ``release`` beside it: the test creates that
    one on its way out, so that no task is left blocked when a test fails."""
    abort = os.path.join(os.path.dirname(path), RELEASE)
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if os.path.exists(abort) or time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)
    return True


def count_run(counter: str) -> int:
    """Append one line to ``counter`` and return how many lines it has now: the attempt number."""
    with open(counter, "a") as f:
        f.write(f"{os.getpid()}\n")
    with open(counter) as f:
        return len(f.read().splitlines())


# ── plain tasks ──────────────────────────────────────────────────────────────────────────────


def square(x: int) -> int:
    return x * x


def pid_and_square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


def block(start: str, release: str, value: int = 0) -> int:
    """Report, then wait for ``release`` (a test that kills this task never creates it)."""
    report(start)
    wait_for(release)
    return value


def touch_and_return(path: str, value: int) -> int:
    write_atomic(path, str(os.getpid()))
    return value


def rendezvous(mine: str, other: str) -> int:
    """Say "here", then wait until the other task has said so: only two tasks running at the
    same time, on two workers, can both finish."""
    write_atomic(mine, str(os.getpid()))
    if not wait_for(other):
        raise TimeoutError(f"{other} never appeared: fewer than two workers ran")
    return os.getpid()


# ── deaths ───────────────────────────────────────────────────────────────────────────────────


def _no_core() -> None:
    # A crash on purpose should leave no core file behind.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def segfault(start: str) -> int:
    report(start)
    _no_core()
    faulthandler.disable()  # die by the signal itself, without a traceback on stderr
    faulthandler._sigsegv()  # type: ignore[attr-defined]
    raise AssertionError("unreachable: the process segfaulted")  # pragma: no cover


def exit_with(start: str, code: int = 3) -> int:
    report(start)
    os._exit(code)


def sigkill_self(start: str) -> int:
    report(start)
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable: SIGKILL was sent")  # pragma: no cover


def die_at(x: int, bad: int) -> int:
    """For ``map``: the worker exits while running item ``bad``."""
    if x == bad:
        _no_core()
        os._exit(7)
    return x * x


def die_at_7(x: int) -> int:
    """For one-argument maps: the worker exits while running item 7."""
    return die_at(x, 7)


def large_then_die(counter: str, bad: int, x: int) -> bytes:
    """Record that item ``x`` ran (a line in ``counter``), then return 2 MB, past the worker's
    flush size; the worker exits while running item ``bad``."""
    with open(counter, "a") as f:
        f.write(f"{x}\n")
    if x == bad:
        _no_core()
        os._exit(7)
    return bytes([x % 256]) * (2 << 20)


def block_at(x: int, bad: int, release: str) -> int:
    """For ``map`` with a timeout: item ``bad`` blocks."""
    if x == bad:
        wait_for(release)
    return x * x


def spawn_grandchild(start: str, release: str, then_exit: bool) -> int:
    """Start ``sleep 1000`` (a process of the task's own), report its pid, then either exit
    the worker at once or block until killed."""
    child = subprocess.Popen(["sleep", "1000"])
    report(start, grandchild=child.pid)
    if then_exit:
        os._exit(3)
    wait_for(release)
    return child.pid


# ── retries ──────────────────────────────────────────────────────────────────────────────────


def die_until(counter: str, deaths: int) -> int:
    """The first ``deaths`` attempts kill the worker; the next returns the attempt number."""
    attempt = count_run(counter)
    if attempt <= deaths:
        os._exit(5)
    return attempt


def raise_until(counter: str, failures: int, kind: str) -> int:
    """The first ``failures`` attempts raise ``kind`` (OSError or ValueError)."""
    attempt = count_run(counter)
    if attempt <= failures:
        error: type[Exception] = OSError if kind == "OSError" else ValueError
        raise error(f"attempt {attempt} failed on purpose")
    return attempt


def block_once(counter: str, start: str, release: str) -> int:
    """The first attempt blocks (so that it times out); the next returns the attempt number."""
    attempt = count_run(counter)
    if attempt == 1:
        report(start)
        wait_for(release)
    return attempt


# ── initializers ─────────────────────────────────────────────────────────────────────────────

_configured: Any = None


def configure(value: Any, log: str) -> None:
    global _configured
    _configured = value
    count_run(log)


def read_configured(_: object = None) -> Any:
    return _configured


class InitFailed(Exception):
    pass


def failing_initializer(log: str, go: str) -> None:
    count_run(log)
    wait_for(go)  # until the test has queued its tasks
    report(os.path.join(os.path.dirname(log), f"raised-{os.getpid()}"))
    raise InitFailed("the initializer failed on purpose")


def exiting_initializer(log: str) -> None:
    count_run(log)
    os._exit(1)


def limit_memory(headroom: int) -> None:
    """Cap this worker's address space at what it uses now plus ``headroom`` bytes."""
    import psutil

    limit = psutil.Process().memory_info().vms + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def allocate(size: int) -> int:
    data = bytearray(size)
    return len(data)


# ── bad payloads ─────────────────────────────────────────────────────────────────────────────


def identity(x: Any) -> Any:
    return x


def return_lock(_: object = None) -> Any:
    return threading.Lock()


def lock_at(x: int, bad: int) -> Any:
    """For ``map``: item ``bad``'s result cannot be pickled."""
    return threading.Lock() if x == bad else x * x


class LockHoldingError(Exception):
    """An exception that cannot be pickled: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class TwoArgError(Exception):
    """An exception that pickles but cannot be unpickled: ``args`` lacks one of its
    ``__init__`` arguments."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a} and {b}")


def raise_lock_holding(_: object = None) -> int:
    raise LockHoldingError("holds a lock")


def raise_two_arg(_: object = None) -> int:
    raise TwoArgError("one", "two")


def _refuse_to_load() -> None:
    raise RuntimeError("this object refuses to be unpickled")


class Unloadable:
    """Pickles, but unpickling it raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_to_load, ())


def return_unloadable(_: object = None) -> Any:
    return Unloadable()


def unloadable_at_6(x: int) -> Any:
    """For one-argument maps: item 6's result pickles in the worker but does not unpickle in
    the parent."""
    return Unloadable() if x == 6 else x * x


def lock_at_6(x: int) -> Any:
    """For one-argument maps: item 6's result cannot be pickled."""
    return lock_at(x, 6)


def raise_system_exit(code: int) -> int:
    raise SystemExit(code)


def raise_keyboard_interrupt(_: object = None) -> int:
    raise KeyboardInterrupt


# ── payloads that raise SystemExit or KeyboardInterrupt (issue 9, point 4) ───────────────────

_RAISES: dict[str, type[BaseException]] = {
    "SystemExit": SystemExit,
    "KeyboardInterrupt": KeyboardInterrupt,
}


def _raise_on_load(kind: str) -> None:
    raise _RAISES[kind](1)


class RaisesOnLoad:
    """Pickles, but unpickling it raises ``kind`` (SystemExit or KeyboardInterrupt)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __reduce__(self) -> tuple[Any, ...]:
        return (_raise_on_load, (self.kind,))


class RaisesOnDump:
    """Pickling it raises ``kind``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __reduce__(self) -> tuple[Any, ...]:
        raise _RAISES[self.kind](1)


def return_raises_on_load(kind: str) -> Any:
    return RaisesOnLoad(kind)


def return_raises_on_dump(kind: str) -> Any:
    return RaisesOnDump(kind)


def raises_on_load_at_6(x: int) -> Any:
    """For one-argument maps: item 6's result raises SystemExit as the parent unpickles it."""
    return RaisesOnLoad("SystemExit") if x == 6 else x * x


def raises_on_dump_at_6(x: int) -> Any:
    """For one-argument maps: item 6's result raises SystemExit as the worker pickles it."""
    return RaisesOnDump("SystemExit") if x == 6 else x * x
