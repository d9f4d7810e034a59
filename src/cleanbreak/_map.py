"""``map`` and ``imap_unordered``: lazy input, chunks, order, and what Ctrl-C keeps.

The caller's thread reads the input a chunk at a time, while fewer than ``window`` items are
out (read but not yet handed to the caller), and queues each chunk as one unit. The manager
thread puts outcomes on the sink's queue as *pieces*: a run of consecutive items, with their
values and any errors. The caller takes whole pieces, so the per-item cost in the parent is a
``yield`` (or, for ``cleanbreak.map``, a ``list.extend``), not a queue operation.

What ``Interrupted.completed`` holds: for a sized input (a list, a range: the input is in memory
anyway) every finished result; for a lazy input, the finished results not yet handed over, since
keeping the others would grow memory without bound on an endless generator.
"""

from __future__ import annotations

import itertools
import math
import operator
import queue
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._errors import Interrupted
from ._units import TaskOptions, Unit
from ._wire import CALL_ONE, CALL_STAR

if TYPE_CHECKING:
    from ._pool import Pool

T = TypeVar("T")

_OK, _FAIL, _CANCEL = 0, 1, 2

# Chunks are sized from the measured time per item, so that each takes about this long: long
# enough that the cost of sending it is small beside the work, short enough that the last
# chunks do not leave a worker idle for long. Until a first result says how long an item takes,
# chunks hold one item.
CHUNK_SECONDS = 0.05
# With lazy input, a chunk holds at most this many items, so that the window (the items read
# ahead) stays bounded whatever the task costs.
LAZY_MAX_CHUNK = 4096
# The window before anything is known, and its floor: this many items per worker.
WINDOW_PER_WORKER = 32
Piece = tuple[int, list[Any], dict[int, BaseException]]


