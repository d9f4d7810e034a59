"""The local-process backend: worker processes and the one thread that waits on them.

How a task and its result travel::

    caller thread                 manager thread (this module)              worker process
    ─────────────                 ────────────────────────────              ──────────────
    Pool.submit / map
      │ Unit into `pending` ──▶  wake pipe ─┐
      │                                     ▼
      │                          selector.select([wake pipe,       ◀── the one place that waits
      │                                           result pipes,
      │                                           worker pidfds,
      │                                           task pipes with bytes to write],
      │                                          timeout = nearest deadline)
      │                           _dispatch: pickle Unit, FrameWriter ── task pipe ──▶ run items
      │                                                                                │
      │                           _on_result: FrameReader ◀──────────── result pipe ──┘
      │                             sink.deliver()  (sets futures, feeds map queues)
      ▼
    Future.result() / map iterator wakes

    Signals: the handler (main thread) sets the shared stop flag, which workers read between
    items, and raises the stop level; the manager, woken through the wake pipe, signals the
    workers' process groups and reaps them.

Actors:

- *Caller threads* append ``Unit`` objects to ``pending`` (a deque, safe to append to from any
  thread) and write a byte to the wake pipe, or send the unit themselves while the manager
  waits (see "Sending from the caller's thread").
- *The manager thread* owns every worker, pipe and in-flight unit (a caller's thread that
  sends for it holds them only while it does). It pickles units, writes
  them without blocking, reads results as they arrive, notices deaths through each worker's
  pidfd, enforces task deadlines, and runs the stop sequence. Nothing here sleeps to poll: every
  wake-up is an event or a deadline (the select's timeout).
- *Workers* run units in order (see ``_worker``). A worker holds at most ``PREFETCH`` map
  chunks, so that it never waits for the next one (more, while all it holds is expected to be
  brief: ``AHEAD_SECONDS``); a chunk is sent ahead to a busy worker only while at least one
  waits for each worker, or while it is brief (at the tail, the first worker that is free
  takes it: one sent ahead could wait behind a long item while the others go idle). A chunk
  sent ahead can still be taken back while it waits: see "Taking back" below. A
  ``submit`` task is sent only to an idle worker, which starts it on arrival: until then it is
  in the parent, where ``Future.cancel()`` can still stop it.

A worker runs its units in the order they were sent, so the head of its ``inflight`` queue is
the unit it is running, and ``head_since`` is when its current item started: when the previous
item's outcome arrived, or when the unit was sent to an idle, ready worker. Units with a
timeout report after every item, which keeps that exact.

Taking back: a chunk sent ahead waits behind the worker's running item, which may turn out to
be long while the other workers run out of work (the stock pool's workers take each task from
one shared queue, so a free worker never waits while a task waits behind a busy one). So each
chunk sent ahead has a *claim*: an 8-byte number the manager writes to the worker's claim pipe
before the chunk itself. The worker reads a claim before it starts such a chunk, and a worker
with nothing left to do makes the manager read one for it: a pipe hands each byte to one reader
only, so the chunk runs in exactly one of the two places. A worker that finds its chunk's claim
gone skips the chunk (it still takes in the function, whose numbering both sides keep in step)
and says nothing; the manager has sent it to the free worker. Claims are read in the order they
were written, so reading one also tells which earlier ones the worker took.

Every unit has a claim, not only one sent ahead: one sent to an idle worker has one too, though
nothing takes back a unit at the head of a worker's queue. So the claims a worker never read
say, once it dies, which of its units never started (they run again, whole), and a worker
that comes to a chunk whose claim is gone, which it learns by reading the next claim and then
holds, holds the claim of the unit it starts next, never that of a task waiting behind a long
one. (With no claim on a unit sent to an idle worker, the next claim could be the one of the
second task of a loose unit, below: a task behind a long first one that no free worker could
take back; and a worker killed from outside while idle would fail the task sent to it just
before the manager saw it die.)

Tasks that travel together: a task of a few microseconds that travels alone (an
``apply_async`` of the ``multiprocessing.Pool`` face, a map's item with ``chunksize=1``) costs
some tens of microseconds of its own, in the parent and in the worker: its unit, its frame,
its result's frame. So units of one item that wait here, one behind the other, of the same
function and sink (whose ``merges`` says their indices may share a unit), go as one unit, while
the function's last items took so little that it is expected to take at most
``MERGE_SECONDS``; a task with a timeout, or one retried, goes alone. Such a unit is *loose*:
each of its items after the first has a claim of its own, written after the unit's, and the
worker takes it before it starts that item. A worker that is free while nothing waits takes
back the items of a loose unit that another worker has not claimed, once that unit has run
``LOOSE_GRACE`` (it was expected to take less): the worker, finding the claim of its next item
gone, ends the unit there. So a task that travels behind a long one still goes to the first
worker that is free, a moment later, as the stock pool's one queue would give it. When a
worker dies in a loose unit, the claims it never read say which item it was running (the
first after the last it read): that one fails, as a task that travels alone would, those
after it never started and go on together, and those before it that finished unreported
run again, each alone (see ``_settle_loose``).

Sending from the caller's thread: a task submitted while the manager waits in select would
cost a wake-up of the manager (the wake pipe, then the manager's turn at the GIL) before it
reaches a worker, the largest part of a round trip's time in the parent. So the manager holds
``_state`` at all times except while select waits, and ``put`` tries to take it without waiting:
if it can, the caller's thread runs ``_dispatch`` itself, with everything the manager would do
(pickling, the function list, claims, the selector's write interest, which epoll sees at once),
and wakes the manager only if something is left (a unit that does not pickle goes back for
the manager to report from its own thread, so no callback runs inside ``submit``; a deadline
to keep). If it cannot, the manager is busy and will dispatch anyway: the byte goes as before.
In the main thread this runs only while the signal handlers that can run there are ours, and
with ``_signals.holding`` set: a Ctrl-C that comes meanwhile stops the pool at once (the gate
closes) and its ``Interrupted`` is raised a moment later, never half-way through a send.

When a worker dies, the manager knows which unit it was running but, for a chunk that reports
every 50 ms, not which item: it retries each item without an outcome alone, so the one at fault
fails by itself and the others keep their results. (A loose unit's claims tell the item, see
above; and a unit sent ahead whose claim the worker never read had not started: it runs
again whole.)
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import math
import multiprocessing
import os
import pickle
import select
import selectors
import signal
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext

from . import _byvalue, _signals
from ._errors import BrokenPool, SerializationError, TaskTimeout, WorkerDied
from ._shm import Packer, Segments, load, remove_unread
from ._signals import HANDLED
from ._units import Intake, Unit, record_attempts
from ._wire import (
    DONE,
    PARTIAL,
    SKIPPED,
    STOPPED,
    CapturedError,
    FrameReader,
    FrameWriter,
    discard,
    dumps,
    make_pipe,
    read_claim,
    split,
    write_claims,
)
from ._worker import (
    UNREADABLE,
    WORKER_FUNCTIONS,
    BlockedOnArrival,
    close_gate,
    new_gate,
    worker_main,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see _notyping)
if TYPE_CHECKING:
    from typing import Any

    _Ref = Callable[
        [], Callable[..., Any] | None
    ]  # a weak reference to a function, or _byvalue.Strong

PREFETCH = 2
# A worker holds more units than that, up to PREFETCH_BRIEF, while all it holds is expected to
# take at most AHEAD_SECONDS (a small map's chunks of fast items, see Unit.expect): each would
# otherwise wait in the parent for a round trip, many times its own time. The stock pool's
# workers take such chunks from one queue without a round trip each.
PREFETCH_BRIEF = 8
AHEAD_SECONDS = 0.002
# Waiting units of one function whose sink allows it (the ``multiprocessing.Pool`` face's
# ``apply_async`` tasks, see _pool._AheadSinks) travel as one unit, while the function's last
# items took so little that the unit is expected to take at most MERGE_SECONDS, and up to
# MERGE_ITEMS of them: a task of a few microseconds would otherwise cost some tens of
# microseconds of its own, in the parent and in the worker, for its frame, its unit and its
# result's (see "Tasks that travel together").
MERGE_SECONDS = 0.001
MERGE_ITEMS = 64
# A free worker takes back the items of such a unit that another worker has not started only
# once that unit has run this long (its items were expected to take at most MERGE_SECONDS):
# before that, it would only split a unit that is about to end (see "Taking back"). Not where
# that worker also holds a unit sent ahead, which is taken back at once: its claim comes after
# those of the items before it, which go with it.
LOOSE_GRACE = 0.002
# A unit this large is not sent ahead to a busy worker: moving it costs more than the idle
# moment that prefetching saves, and each queued copy would sit in the parent's memory.
PREFETCH_MAX_BYTES = 1 << 20
# After SIGTERM, a worker (or a process it started) that is still alive this long is killed.
STOP_GRACE = 0.5
# Workers that die this many times in a row before they are ready mean something in their
# start-up is broken (an import, a crash in the initializer): the pool gives up instead of
# starting workers in a loop.
BARREN_DEATHS = 3
# The exit code of a worker that found, while it imported the main module, that the module
# starts a pool at import time (see Pool.__init__), and the error the pool then raises.
NO_MAIN_GUARD_EXIT = 121
NO_MAIN_GUARD = (
    "the workers import your main module, and it starts a pool as it is imported: put the "
    'code that starts the pool under `if __name__ == "__main__":` (the forkserver and spawn '
    "start methods run the main module's top-level code in every worker)"
)

# Stop levels, in order of escalation.
RUNNING, DRAINING, STOPPING, KILLING = 0, 1, 2, 3

# Why the manager killed a worker.
_TIMEOUT, _CANCEL = "timeout", "cancel"


class _LeftToManager(Exception):
    """A caller's thread leaves the unit it could not pickle to the manager thread."""


