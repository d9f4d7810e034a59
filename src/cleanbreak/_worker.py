"""What runs inside a worker process.

A worker reads units from its task pipe, runs each item, and writes the results back on its
result pipe, in order. It decides nothing about signals: the parent does.

- SIGINT is ignored and the worker leads a process group of its own, so a terminal's Ctrl-C
  reaches the parent alone. The parent stops a worker by signalling that group, which takes
  along any process the task started.
- Before each item the worker reads the pool's shared *gate*. Once the parent has closed it
  (on the first Ctrl-C, before anything else), no further item starts: the worker reports the
  items it finished and the point where it stopped. This is what makes "no task starts after
  the signal" hold for tasks already sitting in the pipe, and within a batch of tiny items.
- SIGTERM is how the parent stops a running task. The handler breaks off the item that is
  running (it raises ``_Stop`` in task code, and only there), the worker sends the items of
  the unit it has finished, and then it dies of SIGTERM, as the default action would have
  made it. So stopping a chunk loses no finished item. The parent sends SIGKILL only after
  its grace period. A task (or an initializer) that installs a SIGTERM handler of its own
  replaces this one: its worker then dies without sending what it has.
- A watchdog thread blocks on the read end of the *lifeline* pipe, whose write end only the
  parent holds. When the parent dies, even by SIGKILL, the kernel closes that end, the read
  returns, and the watchdog closes the gate and kills the worker's process group at once. This
  needs no polling and works with every start method. The watchdog needs the GIL to act, and
  a task may hold it for a while; so between batches of items the main thread also checks
  the lifeline itself, and starts nothing once it has reached end-of-file. Linux's
  parent-death signal (PR_SET_PDEATHSIG) was rejected: it fires when the *thread* that forked
  the worker exits, and under forkserver the worker's parent is the fork server, not the pool.
- A unit the parent sent ahead, while this worker was busy, comes with a claim in the worker's
  claim pipe: the worker reads it before it starts the unit, and skips the unit, silently, if
  the parent read it first to give the unit to a free worker (``_manager``, "Taking back").
- Threads of the worker's own (the watchdog, the copy helpers) block SIGINT and SIGTERM, so
  that a signal always reaches the main thread and wakes it from a blocking call.
- Once the worker has moved a payload of 32 MiB or more, it keeps the memory its tasks free
  for the next task's large blocks, and gives back what piles up after each unit (``_heap``).
- With a journal, a unit names the journal's folder of large results (``spill``): the worker
  writes each result of ``SPILL_BYTES`` or more there itself, as a pickle under a temporary
  name, before it sends the message that holds it, and the message says which. The parent
  renames the file into place and commits a row naming it (see ``_journal``): the workers
  write in parallel, and the parent neither pickles the result again nor writes it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import select
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing.connection import Connection
from types import FrameType

from ._errors import SerializationError
from ._heap import LARGE, Heap
from ._shm import Packer, Segments, largest, load
from ._signals import HANDLED, die_of, start_quiet_thread
from ._wire import (
    CALL_ONE,
    CALL_STAR,
    DONE,
    PARTIAL,
    SKIPPED,
    STOPPED,
    CapturedError,
    discard,
    dumps,
    dumps_any,
    read_claim,
    recv_frame,
    send_frame,
    size_of,
    split,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see _notyping)
if TYPE_CHECKING:
    from typing import Any, NoReturn

# A unit that runs long reports what it has every FLUSH_EVERY seconds, so that a crash in the
# middle of a large chunk loses at most that much work (a stop loses none: see _Stop).
FLUSH_EVERY = 0.05
# ... and sends what it holds once that passes FLUSH_BYTES, whatever its age: a chunk of large
# results never waits in the worker (nor in the parent's memory) as a whole. How big a result
# is: the larger of sys.getsizeof() of the last one (its own size: bytes, str, an array that
# owns its data) and what each result of this worker's last message took on the wire (for a
# list or a dict, which getsizeof measures shallowly).
FLUSH_BYTES = 1 << 20
_item_bytes = 0.0
# Items run in batches between two reads of the clock and the lifeline. A batch grows while it
# takes under 1 ms and shrinks when it takes over 4 ms, so tiny tasks pay for those checks once
# per batch. The gate is read before every item all the same (see _results).
_FAST = 0.001
_SLOW = 0.004
_MAX_BATCH = 4096
GATE_SIZE = _MAX_BATCH

UNREADABLE = 3  # status: the unit's function or items could not be unpickled here

# A result this large or larger goes to a file of its own with a journal (see above); the same
# size as the journal's own threshold (``_journal.BIG_VALUE``, which this module must not
# import: a worker does not load the journal).
SPILL_BYTES = 1 << 20
_spilled = 0  # how many files this worker has written: their temporary names are numbered

# The functions this worker holds, by the number the parent gave each (see
# _manager._Functions): the last WORKER_FUNCTIONS it was sent, least recently used first. A
# function that could not be loaded is held as the reason, so that later units naming it fail
# the same way.
WORKER_FUNCTIONS = 16
_functions: OrderedDict[int, Any] = OrderedDict()


class _NotLoaded(Exception):
    """A unit names a function that this worker could not load when it came."""

    def __init__(self, reason: str, lookup: bool) -> None:
        super().__init__(reason)
        self.lookup = lookup


def _unreadable(part: str, exc: BaseException) -> SerializationError:
    """The error of a unit's function or arguments that could not be loaded here.
    ``lookup`` says whether a name was not found (an attribute or a module): then the parent
    sends that part again by value (see ``_manager``)."""
    if isinstance(exc, _NotLoaded):
        error = SerializationError(part, str(exc))
        error.lookup = exc.lookup  # type: ignore[attr-defined]
        return error
    reason = f"it could not be unpickled in the worker: {type(exc).__name__}: {exc}"
    error = SerializationError(part, reason)
    error.lookup = isinstance(exc, (AttributeError, ImportError))  # type: ignore[attr-defined]
    return error


# Where this worker puts large payloads; set by worker_main.
_segments = Segments(None)
_sent = 0  # the largest payload this worker has sent
_lifeline = -1  # the read end of the lifeline; end-of-file once the parent is gone
_gate: Any = None  # the pool's gate (below)


# ── the gate ─────────────────────────────────────────────────────────────────────────────────
#
# One array of GATE_SIZE bytes in memory shared by the parent and every worker of a pool: all
# ones while items may start, all zeros once the pool stops. A batch runs its items through
# itertools.compress with the gate's bytes as selectors, so each item reads one byte of the
# gate, in C, just before it starts: about 8 ns an item, where a Python-level check costs 40.
# A batch never holds more than GATE_SIZE items, so it never runs out of selectors. It is a
# block of multiprocessing's shared heap, as a RawArray would be, without a RawArray's ctypes
# (whose import costs a pool's first use about 3 ms): it reaches workers by inheritance or, with
# spawn and a fork server, as a descriptor passed when they start.


def new_gate() -> Any:
    from multiprocessing.heap import BufferWrapper

    gate = BufferWrapper(GATE_SIZE)
    gate.create_memoryview()[:] = b"\x01" * GATE_SIZE
    return gate


_GATE_BLOCK = 64
_CLOSED_BLOCK = bytes(_GATE_BLOCK)


def close_gate(gate: Any) -> None:
    """Start no more items, in every worker. Safe in a signal handler.

    A batch reads byte i of the gate before its item i, and compress *skips* an item whose
    byte is 0, so a reader that saw byte i closed and a later byte still open would run a later
    item in the place of an earlier one. So the gate closes from its end back to its start, a
    block at a time: stores become visible in the order they are made (x86), and a reader,
    which moves forward one item at a time, cannot overtake a block being written.
    (``memset`` writes in an order of its own: some write the first bytes first.)
    """
    view = gate.create_memoryview()
    for start in range(GATE_SIZE - _GATE_BLOCK, -1, -_GATE_BLOCK):
        view[start : start + _GATE_BLOCK] = _CLOSED_BLOCK


def _is_closed(gate: memoryview) -> bool:
    return not gate[0]


# ── SIGTERM: stop the running item, send what is finished, die ──────────────────────────────


class _Stop(BaseException):
    """Raised by the SIGTERM handler in task code: the parent is stopping this worker."""


_stop_requested = False  # a SIGTERM came
_interruptible = False  # the main thread is in task code, or idle: _Stop may be raised now


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _stop_requested, _interruptible
    if os.getpid() != _worker_pid:
        # A process the task forked, before _forget_in_child ran (or where no at-fork hook
        # runs): it is not the worker, and dies of SIGTERM as any process would.
        die_of(signal.SIGTERM)
    _stop_requested = True
    if _interruptible:
        # Once only: whatever the task does with it, the next SIGTERM must not land in the
        # worker's own bookkeeping.
        _interruptible = False
        raise _Stop


# A process a task forks (a stock fork pool's workers, a ``multiprocessing.Process``,
# ``os.fork``) is not a worker: it gets the handlers a process normally has, as soon as it
# exists, so that its own parent's ``terminate()`` (SIGTERM) and SIGINT act on it as usual. The
# worker's own SIGINT and SIGTERM handlers stay in place only where they are still the worker's.
_worker_pid: int | None = None  # this process's pid, once it runs as a worker


def _forget_in_child() -> None:
    if _worker_pid is None or os.getpid() == _worker_pid:
        return
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


os.register_at_fork(after_in_child=_forget_in_child)


@contextlib.contextmanager
def _interruptible_zone() -> Iterator[None]:
    """Task code, or a wait for the parent: where a SIGTERM may break in (see _on_sigterm)."""
    global _interruptible
    _interruptible = True  # before the check: a SIGTERM in between then raises at once
    try:
        if _stop_requested:
            _interruptible = False
            raise _Stop
        yield
    finally:
        _interruptible = False


class BlockedOnArrival:
    """The first argument of every worker process. Unpickled in the new process (spawn,
    forkserver) before anything else of cleanbreak's runs there, it blocks SIGINT and SIGTERM:
    a Ctrl-C that comes while the worker starts waits, pending, until ``worker_main`` ignores
    it, instead of raising KeyboardInterrupt in multiprocessing's bootstrap, which prints a
    traceback. (Before this, only while the main module is imported, a Ctrl-C ends a worker
    started by a fork server, silently.)"""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_blocked_on_arrival, ())


def _blocked_on_arrival() -> BlockedOnArrival:
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    return BlockedOnArrival()


def worker_main(
    _blocked: BlockedOnArrival,
    tasks: Connection,
    results: Connection,
    lifeline: Connection,
    claims: Connection,
    gate: Any,
    initializer: Callable[..., object] | None,
    initargs: Sequence[Any],
    shm_prefix: str | None = None,
    reuse_memory: bool = True,
) -> None:
    # SIGINT and SIGTERM are blocked here: inherited from the manager thread (fork, spawn), or
    # blocked on arrival (BlockedOnArrival). A Ctrl-C that came while the worker started is
    # pending, and SIG_IGN discards it.
    global _worker_pid
    _worker_pid = os.getpid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    with contextlib.suppress(OSError):  # pragma: no cover - already a group leader
        os.setpgid(0, 0)
    global _segments, _lifeline, _gate, _claims
    _segments = Segments(shm_prefix)
    _gate = gate
    task_fd = _take_fd(tasks)
    result_fd = _take_fd(results)
    _lifeline = _take_fd(lifeline)
    _claims = _take_fd(claims)
    os.set_blocking(_claims, False)
    _lifeline_poll.register(_lifeline, select.POLLIN)
    view = gate.create_memoryview()
    _start_watchdog(_lifeline)  # while both signals are still blocked here
    _start_signal_relay()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
    for fd in (task_fd, result_fd, _claims):
        os.set_inheritable(fd, False)
    with contextlib.suppress(_Stop):
        _serve(task_fd, result_fd, view, initializer, initargs, reuse_memory)
    if _stop_requested:  # what had to be sent is sent: end as SIGTERM's default action would
        die_of(signal.SIGTERM)


def _serve(
    task_fd: int,
    result_fd: int,
    gate: memoryview,
    initializer: Callable[..., object] | None,
    initargs: Sequence[Any],
    reuse_memory: bool,
) -> None:
    global _batch
    # Set to reuse freed memory once this worker moves a large payload (see _heap).
    heap: Heap | None = None
    # The first frame says the worker is ready: None, or the initializer's error.
    if initializer is not None:
        try:
            with _interruptible_zone():
                initializer(*initargs)
        except _Stop:
            raise
        except BaseException as exc:
            _send_ready(result_fd, CapturedError.capture(exc))
            raise SystemExit(1) from None
    _send_ready(result_fd, None)
    while True:
        with _interruptible_zone():
            if heap is not None:
                wait = heap.due()
                if wait is not None and not select.select([task_fd], [], [], wait)[0]:
                    heap.tidy(now=True)  # idle until the count it put off was due
            frame = recv_frame(task_fd)
        if frame is None:
            return
        parts, layouts = split(frame, 3)
        received = max(map(largest, layouts.values()), default=0)
        meta = pickle.loads(parts[0])
        if meta is None:
            return
        uid, kind, each, fid, spill, ahead, item_claims, forget = meta
        for gone in forget:  # functions no unit will name again (as the parent drops them)
            _functions.pop(gone, None)
        if ahead and not _claim(ahead):
            # The parent took this unit back for an idle worker (see _manager, "Taking back"):
            # it is not ours to run or report. Its function still comes in (both sides keep
            # the same list of functions held), its items' shared memory goes.
            with contextlib.suppress(BaseException):  # (what it raises is held with it)
                _function(fid, parts[1], layouts.pop(1, None))
            discard(layouts)
            del parts, frame
            continue
        # The function and the items are pickled apart, so that a failure says which it was.
        part = "function"
        try:
            fn = _function(fid, parts[1], layouts.pop(1, None))
            part = "arguments"
            items = load(parts[2], layouts.pop(2, None))
        except BaseException as exc:
            discard(layouts)
            error = CapturedError(_unreadable(part, exc), "")
            _send(result_fd, (uid, 0, [], {0: error}, UNREADABLE, 0.0))
            continue
        finally:
            del parts, frame
        # A unit of the function the last one ran starts at the batch size that one reached:
        # a map's small chunks of tiny tasks each pay for the checks once, not once per
        # doubling (see _FAST). Not a unit whose items are reported each as it ends (a task
        # timeout: the parent's deadline moves on with each report).
        batch = _batch[1] if _batch[0] == fid and not each else 1
        batch = _run_unit(
            result_fd,
            gate,
            uid,
            kind,
            fn,
            items,
            0.0 if each else FLUSH_EVERY,
            spill,
            batch,
            item_claims,
        )
        _batch = (fid, batch)
        del fn, items  # before the next unit's arguments come in, and before tidy() counts
        if _stop_requested:
            return
        if heap is None and reuse_memory and max(received, _sent) >= LARGE:
            heap = Heap.reuse()
            reuse_memory = heap is not None
        if heap is not None:
            heap.tidy()


_batch = (0, 1)  # the function the last unit ran, and the batch size it reached
_claims = -1  # the read end of this worker's claim pipe (see _manager, "Taking back")
_claims_held: set[int] = set()  # claims read ahead of their unit's turn


def _claim(ahead: int) -> bool:
    """Take the claim numbered ``ahead`` (a unit's, or an item's of tasks that travel
    together): False if the parent took it first. Claims are read in the order written; one
    read past ours says ours was taken."""
    if _claims_held:
        if ahead in _claims_held:
            _claims_held.discard(ahead)
            return True
        # Those of items whose unit ended at an item taken back: nobody's.
        _claims_held.difference_update([seq for seq in _claims_held if seq < ahead])
    while (seq := read_claim(_claims)) is not None:
        if seq == ahead:
            return True
        if seq > ahead:
            _claims_held.add(seq)
            return False
    return False


def _function(fid: int, data: memoryview, layout: Any) -> Callable[..., Any]:
    """The unit's function: sent with it (``data``), or held from an earlier unit."""
    if data.nbytes:
        try:
            fn = load(data, layout)
        except BaseException as exc:
            error = _unreadable("function", exc)
            _hold(fid, _NotLoaded(error.reason, error.lookup))  # type: ignore[attr-defined]
            raise
        _hold(fid, fn)
        return fn  # type: ignore[no-any-return]
    held = _functions.get(fid)
    if held is None:  # pragma: no cover - the parent's list and ours disagree: a bug
        raise _NotLoaded(f"this worker does not hold function {fid}", False)
    _functions.move_to_end(fid)
    if isinstance(held, _NotLoaded):
        raise _NotLoaded(str(held), held.lookup)
    return held  # type: ignore[no-any-return]