def positive(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1 (or None), got {value!r}")
    return value


class MapSink:
    """Outcomes of one ``map`` call, onto a queue its iterator reads.

    Kept apart from the run so that queued units do not keep the run alive; ``finished`` set
    means units that have not left the parent are dropped.
    """

    __slots__ = ("events", "finished")

    def __init__(self) -> None:
        self.events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.finished = False

    def start(self, unit: Unit) -> bool:
        return not self.finished

    def deliver(
        self, start: int, values: list[Any], errors: dict[int, BaseException], seconds: float
    ) -> None:
        self.events.put((_OK, start, values, errors, seconds))

    def fail(self, start: int, count: int, exc: BaseException) -> None:
        self.events.put((_FAIL, start, count, exc))

    def cancel(self, start: int, count: int) -> None:
        self.events.put((_CANCEL, start, count, None))


class MapRun(Generic[T]):
    """The state of one ``map`` or ``imap_unordered`` call."""

    def __init__(
        self,
        pool: Pool,
        opts: TaskOptions,
        fn: Callable[..., T],
        iterables: tuple[Iterable[Any], ...],
        *,
        ordered: bool,
        timeout: float | None,
        chunksize: int | None,
        buffersize: int | None,
        keep_all: bool | None = None,
    ) -> None:
        chunk = positive("chunksize", chunksize)
        window = positive("buffersize", buffersize)
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
        if not callable(fn):
            raise TypeError(f"the function to map must be callable, got {fn!r}")
        pool._check_open()
        sizes = [len(it) for it in iterables if hasattr(it, "__len__")]  # type: ignore[arg-type]
        self.total = min(sizes) if len(sizes) == len(iterables) else None
        self._workers = pool.workers
        self._fixed_chunk = chunk
        self._fixed_window = window
        if self.total is not None:
            # Like multiprocessing.Pool.map: at least four chunks per worker, for balance.
            self._max_chunk = max(1, math.ceil(self.total / (self._workers * 4)))
        else:
            self._max_chunk = LAZY_MAX_CHUNK
        if window is not None:
            self._max_chunk = min(self._max_chunk, window)
        self._item_seconds = 0.0  # measured: seconds of work, over
        self._item_count = 0  # ... this many items
        self._pool = pool
        self._backend = pool._backend
        self._sink = MapSink()
        self._opts = opts
        self._fn = fn
        self._kind = CALL_ONE if len(iterables) == 1 else CALL_STAR
        self._source: Iterator[Any] = (
            iter(iterables[0]) if len(iterables) == 1 else zip(*iterables, strict=False)
        )
        self._ordered = ordered
        self._deadline = None if timeout is None else time.monotonic() + timeout
        keep = self.total is not None if keep_all is None else keep_all
        self._kept: list[Piece] | None = [] if keep else None  # pieces handed over
        self._pieces: dict[int, Piece] = {}  # ordered: arrived, keyed by start
        self._arrived: deque[Piece] = deque()  # unordered: arrived, in order of arrival
        self.current: tuple[Piece, Iterator[Any]] | None = None  # piece being yielded
        self._pulled = 0  # items read from the input
        self._handed = 0  # items handed to the caller
        self._next = 0  # ordered: the index the caller gets next
        self._cancelled = False
        self._exhausted = False
        pool._runs.add(self)
        self._guarded(self._top_up)

    @property
    def finished(self) -> bool:
        return self._sink.finished

    def close(self) -> None:
        """Stop reading input; units that have not left the parent are dropped."""
        if not self._sink.finished:
            self._sink.finished = True
            if not (self._exhausted and self._handed >= self._pulled):
                self._pool._last_run = self  # for the with-block's Interrupted

    def next_piece(self) -> Piece | None:
        """The next piece of results, waiting for it; None when every item was handed over."""
        if self._sink.finished:
            return None
        piece: Piece | None = self._guarded(self._next_piece)
        return piece

    # ── internals ────────────────────────────────────────────────────────────────────────

    def _guarded(self, step: Callable[[], Any]) -> Any:
        try:
            return step()
        except KeyboardInterrupt as exc:
            self._sink.finished = True
            self._pool._stop(exc)
            raise self._pool._interrupted(exc, self.gather(), self.total) from None

    def gather(self) -> dict[int, Any]:
        """Every finished result this call is to report. The pool must have stopped."""
        while True:
            try:
                event = self._sink.events.get_nowait()
            except queue.Empty:
                break
            self._apply(event)
        out: dict[int, Any] = {}
        if self._kept is not None:
            for piece in self._kept:
                _add(out, piece, 0)
        elif self.current is not None:
            (start, values, errors), rest = self.current
            # The list iterator knows how many items it has not handed out yet.
            _add(out, (start, values, errors), len(values) - operator.length_hint(rest))
        for piece in itertools.chain(self._pieces.values(), self._arrived):
            _add(out, piece, 0)
        return dict(sorted(out.items()))

    def _next_piece(self) -> Piece | None:
        while True:
            if self._ordered:
                piece = self._pieces.pop(self._next, None)
                if piece is not None:
                    self._next += len(piece[1])
                    return self._hand(piece)
            elif self._arrived:
                return self._hand(self._arrived.popleft())
            if self._exhausted and self._handed >= self._pulled:
                self._sink.finished = True
                return None
            self._wait_event()

    def _hand(self, piece: Piece) -> Piece:
        self._handed += len(piece[1])
        if self._kept is not None:
            self._kept.append(piece)
        self._top_up()
        return piece

    def _chunk_size(self) -> int:
        if self._fixed_chunk is not None:
            return self._fixed_chunk
        if not self._item_count:
            return 1
        per_item = max(self._item_seconds / self._item_count, 1e-9)
        return max(1, min(int(CHUNK_SECONDS / per_item), self._max_chunk))

    def _top_up(self) -> None:
        while not self._exhausted:
            chunk = self._chunk_size()
            window = self._fixed_window or max(
                self._workers * WINDOW_PER_WORKER, chunk * self._workers * 4
            )
            if self._pulled - self._handed >= window:
                break
            try:
                items = list(itertools.islice(self._source, chunk))
            except Exception:
                self._sink.finished = True
                raise
            if len(items) < chunk:
                self._exhausted = True
            if not items:
                break
            unit = self._backend.new_unit(
                self._kind, self._fn, items, self._sink, self._pulled, self._opts
            )
            self._pulled += len(items)
            self._backend.put(unit)

    def _wait_event(self) -> None:
        timeout = None
        if self._deadline is not None:
            timeout = self._deadline - time.monotonic()
        try:
            if timeout is not None and timeout <= 0:
                raise queue.Empty
            event = self._sink.events.get(timeout=timeout)
        except queue.Empty:
            self._sink.finished = True
            raise TimeoutError("map() timed out before the next result was ready") from None
        self._apply(event)
        if self._cancelled:
            if self._pool._signal is not None:
                # The pool was interrupted: go and gather what finished. The signal was counted
                # already, so the Interrupted says so.
                stop = Interrupted(self._pool._signal)
                stop._counted = True
                raise stop
            self._sink.finished = True
            raise CancelledError("map() was cancelled: the pool was shut down")

    def _apply(self, event: tuple[Any, ...]) -> None:
        kind, start = event[0], event[1]
        if kind == _OK:
            piece: Piece = (start, event[2], event[3])
            self._item_seconds += event[4]
            self._item_count += len(event[2])
        elif kind == _FAIL:
            count, exc = event[2], event[3]
            piece = (start, [None] * count, dict.fromkeys(range(count), exc))
        else:
            self._cancelled = True
            return
        if self._ordered:
            self._pieces[start] = piece
        else:
            self._arrived.append(piece)


def _add(out: dict[int, Any], piece: Piece, skip: int) -> None:
    start, values, errors = piece
    if not errors:
        out.update(zip(range(start + skip, start + len(values)), values[skip:], strict=True))
        return
    for k in range(skip, len(values)):
        if k not in errors:
            out[start + k] = values[k]


def iterate(run: MapRun[T]) -> Iterator[T]:
    """The results, one by one. A task's exception is raised in its turn and ends the
    iteration, as in ``concurrent.futures``; closing the iterator drops the tasks not started."""
    try:
        while (piece := run.next_piece()) is not None:
            _start, values, errors = piece
            rest = iter(values)
            run.current = (piece, rest)
            if not errors:
                yield from rest
                continue
            first = min(errors)
            yield from itertools.islice(rest, first)
            next(rest)
            raise errors[first]
    finally:
        run.close()


def collect(run: MapRun[T]) -> list[T]:
    """Every result in input order (for ``cleanbreak.map``). Every task runs; the first failure
    is then raised, with a note that counts the failures."""
    results: list[T] = []
    failures: list[BaseException] = []
    try:
        while (piece := run.next_piece()) is not None:
            _start, values, errors = piece
            results.extend(values)
            failures.extend(errors[k] for k in sorted(errors))
    finally:
        run.close()
    if failures:
        first = failures[0]
        first.add_note(
            f"{len(failures)} of {len(results)} tasks failed; this is the first in input order"
        )
        raise first
    return results