# ── file descriptors a forked child must not keep ────────────────────────────────────────────
#
# With the fork start method a worker inherits every descriptor of the parent, including the
# parent's end of other workers' pipes and of the lifeline. A worker that kept the lifeline's
# write end open would stop every worker from noticing the parent's death. So the parent's ends
# are listed here, and any forked child closes them first thing.

_parent_fds: set[int] = set()


def _close_parent_fds() -> None:
    for fd in list(_parent_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _parent_fds.clear()


os.register_at_fork(after_in_child=_close_parent_fds)


def _own(fd: int) -> int:
    os.set_blocking(fd, False)
    _parent_fds.add(fd)
    return fd


def _close(fd: int) -> None:
    _parent_fds.discard(fd)
    with contextlib.suppress(OSError):
        os.close(fd)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the worker's process group, or the worker alone if it has not made one yet."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class _Worker:
    __slots__ = (
        "ahead_seq",
        "claimed_upto",
        "claims_out",
        "claims_r",
        "claims_w",
        "deathfd",
        "dispatched",
        "doom",
        "exitcode",
        "forget",
        "functions",
        "gone",
        "has_pidfd",
        "head_since",
        "inflight",
        "last_bytes",
        "pid",
        "proc",
        "reader",
        "ready",
        "recycle",
        "retiring",
        "segments",
        "stopped",
        "writer",
    )

    def __init__(self, proc: Any, task_fd: int, result_fd: int, claims: tuple[int, int]) -> None:
        self.proc = proc
        # The claim pipe of the chunks sent ahead (see "Taking back"): the manager's copy of
        # its read end, and its write end; and the claims known to be read (numbered 1, 2, ...).
        self.claims_r, self.claims_w = claims
        self.claimed_upto = 0
        self.ahead_seq = 0  # the number of the last claim written (every unit has one)
        self.claims_out: list[int] = []  # claims to write before the frames that wait
        self.pid: int = proc.pid
        self.writer = FrameWriter(task_fd)
        self.reader = FrameReader(result_fd)
        self.inflight: deque[Unit] = deque()
        self.ready = False  # has sent its first frame: started, initializer done
        self.head_since = 0.0  # when the current item of inflight[0] started
        self.dispatched = 0  # items sent, for max_tasks_per_worker
        self.last_bytes = 0  # size of the last unit sent
        self.retiring = False  # has been sent the message to exit
        self.recycle = False  # ...because it reached max_tasks_per_worker: replace it
        # Why the manager killed it, if it did, and the unit and item it was running then.
        self.doom: tuple[str, int, int] | None = None
        self.exitcode: int | None = None
        self.segments: dict[int, list[tuple[str, int]]] = {}  # uid -> its frame's segments
        # The unit and item a SIGTERM broke off, as the worker reported before dying of it.
        self.stopped: tuple[int, int] | None = None
        self.gone = False  # reaped and forgotten: its descriptors are closed
        # The numbers of the functions it holds, least recently used first: the same list as
        # the worker's own, since both sides update it unit by unit, in the order sent.
        self.functions: OrderedDict[int, None] = OrderedDict()
        self.forget: tuple[int, ...] = ()  # dropped from it, for the next frame to say so
        # A pidfd becomes readable when the process exits. The multiprocessing sentinel is a
        # pipe that a process forked by the task inherits, so it would not fire while that
        # grandchild lives on.
        try:
            self.deathfd: int = os.pidfd_open(self.pid)
            self.has_pidfd = True
        except (AttributeError, OSError):  # pragma: no cover - not Linux, or Linux < 5.3
            self.deathfd = proc.sentinel
            self.has_pidfd = False

    def deadline(self) -> float | None:
        if not self.inflight or not self.ready or self.doom is not None:
            return None
        timeout = self.inflight[0].opts.task_timeout
        return None if timeout is None else self.head_since + timeout


# How a function (or a unit's items) is pickled for a worker: as plain pickle sends it where
# that works (else by value); by value, with what ``__main__`` holds under its name sent by
# reference (the worker runs the script too); everything by value, ``__main__`` included.
PLAIN, BY_VALUE, WHOLE = 0, 1, 2


class _Functions:
    """The functions the parent sends, each under a number of its own.

    A unit names its function by number; a worker that does not hold that number yet gets the
    function with the unit, and keeps it (its last ``WORKER_FUNCTIONS``), so a map of many
    chunks sends its function to each worker once. That matters for a function sent by value
    (a notebook's, a lambda, a closure over data), which may be large and slow to pickle.

    A function is first sent as plain pickle would send it, unless it has no importable home
    (see ``_byvalue``). If a worker then cannot find a name it needs (a script's function
    defined under the ``__main__`` guard, or after a fork), it is sent whole by value from then
    on, under a new number. An entry holds its function weakly where it can (functions, bound
    methods, ``partial`` objects): a bound method or a ``partial`` holds its object, which may
    be large, and the pool must not keep it alive once the user has let it go. A function
    that cannot be held weakly (a builtin) is held, so that its ``id`` is not reused while it
    is listed; a weakly held one is known by its reference, which is dead once its ``id``
    could be another object's. The entry of a function that died is dropped at the next look
    (with what its copy by value took).

    A copy by value holds what the function used when it was sent (``_byvalue.taken``): once
    one of those is another object (a notebook cell sets a parameter again, or defines a
    function it calls again), the function goes again, under a new number, as it would
    from a pool made anew; the workers' copy is never used with what it no longer matches.
    """

    SIZE = 64

    def __init__(self) -> None:
        # id -> (the function's reference, its number, how it goes, what its copy by value
        # took)
        self._entries: OrderedDict[int, tuple[_Ref, int, int, tuple[object, ...]]] = OrderedDict()
        self._numbers = itertools.count(1)
        self._refs = _byvalue.Referrer()  # the entries' references; the dead, for each look
        # Numbers no unit will name again (their function died, or went again under a new
        # number, or left the list): the workers are told to let their copies go.
        self.gone: list[int] = []

    def _entry(self, fn: Callable[..., Any]) -> tuple[_Ref, int, int, tuple[object, ...]] | None:
        """``fn``'s entry, if it has one (not that of a function that had its ``id``)."""
        for dead in self._refs.purge(self._entries, lambda e: e[0]):
            self.gone.append(dead[1])
        entry = self._entries.get(id(fn))
        if entry is None or entry[0]() is not fn:
            return None
        return entry

    def lookup(self, fn: Callable[..., Any]) -> tuple[int, int]:
        """The function's number, and how it goes (``PLAIN``, ``BY_VALUE`` or ``WHOLE``)."""
        entry = self._entry(fn)
        if entry is not None:
            _ref, fid, how, took = entry
            if how != PLAIN and not _byvalue.same(took, now := _byvalue.taken(fn)):
                return self._put(fn, how, now)  # what it uses changed: a new copy
            self._entries.move_to_end(id(fn))
            return fid, how
        return self._put(fn, PLAIN)

    def sent_as(self, fn: Callable[..., Any], fid: int, how: int) -> None:
        """It went ``how`` (plain pickle failed: by value): so straight away next time."""
        entry = self._entry(fn)
        if entry is not None and entry[1] == fid and how > entry[2]:
            self._entries[id(fn)] = (entry[0], fid, how, _byvalue.taken(fn))

    def whole_from_now(self, fn: Callable[..., Any], fid: int) -> bool:
        """A worker could not find a name ``fn`` needs, sent as number ``fid``. True if it is
        to be sent again: whole by value from now on, or it has been since, under a newer
        number."""
        entry = self._entry(fn)
        if entry is None:
            return False
        if entry[1] != fid:
            return entry[2] == WHOLE
        if entry[2] == WHOLE:
            return False  # it went whole by value, and still cannot be loaded
        self._put(fn, WHOLE)
        return True

    def _put(
        self, fn: Callable[..., Any], how: int, took: tuple[object, ...] | None = None
    ) -> tuple[int, int]:
        fid = next(self._numbers)
        if took is None:
            took = _byvalue.taken(fn) if how != PLAIN else ()
        key = id(fn)
        entry = self._entries.get(key)
        if entry is not None:
            self.gone.append(entry[1])
        ref = entry[0] if entry is not None and entry[0]() is fn else self._refs.refer(key, fn)
        self._entries[key] = (ref, fid, how, took)
        self._entries.move_to_end(key)
        while len(self._entries) > self.SIZE:
            self.gone.append(self._entries.popitem(last=False)[1][1])
        return fid, how


class LocalBackend(Intake):
    """Worker processes on this machine, run by one manager thread."""

    def __init__(
        self,
        workers: int,
        ctx: BaseContext,
        initializer: Callable[..., object] | None,
        initargs: Sequence[Any],
        max_tasks_per_worker: int | None = None,
        reuse_memory: bool = True,
    ) -> None:
        self.size = workers
        self._reuse_memory = reuse_memory
        self._ctx = ctx
        # Whether the workers can import the main module (a script's), or everything of it
        # goes by value (a notebook's, the REPL's: see _byvalue).
        self._main_by_value = not _byvalue.main_importable()
        if self._main_by_value:
            _skip_missing_main()
        self._functions = _Functions()
        # The time per item of each function's last unit whose sink merges (by the function's
        # number): what decides whether its waiting units travel together (MERGE_SECONDS).
        self._item_seconds: dict[int, float] = {}
        self._loose_due: float | None = None  # when a free worker takes back such items
        self._initializer: Any = initializer
        self._initargs: Any = tuple(initargs)
        if ctx.get_start_method() != "fork" and (initializer is not None or initargs):
            # multiprocessing pickles them itself, by reference: a cell's initializer would
            # not load in the worker.
            self._initializer = _byvalue.ship(initializer, self._main_by_value)
            self._initargs = _byvalue.ship(self._initargs, self._main_by_value)
        self._max_tasks = max_tasks_per_worker
        self.pending: deque[Unit] = deque()
        self._commands: deque[int] = deque()  # uids to stop, from Pool.cancel
        self._uids = itertools.count()
        # Closed by the signal handler in the main thread, read by workers before each item.
        self.gate: Any = new_gate()
        self.level = RUNNING
        self._level_seen = RUNNING
        self._closing = False
        self._cancel_pending = False
        self._broken: BaseException | None = None
        self._barren_deaths = 0
        self.taken_back = 0  # chunks sent ahead and taken back for a free worker (for tests)
        self.sent_by_callers = 0  # units a caller's thread sent itself (for tests)
        self.travelled_together = 0  # units that went in another's (for tests)
        self._kill_at: float | None = None
        self.finished = threading.Event()
        # Reentrant: wake() runs in the signal handler, which may interrupt the main thread
        # inside put().
        self._lock = threading.RLock()
        self._accepting = True
        self._wake_pending = False
        # Held by the manager thread except while it waits in select, and by a caller's thread
        # that sends for it meanwhile (see "Sending from the caller's thread").
        self._state = threading.Lock()
        self._from_caller = False  # a caller's thread runs _dispatch (holding _state)
        self._then_wake = False  # ...and what it sent needs the manager (a deadline to keep)

        wake_r, wake_w = os.pipe()
        self._wake_r = _own(wake_r)
        self._wake_w = _own(wake_w)
        lifeline_r, lifeline_w = os.pipe()
        self._lifeline_r = lifeline_r  # handed to every worker; the parent's copy stays open
        self._lifeline_w = _own(lifeline_w)
        os.set_blocking(lifeline_r, True)
        # The parent sends large arguments to every worker at once: a spare for each.
        self._segments = Segments.new_pool(spares=workers + 1)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._workers: dict[int, _Worker] = {}
        # Set once the manager thread has started the first workers (or failed to).
        self.started = threading.Event()
        self.start_error: BaseException | None = None
        # The manager thread starts the workers too, so that they start with SIGINT and SIGTERM
        # blocked, as it has them: a Ctrl-C that comes while a worker starts waits until the
        # worker ignores it, instead of raising KeyboardInterrupt in its bootstrap (or in the
        # fork server, if this starts it). Only the manager's threads are ever forked.
        self._thread = threading.Thread(target=self._run, name="cleanbreak-manager", daemon=True)
        _live.add(self)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)  # from its first instruction
        try:
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    # ── called from caller threads ───────────────────────────────────────────────────────

    def _queued(self) -> None:
        if self._full():
            return  # the manager sends it once it reads a result, and only then can it
        if not self._send_from_caller():
            self.wake()

    def _full(self) -> bool:
        """Whether every worker is ready and holds as many units as it may take, so that the
        manager's next dispatch, which follows every result it reads, is the first that can
        send what was just queued: then neither a send from the caller's thread nor a wake-up
        would send anything (a burst of ``apply_async`` calls made one of each, per task).
        A guess read from the caller's thread: where it may be wrong, it says False."""
        if self.level or self._closing:
            return False
        workers = list(self._workers.values())
        if len(workers) < self.size:
            return False
        for w in workers:
            if not w.ready or w.retiring or len(w.inflight) < PREFETCH:
                return False
        last = self.pending[-1] if self.pending else None
        return last is not None and not last.expect <= AHEAD_SECONDS

    def _send_from_caller(self) -> bool:
        """Send what waits, from this (the caller's) thread, if the manager is idle in select:
        whether that left the manager nothing to do (see "Sending from the caller's thread")."""
        main = _signals.in_main_thread()
        if main and not _signals.raises_only_ours():
            return False
        if main:
            _signals.holding = True  # first: from here on, no signal raises in this thread
        try:
            if not self._state.acquire(blocking=False):
                return False
            try:
                self._from_caller = True
                self._dispatch()
                # (A take-back it timed, _loose_due, is the manager's to keep: it is woken.)
                return not self.pending and not self._then_wake and self._loose_due is None
            except _LeftToManager:
                return False
            except BaseException as exc:  # pragma: no cover - a bug: as in the manager's loop
                self._broken = RuntimeError(f"cleanbreak failed to send a task: {exc!r}")
                raise
            finally:
                self._from_caller = self._then_wake = False
                self._state.release()
        finally:
            if main:
                _signals.holding = False

    def wake(self) -> None:
        # One byte in the pipe is enough: skip the write while one is already waiting (see
        # _drain_wake for why no wake-up is lost). Under the lock, so that the fd cannot be
        # closed (and its number reused) between the check and the write.
        if self._wake_pending:
            return
        with self._lock:
            self._wake_pending = True
            if self._wake_w >= 0:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.write(self._wake_w, b"\0")

    def raise_level(self, level: int) -> None:
        """Escalate the stop. Safe to call from a signal handler: it only sets state."""
        if level > self.level:
            if level >= DRAINING:
                close_gate(self.gate)
            self.level = level
            self.wake()

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in list(self._workers.values())]

    @property
    def broken(self) -> BaseException | None:
        return self._broken

    # ── the manager thread: the loop ─────────────────────────────────────────────────────

    def _run(self) -> None:
        # A signal sent to the process goes to a thread that does not block it. Were it to land
        # here, the main thread, perhaps asleep in a lock, would not be woken to run the Python
        # handler, and Ctrl-C would wait for that lock. Blocked here, it goes to the main thread.
        # (Workers forked from this thread inherit the mask; worker_main unblocks it.)
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        self._state.acquire()  # for good: released only while select waits
        try:
            self._start_workers()
            while True:
                self._apply_level()
                self._apply_commands()
                if self._closing and self._cancel_pending:
                    self._cancel_all_pending()
                self._dispatch()
                # After dispatch, which may have dropped the last (cancelled) units: deciding
                # before it could leave the loop blocked in select with nothing left to wake it.
                if self._done():
                    break
                timeout = self._timeout()
                self._state.release()
                try:
                    events = self._sel.select(timeout)
                finally:
                    self._state.acquire()
                for key, mask in events:
                    worker = key.data
                    if worker is None:
                        self._drain_wake()
                    elif worker.gone:
                        # It died earlier in this batch and its descriptors were closed, so
                        # their numbers may already belong to its replacement: an event
                        # reported for them before the death is stale. The replacement's
                        # own events come with the next select.
                        continue
                    elif key.fd == worker.deathfd:
                        self._on_death(worker)
                    elif mask & selectors.EVENT_WRITE:
                        self._flush(worker)
                    else:
                        self._on_readable(worker)
                self._check_deadlines()
        except BaseException as exc:  # pragma: no cover - a bug here must not hang the caller
            self._broken = RuntimeError(f"cleanbreak's manager thread failed: {exc!r}")
            self._abort()
            raise
        finally:
            with self._lock:
                self._accepting = False
            err = self._broken
            while self.pending:
                unit = self.pending.popleft()
                if err is None:
                    unit.sink.cancel(unit.current, unit.left)
                else:
                    unit.sink.fail(unit.current, unit.left, err)
            self._teardown()

    def _start_workers(self) -> None:
        try:
            for _ in range(self.size):
                if self.level:  # stopped while the pool started: start no more
                    break
                self._spawn()
        except Exception as exc:
            # The caller's Pool() raises it; the loop then stops the workers that did start.
            broken = self._start_failure(exc, "its workers")
            self.start_error = exc if broken.__cause__ is exc else broken  # or the guard's
            self._break(broken)
        finally:
            self.started.set()

    def _start_failure(self, exc: Exception, what: str) -> BrokenPool:
        """The error for a worker that could not be started: the main module's missing guard,
        if that is what stopped the fork server, else ``exc`` (as the cause)."""
        if _fork_server_found_no_guard(self._ctx):
            return BrokenPool(NO_MAIN_GUARD)
        broken = BrokenPool(f"the pool could not start {what}: {exc!r}")
        broken.__cause__ = exc
        return broken

    def _done(self) -> bool:
        busy = any(w.inflight for w in self._workers.values())
        if self._workers:
            if self.level >= DRAINING or self._broken is not None:
                if not busy:
                    self._retire_all()
            elif self._closing and not self.pending and not busy:
                self._retire_all()
            return False
        if self.level >= DRAINING or self._broken is not None or self._closing:
            self._cancel_all_pending()
            return True
        return False

    def _timeout(self) -> float | None:
        deadlines = [d for w in self._workers.values() if (d := w.deadline()) is not None]
        if self._kill_at is not None:
            deadlines.append(self._kill_at)
        if self._loose_due is not None:
            deadlines.append(self._loose_due)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        # Cleared only after the read: a caller that still sees it set skipped its write, but
        # had queued its unit before looking, and the loop goes on to dispatch after this. Had
        # it been cleared before the read, a byte written in between would be read with it and
        # leave the flag set over an empty pipe: a lost wake-up.
        self._wake_pending = False

    # ── stopping ─────────────────────────────────────────────────────────────────────────

    def _apply_level(self) -> None:
        level = self.level
        if level == self._level_seen:
            return
        self._level_seen = level
        close_gate(self.gate)
        self._cancel_all_pending()
        for w in list(self._workers.values()):
            if not w.ready:
                # It may have become ready, and even started a unit sent ahead to it, since the
                # last select: read what it wrote. (The gate is closed now, so a worker that
                # becomes ready after this read starts nothing.)
                self._on_readable(w)
            if not w.ready:
                # Still starting: it holds no task and no result, and it would only exit
                # once it is ready. Killed now, it makes the caller wait for nothing.
                _signal_group(w.pid, signal.SIGKILL)
        if level >= KILLING:
            self._kill_at = None
            for w in self._workers.values():
                _signal_group(w.pid, signal.SIGKILL)
        elif level >= STOPPING:
            self._kill_at = time.monotonic() + STOP_GRACE
            for w in self._workers.values():
                _signal_group(w.pid, signal.SIGTERM)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        if self._kill_at is not None and now >= self._kill_at:
            self._kill_at = None
            for w in self._workers.values():
                _signal_group(w.pid, signal.SIGKILL)
        for w in self._workers.values():
            deadline = w.deadline()
            if deadline is not None and now >= deadline:
                self._kill(w, _TIMEOUT)

    def _kill(self, w: _Worker, why: str) -> None:
        head = w.inflight[0]
        w.doom = (why, head.uid, head.received)
        _signal_group(w.pid, signal.SIGKILL)

    def _apply_commands(self) -> None:
        while self._commands:
            uid = self._commands.popleft()
            for w in self._workers.values():
                for position, unit in enumerate(w.inflight):
                    if unit.uid != uid:
                        continue
                    if position == 0 and w.ready:
                        self._kill(w, _CANCEL)
                    else:  # not started yet: stopped when its turn comes
                        unit.cancelled = True

    def _cancel_all_pending(self) -> None:
        while self.pending:
            unit = self.pending.popleft()
            unit.sink.cancel(unit.current, unit.left)

    def _fail_all_pending(self, exc: BaseException) -> None:
        while self.pending:
            unit = self.pending.popleft()
            unit.sink.fail(unit.current, unit.left, exc)

    def _retire_all(self) -> None:
        for w in self._workers.values():
            self._retire(w)

    def _retire(self, w: _Worker) -> None:
        if not w.retiring:
            w.retiring = True
            w.writer.put(dumps(None))
            self._flush(w)

    # ── sending ──────────────────────────────────────────────────────────────────────────

    def _dispatch(self) -> None:
        self._loose_due = None
        if self.level or self._broken is not None:
            return
        if self.pending:
            self._send_pending()
        if not self.pending:
            self._take_back_for_idle()

    def _send_pending(self) -> None:
        """Send what waits to the workers that can take it, then flush each of them once: a
        write is a moment in which the other thread can take the GIL, so a dispatch makes as
        few as it can."""
        sent_to: set[_Worker] = set()
        try:
            self._send_some(sent_to)
        finally:
            for w in sent_to:
                self._flush(w)

    def _send_some(self, sent_to: set[_Worker]) -> None:
        live = [w for w in self._workers.values() if not w.retiring]
        for depth in range(1, PREFETCH_BRIEF + 1):
            if depth == 2:
                # Ahead first to the worker whose current item started first, the likeliest to
                # come free first: the next task then starts next, as from the stock pool's
                # one queue, rather than behind an item that has just begun.
                live.sort(key=lambda w: w.head_since)
            deep = depth > PREFETCH
            if deep and not self.pending[0].expect <= AHEAD_SECONDS:
                return
            for w in live:
                while len(w.inflight) < depth and self.pending and not w.retiring:
                    unit = self.pending[0]
                    if depth == 1:
                        self._send(w, self._next_unit())
                        sent_to.add(w)
                        continue
                    if not unit.sink.prefetch:
                        return  # in order: what follows waits behind it
                    if w.last_bytes >= PREFETCH_MAX_BYTES:
                        break
                    brief = unit.expect + sum(u.expect for u in w.inflight) <= AHEAD_SECONDS
                    if deep and not brief:
                        break
                    if len(self.pending) < len(live) and not brief:
                        # The tail: a unit sent ahead could wait behind a long item while
                        # another worker, busy for a moment only, goes idle. It waits here for
                        # the first worker that is free. (A brief one goes: the worker is busy
                        # for a moment only, and one that comes free takes it back.)
                        return
                    self._send(w, self._next_unit())
                    sent_to.add(w)
                if not self.pending:
                    return

    def _next_unit(self) -> Unit:
        """The unit at the head of the queue, out of it: with the units that wait behind it
        in one unit, where they may travel together (see MERGE_SECONDS)."""
        unit = self.pending.popleft()
        if (
            not self.pending
            or not unit.sink.merges
            or not unit.single
            or unit.opts.task_timeout is not None
        ):
            return unit
        per_item: float | None = unit.expect
        if per_item == math.inf:  # a task's: the function's last measured time per item
            entry = self._functions._entry(unit.fn)
            per_item = None if entry is None else self._item_seconds.get(entry[1])
        if per_item is None:
            return unit
        limit = min(MERGE_ITEMS, int(MERGE_SECONDS / max(per_item, 1e-6)))
        items = list(unit.items)
        end = unit.start + 1
        while self.pending and len(items) < limit:
            after = self.pending[0]
            if (
                after.sink is not unit.sink
                or after.fn is not unit.fn
                or after.start != end
                or not after.single
                or after.kind != unit.kind
                or after.opts is not unit.opts
                or after.by_value != unit.by_value
            ):
                break
            self.pending.popleft()
            items += after.items
            end += 1
        if len(items) == len(unit.items):
            return unit
        merged = Unit(unit.uid, unit.kind, unit.fn, items, unit.sink, unit.start, unit.opts)
        merged.by_value = unit.by_value
        merged.loose = True
        self.travelled_together += len(items) - 1
        merged.expect = per_item * len(items)
        return merged

    def _take_back_for_idle(self) -> None:
        """A worker that is free while nothing waits here takes a chunk that waits, sent ahead,
        behind another worker's running item, or the items not started of a unit of tasks
        that travel together that has run longer than expected (see "Taking back")."""
        workers = self._workers.values()
        idle = [w for w in workers if w.ready and not w.inflight and not w.retiring]
        if not idle:
            return
        now = time.monotonic()
        for w in workers:
            if w.doom is not None:
                continue
            upto = w.claimed_upto
            # Not the head's claim: that unit is running, or about to (see "Taking back").
            if not any(u.ahead > upto for u in itertools.islice(w.inflight, 1, None)):
                if not any(u.item_claims and u.last_claim > upto for u in w.inflight):
                    continue
                due = w.head_since + LOOSE_GRACE
                if now < due:  # only items of a unit of tasks that travel together: not yet
                    self._loose_due = due if self._loose_due is None else min(due, self._loose_due)
                    continue
            unit = self._take_back(w)
            if unit is not None:
                taker = idle.pop()
                self._send(taker, unit)
                self._flush(taker)
                if not idle:
                    return

    def _take_back(self, w: _Worker) -> Unit | None:
        """The oldest chunk of ``w``'s whose claim the worker has not read, if any: out of its
        queue (the worker skips it when it comes to it); or the items of a unit of tasks that
        travel together from the first whose claim it has not read (it stops that unit
        before it)."""
        while True:
            seq = read_claim(w.claims_r)
            if seq is None:  # the worker has read every claim written so far
                w.claimed_upto = max((u.last_claim for u in w.inflight), default=0)
                return None
            w.claimed_upto = seq  # the claims before it were the worker's
            for unit in w.inflight:
                if unit.ahead == seq:
                    return self._take_whole(w, unit)
                if unit.item_claims and unit.item_claims <= seq <= unit.last_claim:
                    k = seq - unit.item_claims + 1  # items k.. are ours: the worker runs k - 1
                    rest = unit.part(next(self._uids), k)
                    unit.items = unit.items[:k]
                    unit.cut = True
                    w.dispatched -= len(rest.items)
                    self.taken_back += 1
                    return rest
            # The claim of an item taken back with those after it, or of one of a unit taken
            # back whole: nobody's now. Read on.

    def _take_whole(self, w: _Worker, unit: Unit) -> Unit:
        if unit is w.inflight[0]:
            w.head_since = time.monotonic()  # the next chunk starts now
        w.inflight.remove(unit)
        w.segments.pop(unit.uid, None)  # the worker removes them as it skips the chunk
        w.dispatched -= len(unit.items)
        unit.ahead = 0
        self.taken_back += 1
        return unit

    def _forget_functions(self) -> None:
        """The workers are to let go of their copies of the functions no unit will name
        again, with their next frame (both sides drop them from their lists at that frame)."""
        gone = set(self._functions.gone)
        self._functions.gone.clear()
        for fid in gone:
            self._item_seconds.pop(fid, None)
        for w in self._workers.values():
            dropped = tuple(fid for fid in w.functions if fid in gone)
            if dropped:
                for fid in dropped:
                    del w.functions[fid]
                w.forget += dropped

    def _send(self, w: _Worker, unit: Unit) -> None:
        if not unit.sink.start(unit):
            return
        if self._max_tasks is not None:
            budget = self._max_tasks - w.dispatched
            if len(unit.items) > budget:
                self.pending.appendleft(unit.part(next(self._uids), budget))
                unit = unit.part(unit.uid, 0, budget)
        exact = unit.opts.task_timeout is not None
        fid, how = self._functions.lookup(unit.fn)
        unit.fid = fid
        if self._functions.gone:
            self._forget_functions()
        held = fid in w.functions
        # A user's object may raise anything while it is pickled, SystemExit included: that
        # task fails, and this thread goes on.
        fn_part: Packer | None = None
        if not held:
            try:
                fn_part, went = self._pack(unit.fn, how)
            except BaseException as exc:
                self._leave_to_manager(unit)
                reason = f"{unit.fn!r}: {type(exc).__name__}: {exc}"
                unit.sink.fail(unit.current, unit.left, SerializationError("function", reason))
                return
            self._functions.sent_as(unit.fn, fid, went)
        try:
            items_part, _ = self._pack(unit.items, WHOLE if unit.by_value else PLAIN)
        except BaseException as exc:
            if fn_part is not None:
                fn_part.release()
            self._leave_to_manager(unit)
            if self._split(unit):
                return
            reason = f"{type(exc).__name__}: {exc}"
            unit.sink.fail(unit.current, unit.left, SerializationError("arguments", reason))
            return

        if held:
            w.functions.move_to_end(fid)
        else:
            w.functions[fid] = None
            if len(w.functions) > WORKER_FUNCTIONS:
                w.functions.popitem(last=False)
        fn_total = 0 if fn_part is None else fn_part.total
        w.last_bytes = fn_total + items_part.total
        sent = (fn_part.sent if fn_part is not None else []) + items_part.sent
        if sent:
            w.segments[unit.uid] = sent
        if not w.inflight:
            w.head_since = time.monotonic()
        w.ahead_seq += 1  # its claim (see "Taking back"), written first, at the flush
        unit.ahead = w.ahead_seq
        w.claims_out.append(unit.ahead)
        unit.item_claims = 0
        if unit.loose and len(unit.items) > 1:  # a claim for each item after the first
            unit.item_claims = w.ahead_seq + 1
            w.ahead_seq += len(unit.items) - 1
            w.claims_out.extend(range(unit.item_claims, w.ahead_seq + 1))
        w.inflight.append(unit)
        w.dispatched += len(unit.items)
        if self._from_caller:
            self.sent_by_callers += 1
            self._then_wake = self._then_wake or exact  # the manager is to keep its deadline
        # With a journal, the folder where the worker writes its large results (_worker).
        spill = getattr(unit.sink, "spill", None)
        forget, w.forget = w.forget, ()
        w.writer.put(
            dumps((unit.uid, unit.kind, exact, fid, spill, unit.ahead, unit.item_claims, forget)),
            b"" if fn_part is None else fn_part,
            items_part,
        )
        if self._max_tasks is not None and w.dispatched >= self._max_tasks:
            w.recycle = True
            self._retire(w)

    def _leave_to_manager(self, unit: Unit) -> None:
        """In a caller's thread: the unit does not pickle. It goes back to the head of the
        queue for the manager, which tries again and reports the failure from its own thread,
        as it reports every outcome (a callback never runs inside ``submit``)."""
        if self._from_caller:
            self.pending.appendleft(unit)
            raise _LeftToManager

    def _pack(self, obj: object, how: int) -> tuple[Packer, int]:
        """``obj`` pickled for a worker ``how`` it is to go (see ``PLAIN``), and how it
        went: as plain pickle sends it where that works and the worker can import the main
        module, else by value (see ``_byvalue``)."""
        if how == PLAIN:
            try:
                if not self._main_by_value:
                    return Packer(self._segments).pack(obj), PLAIN
                # No worker can import the main module: what names nothing of it (an
                # importable function; the usual arguments) still goes plain, at its speed.
                return Packer(self._segments).pack(obj, _byvalue.MainlessPickler), PLAIN
            except Exception:
                pass  # a lambda, a closure, a local class, something of __main__: by value
        # WHOLE: a function a worker could not find by name goes by value whole, ``__main__``
        # included: it was found there in this process, and not in the worker's.
        try:
            pickler = _byvalue.pickler(self._main_by_value or how == WHOLE)
        except _byvalue.CloudpickleMissing:
            if how != WHOLE:
                with contextlib.suppress(Exception):  # what is importable still goes
                    return Packer(self._segments).pack(obj), PLAIN
            raise
        return Packer(self._segments).pack(obj, pickler), max(how, BY_VALUE)

    def _flush(self, w: _Worker) -> None:
        if w.claims_out:  # before the frames of their chunks (see "Taking back")
            claims, w.claims_out = w.claims_out, []
            write_claims(w.claims_w, claims)
        try:
            w.writer.flush()
        except OSError:  # the worker is gone; its pidfd will say so
            w.writer = FrameWriter(w.writer.fd)
            return
        key = self._sel.get_map().get(w.writer.fd)
        if w.writer.pending and key is None:
            self._sel.register(w.writer.fd, selectors.EVENT_WRITE, w)
        elif not w.writer.pending and key is not None:
            self._sel.unregister(w.writer.fd)

    # ── receiving ────────────────────────────────────────────────────────────────────────

    def _on_readable(self, w: _Worker) -> None:
        frames, eof = w.reader.read()
        if eof and w.reader.fd in self._sel.get_map():
            # The worker's end is closed: it is exiting, and its death comes next (deathfd),
            # moments later or, under load, milliseconds. Watched until then, the pipe would
            # wake select again and again, a busy loop that takes the CPU from the caller.
            self._sel.unregister(w.reader.fd)
        for frame in frames:
            self._on_result(w, frame)

    def _on_result(self, w: _Worker, frame: bytearray) -> None:
        parts, layouts = split(frame, 2)
        if not w.ready:
            self._on_ready(w, parts[0])
            return
        if not w.inflight:  # its units were failed already (the pool broke): nobody waits
            discard(layouts)
            return
        unit = w.inflight[0]
        _uid, offset, count, status, seconds, files = pickle.loads(parts[0])
        if files:  # results the worker wrote to the journal's folder (see _journal.Recorder)
            sink: Any = unit.sink  # (a sink that took a spilled result)
            sink.spilled(unit.start + offset, files)
        try:
            values, errors = load(parts[1], layouts.get(1))
        except BaseException as exc:
            # Whatever a result's unpickling raises, SystemExit included, fails that result
            # alone: nothing a payload does may end this thread.
            # The results were computed but one of them does not unpickle here. Which one is
            # not known: with several, each item runs again alone and the bad one fails alone.
            unit.received = offset + count
            if count == 1:
                reason = f"it was pickled in the worker but does not unpickle here: {exc!r}"
                self._fail_item(unit, offset, SerializationError("result", reason))
            else:
                self._requeue_alone(unit, offset, offset + count)
            values, errors = [], None
        del parts, frame
        if status == UNREADABLE:
            self._next_head(w)
            error = errors[0].rebuild()
            part = getattr(error, "part", None)
            # A name the worker could not find (a function or class a script defines under
            # its __main__ guard, or after the fork): sent again by value.
            lookup = getattr(error, "lookup", False)
            if lookup and part == "function" and self._functions.whole_from_now(unit.fn, unit.fid):
                self.pending.appendleft(unit)
                return
            if lookup and part == "arguments" and not unit.by_value:
                unit.by_value = True
                self.pending.appendleft(unit)
                return
            if not (part == "arguments" and self._split(unit)):
                unit.sink.fail(unit.current, unit.left, error)
            return
        if values:
            unit.received = offset + len(values)
            if unit.sink.merges:
                self._item_seconds[unit.fid] = seconds / len(values)
            self._deliver(unit, unit.start + offset, values, _rebuild(errors), seconds)
            w.head_since = time.monotonic()
        if status == DONE:
            self._next_head(w)
        elif status == SKIPPED or (status == STOPPED and self.level >= DRAINING):
            self._next_head(w)
            unit.sink.cancel(unit.current, unit.left)
        elif status == STOPPED:
            # A SIGTERM from outside the pool: the worker dies of it now (see _settle_head).
            w.stopped = (unit.uid, unit.received)
        elif status == PARTIAL and unit.cancelled:
            self._kill(w, _CANCEL)

    def _on_ready(self, w: _Worker, part: memoryview) -> None:
        w.ready = True
        w.head_since = time.monotonic()
        self._barren_deaths = 0
        failure = pickle.loads(part)
        if failure is not None:
            self._break(
                BrokenPool("the pool's initializer raised, so no task can run"),
                failure.rebuild(),
            )
        elif w.inflight and w.inflight[0].cancelled:
            self._kill(w, _CANCEL)

    def _next_head(self, w: _Worker) -> None:
        """The head unit is done: the next one starts now."""
        w.segments.pop(w.inflight.popleft().uid, None)
        w.head_since = time.monotonic()
        if w.inflight and w.inflight[0].cancelled:
            self._kill(w, _CANCEL)

    def _deliver(
        self,
        unit: Unit,
        start: int,
        values: list[Any],
        errors: dict[int, BaseException],
        seconds: float,
    ) -> None:
        """Hand outcomes to the sink, holding back errors that are to be retried."""
        retry = [k for k, exc in errors.items() if self._retryable(unit, exc)]
        if unit.history and errors and not retry:
            # A retried item failed for the last time: its error lists every attempt.
            for exc in errors.values():
                record_attempts(exc, [*unit.history, exc])
        if not retry:
            unit.sink.deliver(start, values, errors, seconds)
            return
        each = seconds / len(values)
        begin = 0
        for k in sorted(retry):
            if k > begin:
                part = {i - begin: e for i, e in errors.items() if begin <= i < k}
                unit.sink.deliver(start + begin, values[begin:k], part, each * (k - begin))
            self._requeue_single(unit, start - unit.start + k, errors[k])
            begin = k + 1
        if begin < len(values):
            part = {i - begin: e for i, e in errors.items() if i >= begin}
            unit.sink.deliver(start + begin, values[begin:], part, each * (len(values) - begin))

    # ── deaths, timeouts, retries ────────────────────────────────────────────────────────

    def _on_death(self, w: _Worker) -> None:
        self._sel.unregister(w.deathfd)
        # Whatever the worker wrote before it died is still in the pipe.
        frames, _eof = w.reader.read()
        for frame in frames:
            if w.inflight or not w.ready:
                self._on_result(w, frame)
        # Processes the task started die with its worker. This comes before the reap: until
        # then the worker is a zombie that holds its pid, so its group id cannot have been
        # taken by an unrelated process group.
        with contextlib.suppress(OSError):
            os.killpg(w.pid, signal.SIGKILL)
        w.proc.join()
        w.exitcode = w.proc.exitcode
        # Segments it made that no frame announced, and those sent to it that it may not have
        # opened, would be left behind.
        self._segments.purge(w.pid)
        for sent in w.segments.values():
            remove_unread(sent)
        # The claims it never read: of the units and items it never started (see _settle_head).
        unread: set[int] = set()
        while (seq := read_claim(w.claims_r)) is not None:
            unread.add(seq)
        self._forget(w)
        if self.level >= DRAINING:
            for unit in w.inflight:
                unit.sink.cancel(unit.current, unit.left)
            return
        if w.inflight and w.ready:
            self._settle_head(w, unread)
        # Units behind the running one never started (nor did any, if the worker never became
        # ready): back to the front of the queue.
        for unit in reversed(w.inflight):
            self.pending.appendleft(unit)
        w.inflight.clear()
        if self._broken is not None or (w.retiring and not w.recycle):
            return
        if not w.ready:
            if w.exitcode == NO_MAIN_GUARD_EXIT:
                self._break(BrokenPool(NO_MAIN_GUARD))
                return
            self._barren_deaths += 1
            if self._barren_deaths >= BARREN_DEATHS:
                self._break(
                    BrokenPool(
                        f"{BARREN_DEATHS} workers in a row died while starting (the last, pid "
                        f"{w.pid}, {_how(w.exitcode)}); check the initializer and that the "
                        "task's module imports in a fresh process"
                    )
                )
                return
        if not self._closing or self.pending:
            try:
                self._spawn()
            except Exception as exc:  # out of processes, or memory: tell the waiting callers
                self._break(self._start_failure(exc, "a new worker"))

    def _settle_head(self, w: _Worker, unread: set[int]) -> None:
        """The worker died running its head unit: give that unit's items their outcomes.
        ``unread``: the claims it had not read when it died (see "Taking back")."""
        unit = w.inflight.popleft()
        if unit.left == 0:
            return
        why = None
        broken_off = w.stopped == (unit.uid, unit.received)
        if w.doom is not None:
            why, uid, received = w.doom
            if (uid, received) != (unit.uid, unit.received):
                # The item we meant to stop finished just before the kill, which then hit the
                # next one as it started: that one did nothing wrong, so it simply runs again.
                self.pending.appendleft(unit.part(next(self._uids), unit.received))
                return
        elif unit.ahead in unread:
            # Sent ahead, and its claim still unread: it died before this unit started (killed
            # from outside between two units). Nothing of it ran: it runs again, whole.
            self.pending.appendleft(unit.part(next(self._uids), unit.received))
            return
        if why == _CANCEL:
            unit.sink.cancel(unit.current, 1)
        elif why == _TIMEOUT:
            timeout = unit.opts.task_timeout or 0.0
            self._fail_item(unit, unit.received, TaskTimeout(timeout, w.pid, unit.current))
        elif unit.left == 1 or unit.opts.task_timeout is not None or broken_off:
            # Exactly one item was running (or the worker said which): it is the one at fault.
            self._fail_item(unit, unit.received, WorkerDied(w.exitcode, w.pid, unit.current))
        elif unit.item_claims:
            self._settle_loose(w, unit, unread)
            return
        else:
            # Some item without an outcome killed the worker, and the others may have finished
            # since the last report. Each is retried alone; the one at fault then fails alone.
            self._split(unit)
            return
        if unit.left > 1:
            self.pending.appendleft(unit.part(next(self._uids), unit.received + 1))

    def _settle_loose(self, w: _Worker, unit: Unit, unread: set[int]) -> None:
        """The worker died in a unit of tasks that travel together, whose claims say which
        task it was running: the first one after the last claim it read (the claim of task
        ``k`` is read just before ``k`` starts). That one fails with ``WorkerDied``, as a task
        that travels alone would, and runs no second time. Those before it that finished
        with their results still in the worker run again, each alone; those after it never
        started, and go on together."""
        n = len(unit.items)
        first = max(unit.received, 1)
        running = next(
            (k - 1 for k in range(first, n) if unit.item_claims + k - 1 in unread), n - 1
        )
        uids = self._uids
        if running < unit.received:  # it died between two tasks, after it reported the first
            self.pending.appendleft(unit.part(next(uids), unit.received))
            return
        if running + 1 < n:
            self.pending.appendleft(unit.part(next(uids), running + 1))
        self._fail_item(unit, running, WorkerDied(w.exitcode, w.pid, unit.start + running))
        self._requeue_alone(unit, unit.received, running)

    def _split(self, unit: Unit) -> bool:
        """Requeue each item of a unit alone, so that one bad item fails by itself. False if
        the unit holds one item only: then that item is the bad one. (Not if a take-back cut
        the unit down to it: the worker's copy held those taken back too, and any of them may
        be the bad one; the one left runs again alone, the others run where they were taken.)"""
        if unit.left <= 1 and not unit.cut:
            return False
        self._requeue_alone(unit, unit.received, len(unit.items))
        return True

    def _requeue_alone(self, unit: Unit, begin: int, end: int) -> None:
        """Put items ``begin .. end`` of the unit back at the front of the queue, one unit each."""
        for k in reversed(range(begin, end)):
            single = unit.part(next(self._uids), k, k + 1)
            single.alone = True  # not with others again (see "Tasks that travel together")
            self.pending.appendleft(single)

    def _retryable(self, unit: Unit, exc: BaseException) -> bool:
        return unit.opts.retry(unit.history, exc)

    def _fail_item(self, unit: Unit, k: int, exc: BaseException) -> None:
        """Item ``k`` of the unit failed: retry it if its options say so, else report it."""
        if self._retryable(unit, exc):
            self._requeue_single(unit, k, exc)
            return
        if unit.history:
            record_attempts(exc, [*unit.history, exc])
        unit.sink.fail(unit.start + k, 1, exc)

    def _requeue_single(self, unit: Unit, k: int, exc: BaseException) -> None:
        single = unit.part(next(self._uids), k, k + 1)
        single.history = [*(unit.history or ()), exc]
        self.pending.appendleft(single)

    def _break(self, exc: BrokenPool, cause: BaseException | None = None) -> None:
        """The workers cannot start: fail everything waiting and start no more."""
        if self._broken is not None:
            return
        if cause is not None:
            exc.__cause__ = cause
        self._broken = exc
        for w in self._workers.values():
            for unit in w.inflight:
                unit.sink.fail(unit.current, unit.left, exc)
            w.inflight.clear()
        self._fail_all_pending(exc)

    # ── worker processes ─────────────────────────────────────────────────────────────────

    def _spawn(self) -> None:
        method = self._ctx.get_start_method()
        if method == "forkserver":
            _start_fork_server()
        elif method != "fork":
            from multiprocessing import resource_tracker

            # Started on the way by spawn otherwise. It ends by *unblocking* SIGINT and SIGTERM
            # in the thread that started it (it does not restore the mask it found), which
            # would let the worker start with them unblocked: block them again first.
            resource_tracker.ensure_running()
            signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        task_r, task_w = make_pipe()
        result_r, result_w = make_pipe()
        child_tasks = Connection(task_r, writable=False)
        child_results = Connection(result_w, readable=False)
        lifeline = Connection(os.dup(self._lifeline_r), writable=False)
        claims_r, claims_w = os.pipe()
        child_claims = Connection(claims_r, writable=False)
        claims = (_own(os.dup(claims_r)), _own(claims_w))  # (non-blocking, both ends' too)
        _own(task_w)
        _own(result_r)
        proc = self._ctx.Process(  # type: ignore[attr-defined]
            target=worker_main,
            args=(
                BlockedOnArrival(),
                child_tasks,
                child_results,
                lifeline,
                child_claims,
                self.gate,
                self._initializer,
                self._initargs,
                self._segments.prefix,
                self._reuse_memory,
            ),
            name="cleanbreak-worker",
        )
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
            child_tasks.close()
            child_results.close()
            lifeline.close()
            child_claims.close()
        worker = _Worker(proc, task_w, result_r, claims)
        self._workers[result_r] = worker
        self._sel.register(result_r, selectors.EVENT_READ, worker)
        self._sel.register(worker.deathfd, selectors.EVENT_READ, worker)

    def _forget(self, w: _Worker) -> None:
        w.gone = True
        for fd in (w.reader.fd, w.writer.fd):
            if fd in self._sel.get_map():
                self._sel.unregister(fd)
            _close(fd)
        _close(w.claims_r)
        _close(w.claims_w)
        if w.has_pidfd:
            _close(w.deathfd)
        del self._workers[w.reader.fd]
        with contextlib.suppress(ValueError):
            w.proc.close()

    def _abort(self) -> None:  # pragma: no cover - only after a bug in the manager
        err = self._broken or RuntimeError("aborted")
        for w in list(self._workers.values()):
            _signal_group(w.pid, signal.SIGKILL)
            w.proc.join()
            for unit in w.inflight:
                unit.sink.fail(unit.current, unit.left, err)
            self._forget(w)
        self._fail_all_pending(err)

    def _teardown(self) -> None:
        self._segments.purge()  # every worker is gone: whatever is left will never be read
        self._sel.close()
        with self._lock:
            _close(self._wake_r)
            _close(self._wake_w)
            self._wake_w = -1
        _close(self._lifeline_w)
        _close(self._lifeline_r)
        _live.discard(self)
        self.finished.set()


