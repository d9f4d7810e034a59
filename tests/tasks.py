"""Task functions for the tests.

They live in an importable module, at module level, so that they pickle by reference under
every start method (spawn and forkserver workers import ``tests.tasks`` afresh).

Handshakes between the test and its tasks go through files: a task creates a file to say
"I am running" and waits (a bounded loop) for a file the test creates to say "go on". No test
relies on timing; the bounds only keep a broken build from hanging for ever.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import gc
import hashlib
import os
import random
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Upper bound on any handshake: only ever reached when something is broken.
GUARD = 30.0


# ── handshakes ───────────────────────────────────────────────────────────────────────────────


def touch(path: str | os.PathLike[str]) -> None:
    """Create ``path`` (atomically: it appears complete or not at all)."""
    tmp = f"{os.fspath(path)}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, path)


def wait_for_path(path: str | os.PathLike[str], timeout: float = GUARD) -> bool:
    """Wait until ``path`` exists. False if it did not appear within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)
    return True


# ── plain tasks ──────────────────────────────────────────────────────────────────────────────


def run_script(script: Path, timeout: float, cwd: Path | None = None) -> Any:
    """Run ``python script`` to its end (``timeout``: a deadlock guard); its
    ``subprocess.CompletedProcess``, with stdout and stderr as text."""
    import subprocess  # here: the workers import this module too

    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )


def square(x: int) -> int:
    return x * x


def square_below(n: int, x: int) -> int:
    """``x * x`` at once for ``x < n``; the others block (up to GUARD)."""
    if x >= n:
        threading.Event().wait(GUARD)
    return x * x


def blob_below(n: int, x: int) -> bytes:
    """2 MiB at once for ``x < n`` (past the journal's BIG_VALUE); the others block."""
    square_below(n, x)
    return bytes([x % 256]) * (2 * MiB)


def block_from_2(folder: str, i: int) -> int:
    """``i * i`` at once for items 0 and 1; the others write ``folder/started-<i>`` and block
    (up to GUARD)."""
    if i >= 2:
        touch(os.path.join(folder, f"started-{i}"))
        threading.Event().wait(GUARD)
    return i * i


def block_from_2_star(args: tuple[str, int]) -> int:
    return block_from_2(*args)


def sleep_then(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def sleep_star(args: tuple[float, Any]) -> Any:
    return sleep_then(*args)


def logged_sleep(folder: str, i: int, seconds: float) -> tuple[int, int]:
    """Append ``start I NS`` to ``folder/log``, sleep, append ``done I NS``; ``(i, i * i)``."""
    path = os.path.join(folder, "log")
    with open(path, "a") as f:
        f.write(f"start {i} {time.monotonic_ns()}\n")
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"done {i} {time.monotonic_ns()}\n")
    return i, i * i


def logged_sleep_star(args: tuple[str, int, float]) -> tuple[int, int]:
    return logged_sleep(*args)


def add(a: int, b: int) -> int:
    return a + b


def add3(a: int, b: int, c: int) -> int:
    return a + b + c


def combine(a: int, b: int = 0, *, scale: int = 1) -> int:
    return (a + b) * scale


def identity(x: Any) -> Any:
    return x


def star(spec: tuple[Callable[..., Any], tuple[Any, ...]]) -> Any:
    """``fn(*args)`` for one-argument APIs such as ``cleanbreak.map``."""
    fn, args = spec
    return fn(*args)


def imported(name: str) -> bool:
    """Whether this process has imported the module ``name``."""
    return name in sys.modules


def getpid_of_worker(_: object = None) -> int:
    return os.getpid()


def meet(folder: str, i: int, other: int | None) -> bool:
    """Write ``folder/started-<i>``, then wait for ``started-<other>`` (up to GUARD): whether
    it came, so whether the two items ran at the same time."""
    touch(os.path.join(folder, f"started-{i}"))
    return other is None or wait_for_path(os.path.join(folder, f"started-{other}"))


def meet_star(args: tuple[str, int, int | None]) -> bool:
    return meet(*args)