def _hold(fid: int, fn: Any) -> None:
    _functions[fid] = fn
    while len(_functions) > WORKER_FUNCTIONS:
        _functions.popitem(last=False)


def _take_fd(conn: Connection) -> int:
    fd = os.dup(conn.fileno())
    conn.close()
    return fd


def _start_watchdog(fd: int) -> None:
    def watch() -> None:
        try:
            gone = os.read(fd, 1) == b""
        except OSError:  # a task closed the descriptor: the main thread still checks (poll)
            return
        if gone:
            _orphaned()

    start_quiet_thread(watch, "cleanbreak-watchdog")


def _start_signal_relay() -> None:
    """Make sure the SIGTERM handler runs in the main thread, even where the signal came just
    before a blocking call.

    A signal's C-level handler only marks it pending; the Python handler runs at the main
    thread's next check. A SIGTERM that comes after the last check before a blocking call (a
    lock's wait, as in a task's ``Event.wait``), or while the main thread, about to make that
    call, waits for a core, does not interrupt the call: no check runs until it returns, and
    the stop waits for SIGKILL, 0.5 s later. (Seen on every version and start method: about
    one stop in 150 with two busy processes on two cores, on 3.11; about one in 150 on an idle
    machine on 3.13.0.) So the C-level handler also writes to a pipe (``set_wakeup_fd``) that a
    thread of ours reads; if the handler has not run a moment later, the thread sends the
    signal again, to the main thread itself, which interrupts the call, and the handler runs.

    Python 3.13.0 (at least) adds a fault of its own: in a process forked from a thread other
    than the main one, as a fork-method worker is (the pool's manager thread starts it), a
    signal's Python handler does not run at the next bytecode, only when the main thread next
    checks for signals in a call (a sleep or a read that the signal interrupts). A task busy in
    Python code would not see the stop until SIGKILL came. There the thread also turns on
    ``sys.monitoring``'s LINE event, whose callback, in the main thread, calls
    ``os.kill(pid, 0)``, which checks for signals: the handler runs there, at a line boundary,
    as it should have.
    """
    tool = _free_monitoring_tool()
    monitoring: Any = getattr(sys, "monitoring", None) if tool is not None else None
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    main = threading.get_ident()

    def check(*_args: object) -> None:  # a LINE event, in whichever thread runs Python code
        if threading.get_ident() == main:
            monitoring.set_events(tool, 0)
            os.kill(os.getpid(), 0)  # runs the pending handler here

    def relay() -> None:
        while received := os.read(read_fd, 64):
            if _stop_requested:  # its handler has run
                continue
            if monitoring is not None:
                monitoring.set_events(tool, monitoring.events.LINE)
            if signal.SIGTERM in received:
                # (Not to a handler a task put in its place: it would run again and again.)
                time.sleep(_RELAY_KICK_SECONDS)
                if not _stop_requested and signal.getsignal(signal.SIGTERM) is _on_sigterm:
                    signal.pthread_kill(main, signal.SIGTERM)

    if monitoring is not None:
        monitoring.use_tool_id(tool, "cleanbreak-signals")
        monitoring.register_callback(tool, monitoring.events.LINE, check)
    start_quiet_thread(relay, "cleanbreak-signals")