def _rebuild(errors: dict[int, CapturedError] | None) -> dict[int, BaseException]:
    if not errors:
        return {}
    return {i: e.rebuild() for i, e in errors.items()}


def _start_fork_server() -> None:
    """Start the process's fork server, if it is not running, from a thread that blocks
    SIGINT and SIGTERM (the manager's).

    It starts with them blocked, so that a Ctrl-C to the process group during its interpreter's
    start-up (or its import of the main module) cannot kill it with a traceback on the terminal;
    its last preload module, ``_forkserver_start``, unblocks them and drops a pending one. So
    the fork server, which is the process's and not ours, and every process it forks for
    anyone, end up with the mask a process normally has. (Our workers block them on arrival
    instead.) The resource tracker is started first: its start unblocks both in the calling
    thread.
    """
    import importlib.util
    from multiprocessing import forkserver, resource_tracker

    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    server: Any = forkserver._forkserver
    preload = list(server._preload_modules)
    ours = ["cleanbreak._forkserver_start"]
    if not _byvalue.main_importable() and importlib.util.find_spec("cloudpickle") is not None:
        # A notebook's, the REPL's: its functions come by value, and every worker would
        # import cloudpickle for the first of them (about 10 ms each).
        ours.insert(0, "cloudpickle")
    forkserver.set_forkserver_preload([*preload, *ours])
    try:
        forkserver.ensure_running()
    finally:
        forkserver.set_forkserver_preload(preload)
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)


