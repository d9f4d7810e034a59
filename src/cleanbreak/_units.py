"""What a backend runs: units of work, the options that govern them, and where outcomes go.

This is the contract between ``Pool`` (which turns ``submit`` and ``map`` calls into units) and
a backend (which runs them). It names no process, pipe or future, so a second backend (Dask)
can sit behind the same ``Pool``.

Items are numbered in the caller's terms: a unit's ``start`` is the index of its first item
(the input position for ``map``, the submission order for ``submit``). Sinks are told outcomes
by those absolute indices, which is what lets a backend split a unit, retry one item of it or
requeue its tail without telling the sink.
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from ._errors import BrokenPool

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see _notyping)
if TYPE_CHECKING:
    from typing import Any, NamedTuple, Protocol

    class _Options(NamedTuple):
        task_timeout: float | None = None
        retries: int = 0
        retry_on: tuple[type[BaseException], ...] = ()

else:
    from ._notyping import Protocol

    _Options = collections.namedtuple(
        "_Options", ("task_timeout", "retries", "retry_on"), defaults=(None, 0, ())
    )


class TaskOptions(_Options):
    """How each task runs: its timeout, and how often it is retried, and after which errors.

    (A named tuple, not a dataclass: ``dataclasses`` takes some 10 ms to import, and this
    module is on the path of every first call.)"""

    __slots__ = ()

    @staticmethod
    def make(
        task_timeout: float | None, retries: int, retry_on: Sequence[type[BaseException]]
    ) -> TaskOptions:
        if task_timeout is not None:
            if (
                isinstance(task_timeout, bool)
                or not isinstance(task_timeout, (int, float))
                or not math.isfinite(task_timeout)
                or task_timeout <= 0
            ):
                raise ValueError(
                    f"task_timeout must be a number of seconds above 0 (or None), got "
                    f"{task_timeout!r}"
                )
            task_timeout = float(task_timeout)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a whole number of at least 0, got {retries!r}")
        # A single class is accepted too, as ``except`` accepts one.
        single = isinstance(retry_on, type)
        kinds: tuple[Any, ...] = (retry_on,) if single else tuple(retry_on)
        for kind in kinds:
            if not (isinstance(kind, type) and issubclass(kind, BaseException)):
                raise TypeError(
                    f"retry_on must hold exception classes (such as OSError), got {kind!r}"
                )
        return TaskOptions(task_timeout, retries, kinds)

    def retry(self, history: Sequence[BaseException] | None, exc: BaseException) -> bool:
        """Whether an item that failed with ``exc``, after the failed attempts in
        ``history``, runs again: after a lost worker or a timeout (``WorkerDied``,
        ``TaskTimeout``), or an exception of ``retry_on``, while ``retries`` allows."""
        if self.retries == 0 or len(history or ()) >= self.retries:
            return False
        from ._errors import TaskTimeout, WorkerDied

        if isinstance(exc, (WorkerDied, TaskTimeout)):
            return True
        return bool(self.retry_on) and isinstance(exc, self.retry_on)


def record_attempts(exc: BaseException, attempts: list[BaseException]) -> None:
    """Note every attempt on the final error: as ``.attempts`` and in its notes."""
    # A user's exception class may refuse either; the error itself still reaches the caller.
    with contextlib.suppress(BaseException):
        exc.attempts = attempts  # type: ignore[attr-defined]
    with contextlib.suppress(BaseException):
        for n, earlier in enumerate(attempts[:-1], 1):
            what = f"{type(earlier).__name__}: {earlier}"
            exc.add_note(f"attempt {n} of {len(attempts)} failed: {what}")
        exc.add_note(f"attempt {len(attempts)} of {len(attempts)} failed: this error")


class Sink(Protocol):
    """Where a unit's outcomes go. Every method is called from the backend's thread.

    ``prefetch`` says whether the unit may wait in a busy worker's queue. A unit behind a
    future may not: until it starts, ``Future.cancel()`` must be able to stop it, so it is sent
    only to an idle worker, which starts it on arrival.

    ``merges`` says whether consecutive units of one item each, numbered one after the other,
    may travel to a worker as one unit (see _manager, "Tasks that travel together").
    """

    prefetch: bool
    merges: bool

    def start(self, unit: Unit) -> bool:
        """The unit is about to be sent. False: it was cancelled, drop it."""

    def deliver(
        self, start: int, values: list[Any], errors: dict[int, BaseException], seconds: float
    ) -> None:
        """Items ``start ..`` finished: ``values[k]``, or ``errors[k]`` where present. They
        took ``seconds`` to run, all together."""

    def fail(self, start: int, count: int, exc: BaseException) -> None:
        """Items ``start .. start + count`` failed with ``exc``."""

    def cancel(self, start: int, count: int) -> None:
        """Items ``start .. start + count`` will not run (or were stopped)."""


class Unit:
    """Items that travel to a worker together, and where their outcomes go."""

    __slots__ = (
        "ahead",
        "alone",
        "by_value",
        "cancelled",
        "cut",
        "expect",
        "fid",
        "fn",
        "history",
        "item_claims",
        "items",
        "kind",
        "loose",
        "opts",
        "received",
        "sink",
        "start",
        "uid",
    )

    def __init__(
        self,
        uid: int,
        kind: int,
        fn: Callable[..., Any],
        items: Sequence[Any],
        sink: Sink,
        start: int,
        opts: TaskOptions,
        history: list[BaseException] | None = None,
    ) -> None:
        self.uid = uid
        self.kind = kind
        self.fn = fn
        self.items = items
        self.sink = sink
        self.start = start  # index of items[0] in the caller's numbering
        self.opts = opts
        self.received = 0  # how many items have an outcome
        self.history = history  # earlier failed attempts, for a retried single item
        self.cancelled = False  # Pool.cancel() asked for it while it waited in a worker
        self.fid = 0  # the number its function was last sent under (see _manager._Functions)
        # Its items go by value, ``__main__``'s classes included: a worker could not load them
        # by reference (a class a script defines under its ``__main__`` guard).
        self.by_value = False
        # Its claim's number once sent (see _manager, "Taking back"); 0 while it waits here.
        self.ahead = 0
        # Its items after the first may be taken back one by one (tasks that travel together,
        # see _manager): then, once sent, the claim number of its second item (the others
        # follow), else 0.
        self.loose = False
        self.item_claims = 0
        # It goes alone: an item of a unit split up to find the one at fault (see _manager).
        self.alone = False
        # Items of it were taken back once it was sent: the worker's copy holds more.
        self.cut = False
        # How long its items are expected to take, all together, in seconds: known for a map's
        # chunk once the map's task time is (see _map.MapRun); infinite while it is not.
        self.expect = math.inf

    @property
    def left(self) -> int:
        return len(self.items) - self.received

    @property
    def current(self) -> int:
        """The caller's index of the first item without an outcome."""
        return self.start + self.received

    def part(self, uid: int, begin: int, end: int | None = None) -> Unit:
        """A new unit of ``items[begin:end]`` with the same function, sink and options."""
        stop = len(self.items) if end is None else end
        items = self.items[begin:stop]
        history = self.history if len(items) == 1 else None
        unit = Unit(
            uid, self.kind, self.fn, items, self.sink, self.start + begin, self.opts, history
        )
        unit.by_value = self.by_value
        unit.loose = self.loose
        return unit

    @property
    def single(self) -> bool:
        """Whether it is one item that may travel with others: not one retried, nor one of a
        unit split up to find the item at fault."""
        return len(self.items) == 1 and not self.history and not self.alone

    @property
    def last_claim(self) -> int:
        """The number of its last claim (see _manager, "Taking back"), or 0."""
        if self.item_claims and len(self.items) > 1:
            return self.item_claims + len(self.items) - 2
        return self.ahead