def log_and_sleep(args: tuple[str, int, float]) -> int:
    """Append ``i`` to the file ``log`` (one line: each run of the task is seen), sleep
    ``seconds``, return ``i * i``."""
    log, i, seconds = args
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{i}\n".encode())
    finally:
        os.close(fd)
    time.sleep(seconds)
    return i * i


def meet_all(args: tuple[str, int, int]) -> bool:
    """Write ``folder/started-<i>``, then wait for ``started-1`` .. ``started-<last>`` (up to
    GUARD each): whether they all came while this ran."""
    folder, i, last = args
    touch(os.path.join(folder, f"started-{i}"))
    return all(wait_for_path(os.path.join(folder, f"started-{k}")) for k in range(1, last + 1))


def touch_and_return(path: str, value: int) -> int:
    """Leave a trace that the task ran, then return ``value``."""
    touch(path)
    return value


def release_after(started: str, release: str, value: int) -> int:
    """Say "started" by creating ``started``, then wait until ``release`` exists."""
    touch(started)
    if not wait_for_path(release):
        raise TimeoutError(f"{release} never appeared")
    return value


def wait_then_return(wait: str | None, create: str | None, value: int) -> int:
    """Wait for ``wait`` (if given), create ``create`` (if given), return ``value``."""
    if wait is not None and not wait_for_path(wait):
        raise TimeoutError(f"{wait} never appeared")
    if create is not None:
        touch(create)
    return value


def staged(spec: tuple[str | None, str | None, int]) -> int:
    """``wait_then_return`` for one-argument APIs (``imap_unordered``)."""
    return wait_then_return(*spec)


def rendezvous(mine: str, other: str) -> bool:
    """True only if another task runs at the same time (each creates its file, waits for the
    other's)."""
    touch(mine)
    return wait_for_path(other)


# ── errors ───────────────────────────────────────────────────────────────────────────────────


class TaskError(Exception):
    """A task's own exception type: must arrive as itself."""


def raise_task_error(x: int) -> int:
    if x >= 0:
        raise TaskError(f"bad input {x}")  # RAISE-LINE: test_errors looks for this marker
    return x


def fail_on(x: int, bad: frozenset[int] | set[int]) -> int:
    if x in bad:
        raise TaskError(f"item {x} failed")
    return x * x


def record_and_fail_on(directory: str, x: int, bad: frozenset[int]) -> int:
    """Leave a trace in ``directory``, then fail when ``x`` is in ``bad``."""
    touch(os.path.join(directory, f"ran-{x}"))
    if x in bad:
        raise TaskError(f"item {x} failed")
    return x


def raise_system_exit(code: int) -> int:
    raise SystemExit(code)


def raise_keyboard_interrupt(_: object = None) -> int:
    raise KeyboardInterrupt


def exit_on(x: int, bad: int) -> int:
    if x == bad:
        raise SystemExit(3)
    return x * x


class LockHoldingError(Exception):
    """Pickling fails: its ``__dict__`` holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class TwoArgError(Exception):
    """Pickles, but cannot be rebuilt: ``__init__`` needs two arguments, ``.args`` holds one."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def raise_lock_holding_error(_: object = None) -> int:
    raise LockHoldingError("holds a lock")


def raise_two_arg_error(_: object = None) -> int:
    raise TwoArgError("left", "right")


def _refuse_to_load() -> None:
    raise ValueError("this object cannot be rebuilt")


