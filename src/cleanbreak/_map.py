"""``map`` and ``imap_unordered``: lazy input, chunks, order, and what Ctrl-C keeps.

The caller's thread reads the input a chunk at a time, while fewer than ``window`` items are
out (read but not yet handed to the caller), and queues each chunk as one unit. The manager
thread puts outcomes into the sink's store as *pieces*: a run of consecutive items, with their
values and any errors. The caller takes whole pieces, so the per-item cost in the parent is a
``yield`` (or, for ``cleanbreak.map``, a ``list.extend``), not a queue operation.

Once a result is handed to the caller, the run holds no reference to it: the piece being
handed out is a reversed copy that each ``yield`` pops from (``list.pop`` through ``map``,
with no bytecode per item). So a long ``map`` holds only the results the caller has not taken,
and ``Interrupted.completed``, or the ``.completed`` of a failure that ends the iteration, holds
exactly those. ``cleanbreak.map`` returns every result in a list, so it keeps them all.

This module sits under ``_pool``: it knows the pool only as a ``Host`` (below), and the
backend only as a ``UnitQueue``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError

from . import _signals
from ._errors import BrokenPool, Interrupted
from ._signals import CHECK_EVERY
from ._units import Sink, TaskOptions, Unit, UnitQueue
from ._wire import CALL_ONE, CALL_STAR, size_of

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see _notyping)
if TYPE_CHECKING:
    from typing import Any, Generic, Protocol, TypeVar

    T = TypeVar("T")
else:
    from ._notyping import Generic, Protocol, T


# Chunks are sized from the measured time per item, so that each takes about this long: long
# enough that the cost of sending it is small beside the work, short enough that the last
# chunks do not leave a worker idle for long. Until a first result says how long an item takes,
# each worker gets one unit of one item: a probe (a unit costs a round trip, so a tiny task's
# map does not start with many of them).
CHUNK_SECONDS = 0.05
# The window starts at this many items per worker and at most doubles each time the caller
# takes a piece, up to about four chunks per worker: the input is not read far ahead before the
# caller has shown that it keeps up, and tiny tasks still reach full speed after a few pieces.
# A map that returns a list takes every piece as it comes: its window starts at full size.
WINDOW_PER_WORKER = 16
# With lazy input (a generator), the default window never holds more than this many items per
# worker, whatever the task time: items can be large (images, records), and an endless input
# must run in bounded memory. Chunks are then at most a quarter of it.
LAZY_WINDOW_PER_WORKER = 50
# The results a streaming run (``map``, ``imap_unordered``) holds for its caller stay under
# about this many bytes, once the first results have shown how large a result is: the window
# and the chunks shrink to fit it (a chunk size the caller set included: it is then an upper
# bound). Until then, with a chunk size the caller set, each worker gets one unit of at most
# PROBE_ITEMS. How large a result is: sys.getsizeof() of the last one of each piece (bytes, str,
# an array that owns its data; a list or a dict counts shallowly).
HELD_BYTES = 32 << 20
PROBE_ITEMS = 4
# A chunk holds at least this much work, down to two chunks per worker, where the input allows
# (each unit costs some tens of microseconds in the parent and the worker, more than its items'
# work in a small map of fast tasks: the stock pool's four chunks per worker cost more than they
# balance). Two, not one: a worker that comes free can still take back the other's second.
MOMENT = 0.0005
# The functions whose time per item a pool remembers from their last map (see ItemTimes).
REMEMBERED = 32


class ItemTimes:
    """The time per item that each function's last map measured (and the size of a result),
    kept by the pool for the next map of the same function. A map of a few fast items, as a
    program that maps small lists in a loop makes, would otherwise spend a round trip on its
    probes (see CHUNK_SECONDS) for a moment of work: when the time remembered says the whole
    map is at most one chunk's work per worker, it starts with chunks sized from it instead,
    and its own first results replace it. A remembered time that is wrong costs chunks no
    larger than the stock pool's (a quarter of each worker's share).

    Functions are known by their code object (a bound method by its function's, a partial by
    its function's), which this list holds: not the bound method's object, nor a closure's
    cells. A callable without one (a builtin, an instance with ``__call__``) is not
    remembered: its maps start with probes, as every first map does."""

    def __init__(self) -> None:
        self._times: dict[object, PerItem] = {}

    def get(self, fn: Callable[..., Any]) -> PerItem | None:
        code = _code(fn)
        return None if code is None else self._times.get(code)

    def put(self, fn: Callable[..., Any], per_item: PerItem) -> None:
        code = _code(fn)
        if code is None:
            return
        times = self._times
        times.pop(code, None)  # the newest last: the oldest go first
        times[code] = per_item
        while len(times) > REMEMBERED:
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):  # another thread's
                del times[next(iter(times))]


def _code(fn: Callable[..., Any]) -> object | None:
    """The code a map of ``fn`` runs, through partials, bound methods and the wrappers that
    ``functools.wraps`` marks (a decorator's wrapper is one code for every function it wraps);
    None for a builtin or a callable object."""
    for _ in range(16):  # a chain of wrappers (never a cycle, nor an object that makes them)
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif (inner := getattr(fn, "__wrapped__", None)) is not None:
            fn = inner
        elif (func := getattr(fn, "__func__", None)) is not None:
            fn = func
        else:
            break
    return getattr(fn, "__code__", None)


class _Late:
    """What ``MapRun._wait_for_piece`` returns when the next piece is late (see there)."""


_LATE = _Late()

if TYPE_CHECKING:
    Piece = tuple[int, list[Any], dict[int, BaseException]]
    PerItem = tuple[float, float]  # an item's seconds of work, and its result's bytes

    from ._journal import Journal, Keyer, Recorder
    from ._progress import Counts, Progress

    # Makes a run's progress display from its counters and its total (None: unknown).
    ProgressFactory = Callable[[Counts, int | None], Progress]


def positive(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1 (or None), got {value!r}")
    return value


class Host(Protocol):
    """What a run needs from the pool that owns it."""

    @property
    def workers(self) -> int: ...

    @property
    def _backend(self) -> UnitQueue: ...

    @property
    def _signal(self) -> signal.Signals | None: ...

    @property
    def _item_times(self) -> ItemTimes: ...

    def _owes_interrupt(self) -> signal.Signals | None:
        """The pool's signal, if no ``Interrupted`` has been raised for it yet."""

    def _check_open(self) -> None: ...

    def _track(self, run: MapRun[Any]) -> None:
        """A run starts: the pool counts it as busy until it finishes."""

    def _abandoned(self, run: MapRun[Any]) -> None:
        """The caller left the run before it ended (for the with-block's Interrupted)."""

    def _stop_for(
        self, exc: KeyboardInterrupt, gather: Callable[[], dict[int, Any]], total: int | None
    ) -> Interrupted:
        """Stop the pool after a Ctrl-C that reached the run, then gather the results that
        finished; the Interrupted to raise."""


class MapSink:
    """Outcomes of one ``map`` call, put straight into the store its run takes them from.

    Kept apart from the run so that queued units do not keep the run alive; ``finished`` set
    means units that have not left the parent are dropped. Everything here is guarded by
    ``cond``: the manager thread writes, the caller's thread reads.
    """

    __slots__ = (
        "arrivals",
        "cancelled",
        "cond",
        "failures",
        "finished",
        "item_bytes",
        "item_count",
        "item_seconds",
        "outcomes",
        "reused",
        "store",
    )
    prefetch = True
    merges = True  # consecutive units of one item may travel as one (see _manager)

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.store: dict[int, Piece] = {}  # pieces not yet taken, by their first index
        self.arrivals: deque[int] = deque()  # their first indices, in order of arrival
        self.cancelled = False
        self.finished = False
        self.item_seconds = 0.0  # measured: seconds of work, over
        self.item_count = 0  # ... this many items
        self.item_bytes = 0.0  # measured: the size of their results (see HELD_BYTES)
        self.outcomes = 0  # items with an outcome (for the progress display)
        self.failures = 0  # ... that failed
        self.reused = 0  # ... that a journal had

    def start(self, unit: Unit) -> bool:
        return not self.finished

    def deliver(
        self, start: int, values: list[Any], errors: dict[int, BaseException], seconds: float
    ) -> None:
        with self.cond:
            self.item_seconds += seconds
            self.item_count += len(values)
            if values:
                self.item_bytes += size_of(values[-1]) * len(values)
            self.outcomes += len(values)
            self.failures += len(errors)
            self._put((start, values, errors))

    def fail(self, start: int, count: int, exc: BaseException) -> None:
        with self.cond:
            self.outcomes += count
            self.failures += count
            self._put((start, [None] * count, dict.fromkeys(range(count), exc)))

    def reuse(self, start: int, values: list[Any], errors: dict[int, BaseException]) -> None:
        """Outcomes a journal had: they did not run, so they say nothing of the task time."""
        with self.cond:
            self.outcomes += len(values)
            self.failures += len(errors)
            self.reused += len(values)
            self._put((start, values, errors))

    def counts(self) -> tuple[int, int, int]:
        return self.outcomes, self.failures, self.reused

    def cancel(self, start: int, count: int) -> None:
        with self.cond:
            self.cancelled = True
            self.cond.notify()

    def _put(self, piece: Piece) -> None:
        self.store[piece[0]] = piece
        self.arrivals.append(piece[0])
        self.cond.notify()


class Current:
    """The piece being handed out: its values reversed, so that each one handed is popped
    off the end and the run keeps no reference to it."""

    __slots__ = ("errors", "rest", "start", "stop")

    def __init__(self, start: int, values: list[Any], errors: dict[int, BaseException]) -> None:
        self.start = start
        self.stop = start + len(values)
        self.errors = errors
        self.rest = values[::-1]  # the values not yet handed, last first

    def take(self, n: int) -> Iterator[Any]:
        """The next ``n`` values, each popped as it is handed (C-level: no bytecode per item)."""
        return map(list.pop, itertools.repeat(self.rest, n))

    def gather_into(self, out: dict[int, Any]) -> None:
        first = self.stop - len(self.rest)
        for k, value in enumerate(reversed(self.rest), first):
            if k - self.start not in self.errors:
                out[k] = value


class MapRun(Generic[T]):
    """The state of one ``map`` or ``imap_unordered`` call.

    Ctrl-C can raise in the caller's thread between any two bytecodes, so taking a piece is
    ordered to lose nothing: it is first recorded as taken (in ``kept``, or as ``current``),
    and only then removed from the sink's store. ``gather`` merges all of them by index, so a
    piece caught in both places counts once.
    """

    def __init__(
        self,
        host: Host,
        opts: TaskOptions,
        fn: Callable[..., T],
        iterables: tuple[Iterable[Any], ...],
        *,
        ordered: bool,
        timeout: float | None,
        chunksize: int | None,
        buffersize: int | None,
        keep_all: bool = False,
        eager: bool = False,
        star: bool = False,
        journal: Journal | None = None,
        key: Callable[..., Any] | None = None,
        progress: ProgressFactory | None = None,
    ) -> None:
        chunk = positive("chunksize", chunksize)
        window = positive("buffersize", buffersize)
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
        if not callable(fn):
            raise TypeError(f"the function to map must be callable, got {fn!r}")
        if key is not None and not callable(key):
            raise TypeError(f"key must be a function of the task's arguments, got {key!r}")
        if key is not None and journal is None:
            raise ValueError("key= names tasks in a journal: pass journal= too, or drop key=")
        host._check_open()
        sizes = [len(it) for it in iterables if hasattr(it, "__len__")]  # type: ignore[arg-type]
        self.total = min(sizes) if len(sizes) == len(iterables) else None
        self._workers = host.workers
        self._fixed_chunk = chunk
        self._fixed_window = window
        # A small map of a function this pool has seen to be fast starts without probes.
        self._hint: PerItem | None = None
        if self.total is not None:
            hint = host._item_times.get(fn)
            if hint is not None and hint[0] * self.total <= CHUNK_SECONDS * self._workers:
                self._hint = hint
        # The window shrinks to fit HELD_BYTES of results, unless the caller set it or keeps
        # every result anyway (cleanbreak.map).
        self._fits_bytes = window is None and not keep_all
        self._max_window: int | None = None
        if self.total is not None:
            # Like multiprocessing.Pool.map: at least four chunks per worker, for balance.
            self._max_chunk = max(1, math.ceil(self.total / (self._workers * 4)))
        else:
            self._max_window = self._workers * LAZY_WINDOW_PER_WORKER
            self._max_chunk = self._max_window // 4
        if window is not None:
            self._max_chunk = min(self._max_chunk, window)
        self._host = host
        self._backend = host._backend
        self._sink = MapSink()
        self._unit_sink: Sink = self._sink
        self._journal = journal
        self._keyer: Keyer | None = None
        self._recorder: Recorder | None = None
        if journal is not None:
            from ._journal import Keyer, Recorder

            self._keyer = Keyer(fn, key, star=star or len(iterables) > 1)
            journal.bind(self._keyer.name)
            self._recorder = Recorder(self._sink, journal)
            self._unit_sink = self._recorder
        self._progress = None if progress is None else progress(self._sink.counts, self.total)
        self._opts = opts
        self._fn = fn
        # ``star``: each item of the one iterable is a tuple of arguments (``starmap``).
        self._kind = CALL_STAR if star or len(iterables) > 1 else CALL_ONE
        self._source: Iterator[Any] = (
            iter(iterables[0]) if len(iterables) == 1 else zip(*iterables, strict=False)
        )
        self._ordered = ordered
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._kept: list[Piece] | None = [] if keep_all else None  # pieces taken
        self.current: Current | None = None  # the piece being handed out
        # An ordered map whose pieces a thread of ours takes for the caller (the drop-in's
        # map_async): the values it took, in input order. Kept at a Ctrl-C that finds the
        # caller outside that map's get() (see MapResult).
        self.taken_by_thread: list[Any] | None = None
        # The caller takes each piece as it comes (``keep_all``, ``eager``: a map that returns
        # a list): nothing to wait for before the window is at its full size.
        self._eager = keep_all or eager
        self._window = self._workers * WINDOW_PER_WORKER
        self._pulled = 0  # items read from the input
        self._handed = 0  # items taken by the caller
        self._next = 0  # ordered: the index the caller gets next
        self._exhausted = False
        self._input_error: Exception | None = None
        self._outbox: list[Unit] = []  # units read, not yet handed to the backend
        # Reading the next items cannot keep the units read before waiting: the input is a
        # list, tuple or range (a generator may wait for its next item for as long as it likes).
        self._instant = all(type(it) in (list, tuple, range) for it in iterables)
        host._track(self)
        self._guarded(self._top_up)

    @property
    def finished(self) -> bool:
        return self._sink.finished

    def close(self, how: str = "stopped") -> None:
        """Stop reading input; units that have not left the parent are dropped. ``how`` the
        run ended, for the progress display: "done", "interrupted" or "stopped"."""
        if self._progress is not None:
            self._progress.stop(how)
        known = self._measured()
        if known is not None:
            self._host._item_times.put(self._fn, known)
        if not self._sink.finished:
            self._sink.finished = True
            if not (self._exhausted and self._handed >= self._pulled):
                self._host._abandoned(self)

    def next_piece(self) -> Piece | None:
        """The next piece of results, waiting for it; None when every item was handed over.
        For ``iterate``, the piece's values are also in ``current``, to be handed from there."""
        if self._sink.finished:
            return None
        taken: Piece | None = self._guarded(self._next_piece)
        return taken

    def gather(self) -> dict[int, Any]:
        """Every finished result this call is to report: those the caller was not given (all
        of them with ``keep_all``)."""
        out: dict[int, Any] = {}
        if self.taken_by_thread is not None:
            out.update(enumerate(list(self.taken_by_thread)))
        for piece in self._kept or ():
            _add(out, piece)
        if self.current is not None:
            self.current.gather_into(out)
        with self._sink.cond:
            for piece in self._sink.store.values():
                _add(out, piece)
        return dict(sorted(out.items()))

    # ── internals ────────────────────────────────────────────────────────────────────────

    def _guarded(self, step: Callable[[], Any]) -> Any:
        try:
            return step()
        except KeyboardInterrupt as exc:
            self._sink.finished = True
            raise self._host._stop_for(exc, self.gather, self.total) from None

    def _next_piece(self) -> Piece | None:
        # The piece taken last has been handed out whole by now: room for more input. (Only
        # here: a top-up when a piece is taken counts that piece as out, and when it was the
        # only one out, that top-up may find no room for a chunk.)
        self._top_up()
        sink = self._sink
        while isinstance(piece := self._wait_for_piece(), _Late):
            # In order, the next piece is late while later ones came in: room for more input.
            # A list map's window grows once the workers are running out of items, as the
            # stock pool's go on to the next tasks while a long one runs.
            running = self._pulled - sink.outcomes
            self._top_up(grow=self._eager and running < 2 * self._workers * self._chunk_size())
        if piece is None:
            return None
        start = piece[0]
        # Record the piece as taken, then remove it from the store (see the class docstring).
        if self._kept is not None:
            self._kept.append(piece)
        else:
            self.current = Current(*piece)
        with sink.cond:
            del sink.store[start]
            if not self._ordered:
                sink.arrivals.popleft()
        count = len(piece[1])
        self._next = start + count
        self._window *= 2
        # Before the piece counts as handed: none of it is yet, and the window bounds the items
        # read and not yet handed to the caller, these included.
        self._top_up()
        self._handed += count
        return piece

    def _wait_for_piece(self) -> Piece | _Late | None:
        """The next piece; None at the map's end; or ``_LATE``, in order, when outcomes came in
        while the next piece did not."""
        sink = self._sink
        with sink.cond:
            while True:
                start = self._next if self._ordered else (sink.arrivals[0] if sink.arrivals else -1)
                piece = sink.store.get(start)
                if piece is not None:
                    return piece
                if self._exhausted and self._handed >= self._pulled:
                    sink.finished = True
                    error, self._input_error = self._input_error, None
                    if error is not None:
                        raise error
                    sig = self._host._owes_interrupt()
                    if sig is not None:
                        # Stopped by a signal that raised nothing yet (a drain's first Ctrl-C
                        # while the caller's loop body ran): the map ends with it, not as if
                        # it had run to its end.
                        stop = Interrupted(sig)
                        stop._counted = True
                        raise stop
                    return None
                if sink.cancelled:
                    sink.finished = True
                    sig = self._host._signal
                    if sig is not None:
                        # The pool was interrupted: go and gather what finished. The signal was
                        # counted already, so the Interrupted says so.
                        stop = Interrupted(sig)
                        stop._counted = True
                        raise stop
                    broken = self._backend.broken
                    if isinstance(broken, BrokenPool):  # e.g. the main module's missing guard
                        raise BrokenPool(str(broken)) from broken
                    raise CancelledError("map() was cancelled: the pool was shut down")
                seen = sink.outcomes
                self._wait(sink.cond)
                if sink.outcomes != seen and self._ordered and not self._exhausted:
                    return _LATE

    def _wait(self, cond: threading.Condition) -> None:
        """Wait for the next outcome, ``CHECK_EVERY`` seconds at most at a time (see
        ``_signals``); the caller checks again what it waits for."""
        if self._deadline is None:
            cond.wait(CHECK_EVERY)
            return
        left = self._deadline - time.monotonic()
        if left > 0:
            cond.wait(min(left, CHECK_EVERY))
            return
        self._sink.finished = True
        raise TimeoutError("map() timed out before the next result was ready")

    def _measured(self) -> PerItem | None:
        """An item's seconds and its result's bytes, as this run's results say, or until they
        do, as this function's last map said (see ItemTimes); None while neither says."""
        sink = self._sink
        if not sink.item_count:
            return self._hint
        return sink.item_seconds / sink.item_count, sink.item_bytes / sink.item_count

    def _chunk_size(self) -> int:
        if self._fixed_chunk is not None:
            return self._fixed_chunk
        known = self._measured()
        if known is None:
            return 1
        per_item = max(known[0], 1e-9)
        chunk = min(int(CHUNK_SECONDS / per_item), self._max_chunk)
        if self.total is not None and self._fixed_window is None:
            # Work this brief is not worth a unit of its own (see MOMENT): the items of a small
            # map of fast tasks go in fewer, larger chunks, down to two for each worker.
            half_share = math.ceil(self.total / (self._workers * 2))
            chunk = max(chunk, min(int(MOMENT / per_item), half_share))
        return max(1, chunk)

    def _results_fit(self) -> int | None:
        """How many results fit in HELD_BYTES, as far as the results so far tell (None: no
        limit). Before any result, with a chunk size the caller set: one probe unit each."""
        if not self._fits_bytes:
            return None
        known = self._measured()
        if known is None:
            if self._fixed_chunk is None:
                return None  # chunks hold one item until a first result
            return self._workers * PROBE_ITEMS
        per_item = max(known[1], 1.0)
        return max(self._workers * 2, int(HELD_BYTES // per_item))

    def _top_up(self, grow: bool = False) -> None:
        """Read input into units while the window has room. ``grow``: the next piece of a list
        map is late (a long item) while the workers finish later ones: the window doubles."""
        if grow and self._fixed_window is None:
            self._window = max(self._window, 2 * (self._pulled - self._handed))
        # The units go to the backend together once read: one wake-up of its thread, and
        # one send to each worker, rather than one of each per chunk (unless reading the
        # input may wait: see _instant).
        try:
            self._read_input(grow)
        except BaseException:
            with contextlib.suppress(Exception):  # (the pool shut down: they have no outcome)
                self._put_outbox(quiet=True)
            raise
        self._put_outbox()

    def _put_outbox(self, quiet: bool = False) -> None:
        units, self._outbox = self._outbox, []
        if not units:
            return
        try:
            self._backend.put_all(units)
        except RuntimeError:
            sig = self._host._signal
            if sig is None or quiet:
                raise
            # The pool stopped since these items were read, for a signal whose handler put
            # its Interrupted off (it came where nothing may be raised): the caller gets that,
            # with what finished (see _guarded), not the backend's "shut down". The units'
            # items did not start, as none would now.
            _signals.raise_put_off()
            stop = Interrupted(sig)
            stop._counted = True
            raise stop from None

    def _read_input(self, grow: bool) -> None:
        if self._host._signal is not None:
            # The pool was stopped: no more input is read, and the map ends with what it has.
            self._exhausted = True
        while not self._exhausted:
            chunk = self._chunk_size()
            if self._fixed_window is not None:
                window = self._fixed_window
            else:
                target = max(self._workers * WINDOW_PER_WORKER, chunk * self._workers * 4)
                if grow:
                    target = max(target, self._window)
                if self._max_window is not None:
                    target = min(target, self._max_window)
                # The caller of an eager run takes every piece as it comes: its window is the
                # target itself, the full size for the chunk size known now (which the first
                # result changes: the probes' window is not kept).
                self._window = window = target if self._eager else min(self._window, target)
                if self._fixed_chunk is not None:  # one chunk the user set per worker fits
                    self._window = window = max(window, chunk * self._workers)
            if self._fixed_chunk is None and self._measured() is None:
                window = min(window, self._workers)  # a probe per worker (see CHUNK_SECONDS)
            fits = self._results_fit()
            if fits is not None and fits < window:  # a chunk the caller set: one per worker
                window = fits
                if self._fixed_chunk is not None:
                    chunk = max(1, min(chunk, window // self._workers))
            if self._fixed_chunk is None:  # two chunks per worker fit in the window
                chunk = max(1, min(chunk, window // (self._workers * 2)))
            # Never past the window. A chunk that does not fit waits, rather than go cut to
            # what fits: that piece, once taken, would make room for as little again, and the
            # chunks would stay small for good. Only when the user set both the window and
            # a chunk size that does not fit it is the chunk cut.
            room = window - (self._pulled - self._handed)
            cut = self._fixed_chunk is not None and self._fixed_window is not None
            if room <= 0 or (room < chunk and not cut):
                break
            chunk = min(chunk, room)
            # With a journal, the whole room is read and looked up at once: a resumed run
            # finds most items there, and one query per chunk of one item would be slow.
            want = room if self._keyer is not None else chunk
            if not self._instant:
                self._put_outbox()
            items: list[Any] = []
            try:
                items.extend(itertools.islice(self._source, want))  # keeps what came first
            except Exception as exc:
                # The input failed: the items read before it still run and are handed over,
                # then this is raised, in its place in the input.
                self._input_error = exc
            if len(items) < want:
                self._exhausted = True
            if self._keyer is not None:
                self._queue_or_reuse(items, chunk)
                continue
            if not items:
                break
            self._new_unit(items, self._sink, self._pulled)
            self._pulled += len(items)

    def _new_unit(self, items: list[Any], sink: Sink, start: int) -> None:
        """A unit of the items, into the outbox (see ``_top_up``)."""
        unit = self._backend.new_unit(self._kind, self._fn, items, sink, start, self._opts)
        known = self._measured()
        if known is not None:  # for the backend's send-ahead (see _manager.AHEAD_SECONDS)
            unit.expect = known[0] * len(items)
        self._outbox.append(unit)

    def _queue_or_reuse(self, items: list[Any], chunk: int) -> None:
        """Items of a run with a journal: those it has outcomes for are handed over at once,
        the others queued in units of at most ``chunk``, with their keys."""
        assert self._keyer is not None and self._journal is not None
        assert self._recorder is not None
        keys: list[bytes] = []
        try:
            for item in items:
                keys.append(self._keyer.item(item))
        except Exception as exc:  # a key= that raises, an argument that cannot be keyed
            # As a failing input: the items before it run, then this is raised in its place.
            del items[len(keys) :]
            self._input_error = exc
            self._exhausted = True
        found = self._journal.lookup(keys) if keys else {}
        n = len(items)
        i = 0
        while i < n:
            j = i + 1
            if keys[i] in found:
                while j < n and keys[j] in found:
                    j += 1
                outcomes = [found[k] for k in keys[i:j]]
                errors = {m: exc for m, (_, exc) in enumerate(outcomes) if exc is not None}
                start = self._pulled
                self._pulled += j - i
                self._sink.reuse(start, [value for value, _ in outcomes], errors)
            else:
                while j < n and j - i < chunk and keys[j] not in found:
                    j += 1
                start = self._pulled
                for m in range(i, j):
                    self._recorder.keys[start + m - i] = keys[m]
                self._new_unit(items[i:j], self._unit_sink, start)
                self._pulled += j - i
            i = j


def _add(out: dict[int, Any], piece: Piece) -> None:
    start, values, errors = piece
    if not errors:
        out.update(zip(range(start, start + len(values)), values, strict=True))
        return
    for k, value in enumerate(values):
        if k not in errors:
            out[start + k] = value


def iterate(run: MapRun[T], return_exceptions: bool = False) -> Iterator[T]:
    """The results, one by one.

    A task's exception is raised in its turn and ends the iteration, as in
    ``concurrent.futures``, carrying the finished results the caller was not given as its
    ``.completed``; closing the iterator drops the tasks not started. With
    ``return_exceptions``, the exception takes the result's place instead and the run goes on.
    """
    how = "stopped"
    try:
        while (piece := run.next_piece()) is not None:
            current = run.current
            assert current is not None
            _start, values, errors = piece
            count = len(values)
            del piece, values
            if errors and return_exceptions:
                rest = current.rest
                for k, exc in errors.items():
                    rest[count - 1 - k] = exc
            elif errors:
                first = min(errors)
                yield from current.take(first)
                current.rest.pop()  # the failed item: the caller gets its exception instead
                exc = errors[first]
                _attach_completed(exc, run.gather())
                raise exc
            yield from current.take(count)
        how = "done"
    except KeyboardInterrupt:
        how = "interrupted"
        raise
    finally:
        run.close(how)


def _attach_completed(exc: BaseException, completed: dict[int, Any]) -> None:
    with contextlib.suppress(AttributeError, TypeError):
        exc.completed = completed  # type: ignore[attr-defined]


def collect(run: MapRun[T], return_exceptions: bool) -> list[Any]:
    """Every result in input order (for ``cleanbreak.map``). Every task runs. A failed task's
    exception takes its place in the list if ``return_exceptions``; otherwise the first
    failure is raised once all have run, with a note that counts the failures and the other
    results as its ``completed`` attribute ({index: result})."""
    results: list[Any] = []
    failures: dict[int, BaseException] = {}
    how = "stopped"
    try:
        while (piece := run.next_piece()) is not None:
            start, values, errors = piece
            for k in sorted(errors):
                failures[start + k] = errors[k]
                if return_exceptions:
                    values[k] = errors[k]
            results.extend(values)
        how = "done"
    except KeyboardInterrupt:
        how = "interrupted"
        raise
    finally:
        run.close(how)
    if failures and not return_exceptions:
        index, first = min(failures.items())
        note = (
            f"{len(failures)} of {len(results)} tasks failed; this is task {index}, the first in "
            "input order."
        )
        if len(failures) < len(results):
            note += (
                " The other results are in this exception's .completed, or pass "
                "return_exceptions=True to get them all in the list."
            )
        if not (isinstance(first, BrokenPool) and len(failures) == len(results)):
            # (A pool that could not run any task says why, and what to do, on its last line.)
            first.add_note(note)
        _attach_completed(first, {i: value for i, value in enumerate(results) if i not in failures})
        raise first
    return results