class UnitQueue(Protocol):
    """Where ``Pool`` puts units: the part of a backend that callers' threads use."""

    def new_unit(
        self,
        kind: int,
        fn: Callable[..., Any],
        items: Sequence[Any],
        sink: Sink,
        start: int,
        opts: TaskOptions,
    ) -> Unit:
        """A unit with a fresh uid."""

    @property
    def broken(self) -> BaseException | None:
        """Why the backend cannot run units (its workers could not start), if it cannot."""

    def put(self, unit: Unit) -> None:
        """Queue a unit. Raises RuntimeError once the backend has stopped accepting units."""

    def put_all(self, units: Sequence[Unit]) -> None:
        """Queue the units, in order, and only then tell the backend (one wake-up, and one
        send to each worker, for a map's chunks). Raises as ``put``: those before stay."""


class Backend(UnitQueue, Protocol):
    """What runs a pool's units: local worker processes (``_manager.LocalBackend``) or a Dask
    cluster (``_dask.DaskBackend``). ``Pool`` talks to nothing else of either.

    Every method is safe to call from any thread; ``raise_level`` also from a signal handler.
    """

    size: int  # how many tasks run at once: worker processes, or the cluster's threads
    started: threading.Event  # the backend can take units (or failed to start: start_error)
    start_error: BaseException | None
    finished: threading.Event  # every unit has an outcome and nothing of the backend runs

    @property
    def broken(self) -> BaseException | None:
        """Why the backend cannot run units any more, if it cannot."""

    @property
    def pids(self) -> list[int]:
        """The local worker processes (none for a cluster)."""

    def stop_unit(self, uid: int) -> None:
        """Stop that unit if it runs; it reads as cancelled (``Pool.cancel``)."""

    def raise_level(self, level: int) -> None:
        """Escalate the stop: 1 drain (no new item starts), 2 stop running items, 3 kill."""

    def close(self, cancel_pending: bool) -> None:
        """No more units will come: finish those queued (or cancel them), then finish."""

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until ``finished``, in sliced waits (see ``_signals``); whether it is."""


class Intake:
    """The part of a backend that callers' threads use, the same for both: units go into
    ``pending`` (and ``stop_unit`` requests into ``_commands``), then ``wake`` tells the
    backend's own thread."""

    pending: deque[Unit]
    _commands: deque[int]
    _uids: Iterator[int]
    _lock: threading.RLock
    _accepting: bool
    _closing: bool
    _cancel_pending: bool
    _broken: BaseException | None
    finished: threading.Event

    def new_unit(
        self,
        kind: int,
        fn: Callable[..., Any],
        items: Sequence[Any],
        sink: Sink,
        start: int,
        opts: TaskOptions,
    ) -> Unit:
        return Unit(next(self._uids), kind, fn, items, sink, start, opts)

    def put(self, unit: Unit) -> None:
        """Queue a unit. Raises the backend's ``BrokenPool`` once it broke (the workers could
        not start), and RuntimeError once it has stopped accepting units otherwise."""
        self.put_all((unit,))

    def put_all(self, units: Sequence[Unit]) -> None:
        try:
            for unit in units:
                self._queue(unit)
        finally:
            self._queued()

    def _queued(self) -> None:
        """Units were queued: tell the backend's thread."""
        self.wake()

    def _queue(self, unit: Unit) -> None:
        with self._lock:
            broken = self._broken
            if isinstance(broken, BrokenPool):
                raise BrokenPool(str(broken)) from broken
            if not self._accepting:
                raise RuntimeError("cannot schedule new tasks: the pool has shut down")
            self.pending.append(unit)

    def stop_unit(self, uid: int) -> None:
        """Stop the unit if it runs: it reads as cancelled (``Pool.cancel``)."""
        self._commands.append(uid)
        self.wake()

    def close(self, cancel_pending: bool) -> None:
        """No more units will come: finish what is queued (or cancel it), then exit."""
        self._cancel_pending = self._cancel_pending or cancel_pending
        self._closing = True
        self.wake()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until ``finished``, in sliced waits (see ``_signals``); whether it is."""
        from ._signals import wait_event

        return wait_event(self.finished, timeout)

    def wake(self) -> None:
        raise NotImplementedError