def _skip_missing_main() -> None:
    """Make multiprocessing leave out a main module that is no file.

    A worker started by spawn or a fork server runs the parent's main module again, from
    ``__main__.__file__``. For a script read from stdin (``python - < job.py``) that is
    ``<stdin>``, and every worker would die of ``FileNotFoundError`` before its first task
    (``multiprocessing.Pool`` too). Its functions come by value instead (see ``_byvalue``).
    Done once, for the whole process: a path that is no file could only kill the worker.
    """
    from multiprocessing import spawn

    real: Any = spawn.get_preparation_data
    if getattr(real, "cleanbreak", False):
        return

    def get_preparation_data(name: str) -> dict[str, Any]:
        data: dict[str, Any] = real(name)
        path = data.get("init_main_from_path")
        if path is not None and not os.path.isfile(path):
            del data["init_main_from_path"]
        return data

    get_preparation_data.cleanbreak = True  # type: ignore[attr-defined]
    spawn.get_preparation_data = get_preparation_data


def _fork_server_found_no_guard(ctx: BaseContext) -> bool:
    """Whether the fork server exited because the main module it imports (Python 3.13.8 and
    later preload it there) starts a pool at import time. Its status is read without reaping
    it (``WNOWAIT``): multiprocessing reaps it itself when it starts the next one."""
    if ctx.get_start_method() != "forkserver":
        return False
    from multiprocessing import forkserver

    pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    if pid is None:
        return False
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return False
    try:
        if not select.select([fd], [], [], 1.0)[0]:
            return False  # alive: the failure was something else
        info = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOWAIT)
    except (AttributeError, OSError):
        return False
    finally:
        os.close(fd)
    return bool(info and info.si_code == os.CLD_EXITED and info.si_status == NO_MAIN_GUARD_EXIT)


def _how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            pass
    return f"exit code {exitcode}"


def default_context() -> BaseContext:
    """forkserver where the platform has it (the default from Python 3.14 on Linux), else spawn.

    fork is available on request, but not the default: forking a process that runs threads
    (the manager thread, and any of the caller's) can copy a lock in its locked state.
    """
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


# Backends still running when the interpreter exits are stopped here, so that no worker
# outlives its parent and multiprocessing's own exit handler (which joins children) never
# waits on one. atexit runs handlers last-registered first, so this runs before it.
_live: weakref.WeakSet[LocalBackend] = weakref.WeakSet()


@atexit.register
def _stop_live_backends() -> None:
    for backend in list(_live):
        backend.close(cancel_pending=False)
    for backend in list(_live):
        backend.wait()