class Unloadable:
    """Pickles fine, but unpickling it raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_to_load, ())


def _refuse_to_load_once(go: str) -> None:
    if not wait_for_path(go):
        raise TimeoutError(f"{go} never appeared")
    _refuse_to_load()


class UnloadableOnceTold:
    """``Unloadable``, whose unpickling raises only once the file ``go`` exists."""

    def __init__(self, go: str) -> None:
        self.go = go

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_to_load_once, (self.go,))


def unloadable_on(x: int, bad: int) -> Any:
    """Return a value that pickles but cannot be unpickled for ``x == bad``."""
    if x == bad:
        return Unloadable()
    return x * x


def return_lock(_: object = None) -> Any:
    return threading.Lock()


def return_lambda(_: object = None) -> Any:
    return lambda: 1


def lock_on(x: int, bad: int) -> Any:
    """Return an unpicklable value for ``x == bad``, ``x * x`` otherwise."""
    if x == bad:
        return threading.Lock()
    return x * x


# ── worker death ─────────────────────────────────────────────────────────────────────────────


def exit_now(code: int) -> int:
    os._exit(code)


def close_results_then_exit(seconds: float) -> int:
    """Close this worker's result pipe (the pipes it writes to, past stderr), live ``seconds``
    more, then exit with code 3: the parent sees the pipe's end long before the death."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        with contextlib.suppress(OSError):
            writes = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
            if fd > 2 and writes and stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.close(fd)
    time.sleep(seconds)
    os._exit(3)


def logged(fn: Callable[[int], int]) -> Callable[[int], int]:
    """A decorator, as a program's own would be: one wrapper's code for every function."""

    @functools.wraps(fn)
    def wrapper(x: int) -> int:
        return fn(x)

    return wrapper


@logged
def wrapped_square(x: int) -> int:
    return x * x


@logged
def wrapped_cube(x: int) -> int:
    return x * x * x


def sigkill_self(_: object = None) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable: SIGKILL was sent")  # pragma: no cover


def die_on(x: int, bad: int) -> int:
    if x == bad:
        os._exit(7)
    return x * x


def die_on_logged(folder: str, x: int, bad: int) -> int:
    """``die_on``, that first records the run: a file ``ran-X-PID-NS`` for each start."""
    # An empty file, made at once (touch() writes and renames: ten times as long, on a disk).
    name = os.path.join(folder, f"ran-{x}-{os.getpid()}-{time.monotonic_ns()}")
    os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    return die_on(x, bad)


def runs_logged(folder: str) -> collections.Counter[int]:
    """How many times ``die_on_logged`` started each task, by its ``x``."""
    return collections.Counter(int(name.split("-")[1]) for name in os.listdir(folder))


# ── initializer ──────────────────────────────────────────────────────────────────────────────

_initialized: Any = None


def set_global(value: Any) -> None:
    global _initialized
    _initialized = value


def read_global(_: object = None) -> Any:
    return _initialized


class InitError(Exception):
    pass


def failing_initializer(directory: str, go: str) -> None:
    """Leave one trace per call (so the test can count worker starts), wait until ``go``
    exists (so the test can queue tasks first), then raise."""
    touch(os.path.join(directory, f"init-{os.getpid()}"))
    wait_for_path(go)
    raise InitError("the initializer failed on purpose")


def dying_initializer(directory: str) -> None:
    touch(os.path.join(directory, f"init-{os.getpid()}"))
    os._exit(5)


# ── payloads ─────────────────────────────────────────────────────────────────────────────────

MiB = 1 << 20