_RELAY_KICK_SECONDS = 0.005  # how long the relay lets the handler run before it sends again


def _free_monitoring_tool() -> int | None:
    monitoring = getattr(sys, "monitoring", None)
    if monitoring is None or sys.version_info < (3, 13):
        return None
    for tool in (4, 3):  # the two ids that sys.monitoring leaves unnamed
        if monitoring.get_tool(tool) is None:
            return tool
    return None  # pragma: no cover - both in use


def _orphaned() -> NoReturn:
    """The parent is gone: no item starts anywhere in the pool, and this worker's process
    group dies at once."""
    close_gate(_gate)
    # Nobody will read what is in the pool's segments now (see _shm).
    _segments.purge_for_good()
    if os.getpgid(0) == os.getpid():
        os.killpg(0, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
    os._exit(1)  # pragma: no cover - SIGKILL came first


_lifeline_poll = select.poll()


def _parent_gone() -> bool:
    """Whether the lifeline has reached end-of-file. (A descriptor a task closed is not.)"""
    return any(mask & (select.POLLIN | select.POLLHUP) for _fd, mask in _lifeline_poll.poll(0))


def _results(kind: int, fn: Callable[..., Any], items: Iterable[Any]) -> Iterator[Any]:
    """The results of ``items``, computed lazily by C-level iterators where the kind allows."""
    if kind == CALL_ONE:
        return map(fn, items)
    if kind == CALL_STAR:
        return itertools.starmap(fn, items)
    return (fn(*args, **kwargs) for args, kwargs in items)


class _Held:
    """What a running unit has finished and not sent yet. The main thread adds each result
    as its item finishes, and sends what is held between batches, once it is ``flush_every``
    old or ``FLUSH_BYTES`` big; the flusher thread sends it while an item runs on past that
    age (see ``_flusher``). Every send holds ``_send_lock``, so frames never interleave.
    ``values[:sent]`` went already (sent by the flusher); ``offset`` is the unit's index of
    ``values[0]``."""

    __slots__ = ("due", "errors", "flush_every", "offset", "out", "sent", "since", "spill", "uid")

    def __init__(self, out: int, uid: int, flush_every: float, spill: str | None) -> None:
        self.out = out
        self.uid = uid
        self.flush_every = flush_every
        self.spill = spill
        self.offset = 0
        self.sent = 0
        self.errors: dict[int, CapturedError] | None = None
        self.since = time.monotonic()  # when the items not sent yet began
        self.due = self.since + flush_every

    def send(self, values: list[Any], status: int, now: float) -> None:
        """Send ``values[sent:]``, with ``status``: the main thread's send (the list is then
        done with: the caller starts a new one)."""
        errors = self.errors
        part = values
        if self.sent:
            part = values[self.sent :]
            if errors:
                errors = {k - self.sent: e for k, e in errors.items() if k >= self.sent} or None
        _send(
            self.out,
            (self.uid, self.offset + self.sent, part, errors, status, now - self.since),
            self.spill,
        )
        self.offset += len(values)
        self.sent = 0
        self.errors = None
        self.since = now
        self.due = now + self.flush_every

    def send_some(self, values: list[Any], now: float) -> None:
        """The flusher's send: what ``values`` holds now, while the main thread goes on adding
        to it."""
        n = len(values)
        if n <= self.sent:
            return
        begin = self.sent
        errors = None
        if self.errors:
            errors = {k - begin: e for k, e in self.errors.items() if begin <= k < n} or None
        _send(
            self.out,
            (self.uid, self.offset + begin, values[begin:n], errors, PARTIAL, now - self.since),
            self.spill,
        )
        self.sent = n
        self.since = now
        self.due = now + self.flush_every


_send_lock = threading.Lock()
_held: tuple[_Held, list[Any]] | None = None  # the running unit's, for the flusher
_unit_started = threading.Event()
_flusher_started = False


def _flusher() -> None:
    """Send what a unit holds once it is ``flush_every`` old, while the main thread is inside
    a batch (an item that runs long): the results finished before it reach the parent now,
    not when it ends, and a worker killed meanwhile loses only what had not been sent. The
    main thread checks the age only between batches, so that tiny tasks pay nothing per item."""
    while True:
        current = _held
        if current is None:
            _unit_started.wait()
            _unit_started.clear()
            continue
        held, values = current
        if time.monotonic() >= held.due and len(values) > held.sent:
            with _send_lock:
                if _held is current:  # the main thread did not send it meanwhile
                    held.send_some(values, time.monotonic())
        due = held.due
        # Nothing of the unit's is held while this sleeps: its results are freed by the main
        # thread, when it is done with them, not here later (a task's memory, and glibc's
        # count of mapped blocks, which a task may read, must not change under it).
        del current, held, values
        time.sleep(min(max(due - time.monotonic(), 0.005), FLUSH_EVERY))


def _run_unit(
    out: int,
    gate: memoryview,
    uid: int,
    kind: int,
    fn: Callable[..., Any],
    items: Sequence[Any],
    flush_every: float,
    spill: str | None = None,
    batch: int = 1,
    item_claims: int = 0,
) -> int:
    """Run the items, in batches of ``batch`` items at first; return the batch size reached
    (for the next unit of the same function). Report every ``flush_every`` seconds (0: after
    every item, which the parent asks for when the task has a timeout, so that it knows when
    each item started). With ``spill`` (a folder), results of ``SPILL_BYTES`` or more go to
    files there. With ``item_claims`` (tasks that travel together, see _manager), item ``k``
    after the first runs only once this worker has its claim, number ``item_claims + k - 1``:
    the parent may take the items from one on back for an idle worker, and the unit then ends
    before it.

    Each batch runs as ``values.extend(map(fn, compress(batch, gate)))``: no Python bytecode
    per item, and the gate read just before each one. When an item raises, ``extend`` keeps
    the values before it, the item gets its error, and the batch goes on from the next item.
    While a batch runs, the flusher thread sends what it holds once that is ``flush_every``
    old (see ``_Held``).
    """
    global _held, _flusher_started
    n = len(items)
    source = iter(items)
    held = _Held(out, uid, flush_every, spill)
    values: list[Any] = []
    stopped = False
    cap = _MAX_BATCH  # how many results make FLUSH_BYTES, as far as the worker can tell
    if flush_every:
        if not _flusher_started:
            _flusher_started = True
            start_quiet_thread(_flusher, "cleanbreak-flusher")
        _held = (held, values)
        _unit_started.set()
    try:
        while not stopped and (pos := held.offset + len(values)) < n:
            if _parent_gone():
                _orphaned()
            if _is_closed(gate) or _stop_requested:
                break
            if item_claims:  # one item at a time, each once it is claimed
                if pos and not _claim(item_claims + pos - 1):
                    n = pos  # the parent took this item and those after it back
                    break
                end = pos + 1
            else:
                end = min(n, pos + min(batch, cap))
            started = time.monotonic()
            while (pos := held.offset + len(values)) < end:
                try:
                    with _interruptible_zone():
                        chosen = itertools.compress(itertools.islice(source, end - pos), iter(gate))
                        values.extend(_results(kind, fn, chosen))
                except BaseException as exc:
                    if _stop_requested:
                        # Broken off by the stop (or failed because of it): it did not finish.
                        stopped = True
                        break
                    error = CapturedError.capture(exc)
                    with _send_lock:  # the flusher reads the errors
                        if held.errors is None:
                            held.errors = {}
                        held.errors[len(values)] = error
                        values.append(None)
                else:
                    if held.offset + len(values) < end:  # the gate closed: the rest was not run
                        stopped = True
                        break
            now = time.monotonic()
            took = now - started
            if took < _FAST and batch < _MAX_BATCH and flush_every:
                batch *= 2
            elif took > _SLOW and batch > 1:
                batch //= 2
            if values:
                cap = max(1, int(FLUSH_BYTES // _result_bytes(values[-1])))
            if (
                not stopped
                and held.offset + len(values) < n
                and (now >= held.due or len(values) - held.sent >= cap)
            ):
                with _send_lock:
                    held.send(values, PARTIAL, now)
                    done, values = values, []
                    if flush_every:
                        _held = (held, values)
                done.clear()  # freed here, even if the flusher still holds the list
    finally:
        if flush_every:
            with _send_lock:  # the flusher sends nothing of this unit from now on
                _held = None
    if held.offset + len(values) >= n:
        status = DONE
    elif _stop_requested:
        status = STOPPED
    else:
        status = SKIPPED
    held.send(values, status, time.monotonic())
    values.clear()  # freed here, even if the flusher still holds the list
    return min(batch, cap)


def _result_bytes(value: Any) -> float:
    """How many bytes a result holds, as well as the worker can tell at once (at least 1)."""
    return max(1.0, size_of(value), _item_bytes)


def _send_or_orphan(out: int, *parts: bytes | Packer) -> None:
    try:
        send_frame(out, *parts)
    except BrokenPipeError:  # the parent is gone, and nobody will read this
        _orphaned()


def _send_ready(out: int, error: CapturedError | None) -> None:
    try:
        payload = dumps(error)
    except Exception:  # pragma: no cover - capture() already made it picklable
        payload = dumps(CapturedError(None, error.tb if error else ""))
    _send_or_orphan(out, payload)


def _send(out: int, message: tuple[Any, ...], spill: str | None = None) -> None:
    uid, offset, values, errors, status, seconds = message
    try:
        payload = _pack((values, errors))
    except BaseException:
        # Some value would not pickle, or its pickling raised even SystemExit: that item
        # fails alone, and the worker goes on.
        payload = _pack(_picklable(values, errors))
    # Only a message of SPILL_BYTES or more can hold a result that large: tiny results pay
    # nothing for it.
    files = None
    if spill is not None and payload.total >= SPILL_BYTES:
        files = _spill(spill, values, errors)
    header = dumps((uid, offset, len(values), status, seconds, files))
    _send_or_orphan(out, header, payload)
    global _sent, _item_bytes
    _sent = max(_sent, largest(payload.layout))
    if values:
        _item_bytes = payload.total / len(values)


def _spill(folder: str, values: list[Any], errors: dict[int, Any] | None) -> dict[int, str] | None:
    """Write each result of ``SPILL_BYTES`` or more to a file of its own in ``folder``; the
    temporary name of each, by its index in ``values``. A result that does not pickle plainly
    here, or a file that cannot be written, is left to the parent (which pickles it then)."""
    files: dict[int, str] | None = None
    for k, value in enumerate(values):
        if (errors and k in errors) or _result_bytes(value) < SPILL_BYTES:
            continue
        name = _spill_one(folder, value)
        if name is not None:
            if files is None:
                files = {}
            files[k] = name
    return files


class _FileOut:
    """What the pickler writes to: straight to the file's descriptor, each large payload (a
    ``bytes``, an array's memory) as it is, without a copy into the pickle."""

    __slots__ = ("fd", "size")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        while view:  # a write() of 2 GiB or more writes only part of it
            view = view[os.write(self.fd, view) :]
        self.size += n
        return n


def _spill_one(folder: str, value: Any) -> str | None:
    global _spilled
    _spilled += 1
    name = f".w{os.getpid()}-{_spilled}.tmp"
    path = os.path.join(folder, name)
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
    except OSError:
        return None
    out = _FileOut(fd)
    try:
        pickle.Pickler(out, protocol=5).dump(value)
    except BaseException:  # does not pickle plainly here (a by-value class), a full disk
        out.size = 0
    finally:
        os.close(fd)
    if out.size < SPILL_BYTES:
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None
    return name


def _pack(obj: object) -> Packer:
    """Results packed for the parent: plainly, or, where that fails, with what has no
    importable home sent by value (an instance of a class that came by value from a notebook,
    a lambda; see ``_byvalue``)."""
    try:
        return Packer(_segments).pack(obj)
    except Exception:
        from . import _byvalue

        return Packer(_segments).pack(obj, _byvalue.pickler(False))


def _picklable(
    values: list[Any], errors: dict[int, CapturedError] | None
) -> tuple[list[Any], dict[int, CapturedError] | None]:
    """Find the values that would not pickle and replace each with a SerializationError."""
    errors = dict(errors or {})
    clean: list[Any] = []
    for i, value in enumerate(values):
        try:
            dumps_any(value)
        except BaseException as exc:
            reason = f"{type(value).__name__} object: {type(exc).__name__}: {exc}"
            errors[i] = CapturedError(SerializationError("result", reason), "")
            clean.append(None)
        else:
            clean.append(value)
    return clean, errors or None