def make_blob(size: int, seed: int) -> bytes:
    """``size`` bytes that are cheap to make, differ everywhere and show any reordering: each
    1 MiB block starts with its own index and continues with seeded random bytes."""
    blocks = -(-size // MiB)
    buf = bytearray(random.Random(seed).randbytes(MiB)) * blocks
    for i in range(blocks):
        buf[i * MiB : i * MiB + 8] = i.to_bytes(8, "little")
    del buf[size:]
    return bytes(buf)


def digest(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def blob(size: int, seed: int) -> bytes:
    return make_blob(size, seed)


def blob_digest(data: bytes) -> tuple[int, str]:
    """What the worker received: its length and hash."""
    return len(data), digest(data)


def echo(data: bytes) -> bytes:
    return data


# ── helpers for the tests (not tasks) ─────────────────────────────────────────────────────────


def collect(results: Iterator[Any]) -> list[Any]:
    """Drain a ``map`` iterator. A task's exception ends the iteration; it is kept as the last
    item."""
    out: list[Any] = []
    while True:
        try:
            out.append(next(results))
        except StopIteration:
            return out
        except Exception as exc:
            out.append(exc)


@contextlib.contextmanager
def unraisable_ignored() -> Iterator[list[Any]]:
    """Collect, instead of reporting, errors raised in ``__del__`` and the like inside the block
    (and in the garbage it leaves). Yields the list they are collected in."""
    seen: list[Any] = []
    previous = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        yield seen
        gc.collect()
    finally:
        sys.unraisablehook = previous


def ordered_failure(spec: tuple[str, int, frozenset[int]]) -> int:
    """For ``cleanbreak.map``: leave a trace, and fail for the items in ``bad``. The first bad
    item waits (bounded) until the last one has left its trace, so that the failures happen in
    the reverse of their input order."""
    directory, x, bad = spec
    if bad and x == min(bad):
        wait_for_path(os.path.join(directory, f"ran-{max(bad)}"))
    return record_and_fail_on(directory, x, bad)


def shutdown_within(pool: Any, seconds: float, *, cancel_futures: bool = False) -> bool:
    """``pool.shutdown(wait=True, cancel_futures=...)``, but give up after ``seconds``: False
    if it hung.

    ``Pool.shutdown`` has no timeout of its own, so this waits on the backend's private
    ``finished`` event. After a hang it kills the workers (private API too) so that the test run
    can go on and exit; the test has failed by then anyway.
    """
    pool.shutdown(wait=False, cancel_futures=cancel_futures)
    backend = pool._backend
    if backend.wait(seconds):
        pool.shutdown(wait=True)  # returns at once; restores the signal handlers
        return True
    backend.raise_level(3)  # KILLING: SIGKILL every worker, cancel what is left
    if not backend.wait(seconds):
        # The manager thread itself is stuck (say, in a blocking write to a worker): kill the
        # workers from here, which breaks their pipes and frees it.
        for pid in backend.pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        backend.wait(seconds)
    pool.shutdown(wait=True)
    return False


def shared_pool(workers: int, start_method: str) -> Iterator[Any]:
    """For fixtures: a pool that many tests use. Its shutdown is bounded, so that a pool a test
    left stuck fails the run instead of hanging it."""
    import cleanbreak  # here, not at the top: the workers import this module too

    pool = cleanbreak.Pool(workers, mp_context=start_method)
    yield pool
    assert shutdown_within(pool, GUARD), "the shared pool did not shut down"


# ── shared-memory segments ────────────────────────────────────────────────────────────────────


def array(n: int, seed: int, order: str = "C") -> Any:
    """A numpy array of ``n`` int64 (shaped 2-D when ``order`` is "F")."""
    import numpy as np

    data = np.random.default_rng(seed).integers(0, 1 << 40, size=n, dtype=np.int64)
    return np.asfortranarray(data.reshape(-1, 8)) if order == "F" else data


def array_digest(a: Any) -> tuple[str, tuple[int, ...], str, bool, bool]:
    """What identifies an array and how it was laid out."""
    import numpy as np

    c = np.ascontiguousarray(a)
    return (
        digest(c.tobytes()),
        tuple(a.shape),
        str(a.dtype),
        bool(a.flags.f_contiguous and not a.flags.c_contiguous),
        bool(a.flags.writeable),
    )


def kind_and_digest(x: Any) -> tuple[str, str]:
    if isinstance(x, str):
        return "str", digest(x.encode())
    return type(x).__name__, digest(x)


def hold_or_len(item: Any) -> int:
    """An item ``("hold", started)`` says it started and waits (bounded) for ever; any other
    item is measured."""
    if isinstance(item, tuple):
        touch(item[1])
        wait_for_path(item[1] + ".never", 4 * GUARD)
        return -1
    return len(item)


def die_after_making_a_segment(started: str) -> int:
    """Make a segment the way a worker does for a large result, then die before sending it."""
    from cleanbreak import _worker

    _name, fd = _worker._segments.create()
    os.write(fd, b"x" * 4096)
    touch(started)
    os._exit(9)


class BigBuffer:
    """An object that pickles its data as a protocol 5 PickleBuffer, as numpy arrays do."""

    def __init__(self, data: bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> Any:
        import pickle

        return BigBuffer, (pickle.PickleBuffer(self.data),)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BigBuffer) and bytes(self.data) == bytes(other.data)

    __hash__ = None  # type: ignore[assignment]


def big_buffer(size: int, seed: int) -> BigBuffer:
    return BigBuffer(bytearray(make_blob(size, seed)))


def wait_for_condition(check: Callable[[], bool], timeout: float = GUARD) -> bool:
    """Wait until ``check()`` holds, for conditions that have no event to wait on. False if it
    did not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)
    return True


# ── worker memory (tests/test_heap.py) ───────────────────────────────────────────────────────


def rss(pid: int | str = "self") -> int:
    """The resident memory of a process (by default this one), in bytes."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def block_in_heap(size: int) -> bool:
    """Whether a fresh block of ``size`` bytes comes from the heap, not from a mapping of its own
    (glibc maps blocks of 32 MiB or more on their own, unless told not to). "The heap" is an
    arena: the brk heap, or, in a worker forked from a thread other than the main one, that
    thread's arena. glibc counts the blocks it mapped on their own (``mallinfo2().hblks``)."""
    import ctypes

    from cleanbreak._heap import _MALLINFO2

    fields = [(name, ctypes.c_size_t) for name in _MALLINFO2]
    info_type = type("mallinfo2", (ctypes.Structure,), {"_fields_": fields})
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = info_type
    before = libc.mallinfo2().hblks
    block = bytes((1,)) * size
    mapped = libc.mallinfo2().hblks > before
    del block
    return not mapped


def rss_held_after_free(size: int) -> int:
    """How much more memory this process holds after it built, then dropped, ``size`` bytes."""
    before = rss()
    block = bytes((1,)) * size  # written to, so that its pages are really there
    del block
    return rss() - before


_pinned: list[bytes] = []


def free_below_a_pinned_block(size: int) -> int:
    """Build ``size`` bytes, then a small block above them that stays (a module global), then
    drop the large one: it is free memory the heap's top cannot give back. Returns the RSS."""
    block = bytes((1,)) * size
    _pinned.append(bytes((2,)) * (1 << 20))
    del block
    return rss()


def refill_the_hole(size: int) -> int:
    """After ``free_below_a_pinned_block(size)``: build and drop a block that fits the hole it
    left, so that the hole's pages are back and the heap's top did not move. Returns the RSS."""
    block = bytes((3,)) * (size - (1 << 20))
    del block
    return rss()


# ── results the pool must not keep (tests/test_map_results.py) ───────────────────────────────


class Dummy:
    """A result that can be watched with a weakref."""

    def __init__(self, x: int) -> None:
        self.x = x


def make_dummy(x: int) -> Dummy:
    return Dummy(x)


def sigkill_on(x: int, bad: int) -> int:
    """``x * x``, but the worker running item ``bad`` is SIGKILLed."""
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def one_ms(x: int) -> int:
    time.sleep(0.001)
    return x


def sigkill_on_3(x: int) -> int:
    return sigkill_on(x, 3)


def no_partial_reports() -> None:
    """A pool initializer: the worker reports each unit once, when it is done."""
    import cleanbreak._worker

    cleanbreak._worker.FLUSH_EVERY = 3600.0


# ── journal ──────────────────────────────────────────────────────────────────────────────────


def logged_square(directory: str, x: int) -> int:
    """``x * x``, leaving one file per execution in ``directory``, so a test can count how
    often each item ran."""
    with open(os.path.join(directory, f"{x}.{os.getpid()}.{time.monotonic_ns()}"), "w"):
        pass
    if x < 0:
        raise TaskError(f"negative input {x}")
    return x * x


def runs_of(directory: str) -> dict[int, int]:
    """How many times each item ran, from ``logged_square``'s files."""
    counts: dict[int, int] = {}
    for name in os.listdir(directory):
        x = int(name.split(".")[0])
        counts[x] = counts.get(x, 0) + 1
    return counts


def live(type_name: str) -> int:
    """How many objects of a class of that name this process holds, after a collection."""
    gc.collect()
    return sum(type(o).__name__ == type_name for o in gc.get_objects())
