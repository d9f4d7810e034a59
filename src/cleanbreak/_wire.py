"""What crosses the process boundary, and how.

Every message is one *frame*: an 8-byte little-endian length, then a body made of *parts*, each
pickled apart (protocol 5), after a small table of their lengths. Parts are written one after
the other, never joined into one buffer, and read back as views of the received body: a large
payload is not copied on its way through. Pickling the parts apart lets each side say exactly
what failed (the function or the arguments; one result in a chunk) and keep the rest. Each
worker has two pipes of its own::

    parent (manager thread)                          worker (its main thread)
    ───────────────────────                          ────────────────────────
    FrameWriter ── task pipe ──────────────────────▶ recv_frame()  blocking
      non-blocking, written as the pipe drains
    FrameReader ◀─────────────────────── result pipe ── send_frame()  blocking
      non-blocking, read as bytes arrive

The parent side never blocks on a pipe, in either direction: the manager writes only what the
pipe accepts and reads whatever has arrived, both from its single ``select``. That is what makes
payloads of any size safe. A worker can be blocked writing a 200 MB result while the manager
is part-way through writing it the next task, and neither waits for the other.

Messages, parent to worker: parts ``(uid, kind, exact, fid, spill, ahead, item_claims,
forget)``, ``fn``, ``items``; or the single part ``None``, to exit. ``ahead`` and
``item_claims`` number the claims the worker takes first (see ``_manager``, "Taking back"): the
unit's, and its second item's (each item after the first has one, for tasks that travel
together; else 0). ``fid`` numbers the function; ``fn`` is empty
when the worker holds that function from an earlier unit, and ``forget`` numbers the functions
it is to let go of (see ``_manager._Functions``). Messages, worker to parent:
parts ``(uid, offset, count, status, seconds)`` and ``(values, errors)``. ``values`` holds the
results of ``count`` items from ``offset`` in the unit, ``errors`` maps a position in ``values``
to a ``CapturedError``, ``status`` says
whether more of the unit follows (``PARTIAL``), it is done (``DONE``), the worker stopped before
the next item because the pool's gate closed (``SKIPPED``), a SIGTERM broke off the next item
and the worker is about to die of it (``STOPPED``), or the unit could not be unpickled
(``UNREADABLE``), and ``seconds`` is how long those items took (which sizes the next chunks).
The first message of a worker is one part: ``None`` once it is ready, or the ``CapturedError``
of its initializer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import struct
import sys
import traceback
from collections import deque

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX; Pool() refuses to start there
    fcntl = None  # type: ignore[assignment]

from . import _shm
from ._errors import RemoteTraceback, SerializationError, TaskAborted
from ._shm import Layout, Packer

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see _notyping)
if TYPE_CHECKING:
    from typing import Any, Final

HEADER: Final = struct.Struct("<Q")
_PART_LENGTH: Final = struct.Struct("<Q")
PROTOCOL: Final = pickle.HIGHEST_PROTOCOL

# How a worker calls the unit's function on each item.
CALL_ONE: Final = 0  # fn(item)
CALL_STAR: Final = 1  # fn(*item)
CALL_KW: Final = 2  # fn(*item[0], **item[1])

PARTIAL: Final = 0
DONE: Final = 1
SKIPPED: Final = 2
STOPPED: Final = 4  # (3 is the worker's UNREADABLE)

# Reads and writes are capped so that one busy worker cannot starve the others in the
# manager's loop, and so that a read buffer does not grow without bound.
_IO_STEP: Final = 1 << 20
_IOV_MAX: Final = 16  # views handed to one writev: POSIX lets no system take fewer
_READ_AHEAD: Final = 1 << 16  # what the parent asks of a result pipe at once (see FrameReader)
_PIPE_SIZE: Final = 1 << 20


def make_pipe() -> tuple[int, int]:
    """A pipe with a 1 MiB buffer where the kernel allows it (Linux); the default elsewhere."""
    r, w = os.pipe()
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setsize is not None:
        with contextlib.suppress(OSError):  # pipe-max-size is lower here: keep the default
            fcntl.fcntl(w, setsize, _PIPE_SIZE)
    return r, w


def dumps(obj: object) -> bytes:
    return pickle.dumps(obj, PROTOCOL)


def size_of(value: object) -> int:
    """``sys.getsizeof(value)``: how large a result is, as far as can be told at once (the
    worker's flush and spill thresholds, the parent's bound on the results it holds); 0 where
    the value's own ``__sizeof__`` fails."""
    try:
        return sys.getsizeof(value)
    except Exception:  # a __sizeof__ of the user's that fails
        return 0


# A claim on a unit sent ahead to a busy worker (see _manager, "Taking back"): the unit's
# number, in 8 bytes, on that worker's claim pipe. A pipe gives each write of up to PIPE_BUF
# bytes to one reader whole, so a claim read by the parent is one the worker will not find.
_CLAIM = struct.Struct("<Q")


def write_claims(fd: int, seqs: list[int]) -> None:
    """Write the claims, in writes of at most PIPE_BUF bytes (POSIX's least, 512): each
    reader's read of one claim still gets it whole."""
    for at in range(0, len(seqs), _CLAIMS_PER_WRITE):
        os.write(fd, b"".join(map(_CLAIM.pack, seqs[at : at + _CLAIMS_PER_WRITE])))


_CLAIMS_PER_WRITE = 512 // _CLAIM.size


def read_claim(fd: int) -> int | None:
    """The oldest claim on the (non-blocking) pipe ``fd``, or None if there is none."""
    try:
        data = os.read(fd, _CLAIM.size)
    except (BlockingIOError, OSError):
        return None
    return _CLAIM.unpack(data)[0] if len(data) == _CLAIM.size else None


def dumps_any(obj: object) -> bytes:
    """``obj`` pickled plainly, or, where that fails, with what has no importable home (a
    class that came by value, a lambda) sent by value (see ``_byvalue``)."""
    try:
        return dumps(obj)
    except Exception:
        from . import _byvalue

        return _byvalue.dumps(obj)


def frame(*parts: bytes | Packer) -> list[Any]:
    """What to write, in order, for one frame holding these parts (they are not copied).

    A part packed with segments (see ``_shm``) adds one last part: the layouts, by part index.
    """
    layouts = {
        i: p.layout for i, p in enumerate(parts) if isinstance(p, Packer) and p.layout is not None
    }
    if layouts:
        parts = (*parts, dumps(layouts))
    sizes = [p.size if isinstance(p, Packer) else len(p) for p in parts]
    table = bytes([len(parts)]) + b"".join(_PART_LENGTH.pack(n) for n in sizes)
    out: list[Any] = [HEADER.pack(len(table) + sum(sizes)) + table]
    for p in parts:
        if isinstance(p, Packer):
            out.extend(p.chunks)
        else:
            out.append(p)
    return out


def split(body: bytearray, count: int = 0) -> tuple[list[memoryview], dict[int, Layout]]:
    """The parts of a received frame body, as views of it, and the layouts of those that have
    segments. ``count`` is how many parts the message has without its layouts."""
    view = memoryview(body)
    n = view[0]
    pos = 1 + n * _PART_LENGTH.size
    out = []
    for (length,) in _PART_LENGTH.iter_unpack(view[1:pos]):
        out.append(view[pos : pos + length])
        pos += length
    if count and len(out) > count:
        return out[:count], pickle.loads(out[count])
    return out, {}


def discard(layouts: dict[int, Layout]) -> None:
    """Remove the segments of parts that will not be loaded."""
    for layout in layouts.values():
        _shm.discard(layout)


# ── worker side: blocking ────────────────────────────────────────────────────────────────────


def send_frame(fd: int, *parts: bytes | Packer) -> None:
    """Write one frame, blocking until the manager has taken it all."""
    queue = _views(frame(*parts))
    while queue:
        _advance(queue, os.writev(fd, _batch(queue)))


def _views(pieces: list[Any]) -> deque[memoryview]:
    return deque(memoryview(piece) for piece in pieces if piece)


def _batch(queue: deque[memoryview]) -> list[memoryview]:
    """The views at the head of ``queue`` for one ``writev``: a small frame goes whole in one
    write, so that the reader wakes once for it, and finds all of it."""
    batch: list[memoryview] = []
    room = _IO_STEP
    for view in queue:
        if len(view) >= room:
            batch.append(view[:room])
            break
        batch.append(view)
        room -= len(view)
        if len(batch) == _IOV_MAX:
            break
    return batch


def _advance(queue: deque[memoryview], written: int) -> None:
    """Drop the ``written`` bytes at the head of ``queue``."""
    while written:
        head = queue[0]
        if written < len(head):
            queue[0] = head[written:]
            return
        queue.popleft()
        written -= len(head)


def recv_frame(fd: int) -> bytearray | None:
    """Read one frame, blocking. ``None`` at end of file: the parent is gone."""
    head = _read_exact(fd, HEADER.size)
    if head is None:
        return None
    (size,) = HEADER.unpack(head)
    return _read_exact(fd, size)


def _read_exact(fd: int, size: int) -> bytearray | None:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = os.readv(fd, [view[got : got + _IO_STEP]])
        if n == 0:
            return None
        got += n
    return buf


# ── parent side: non-blocking ────────────────────────────────────────────────────────────────


class FrameReader:
    """Reassembles frames from a non-blocking pipe.

    It reads ahead: one ``os.read`` of up to ``_READ_AHEAD`` bytes takes a small frame whole
    (a worker writes each frame with one ``writev``), or several, and a read that comes back
    short says the pipe is empty, with no further read to fail with ``EAGAIN``: one system
    call per small result. A large body is read straight into its own buffer.
    """

    __slots__ = ("_ahead", "_body", "_got", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._ahead = bytearray()  # bytes read past the last whole frame: less than a header
        self._body: bytearray | None = None  # a large frame's body, ``_got`` bytes of it in
        self._got = 0

    def read(self) -> tuple[list[bytearray], bool]:
        """Read what has arrived. Returns the complete frames and whether the pipe hit EOF."""
        frames: list[bytearray] = []
        while True:
            try:
                if self._body is None:
                    chunk = os.read(self.fd, _READ_AHEAD)
                    if not chunk:
                        return frames, True
                    self._ahead += chunk
                    self._split(frames)
                    short = len(chunk) < _READ_AHEAD
                else:
                    view = memoryview(self._body)[self._got : self._got + _IO_STEP]
                    got = os.readv(self.fd, [view])
                    if got == 0:
                        return frames, True
                    short = got < len(view)
                    del view
                    self._got += got
                    if self._got == len(self._body):
                        frames.append(self._body)
                        self._body = None
                if short:  # the pipe is empty: select says when more comes
                    return frames, False
            except BlockingIOError:
                return frames, False
            except OSError as exc:  # pragma: no cover - EBADF after a race with close
                if exc.errno in (errno.EBADF, errno.EIO):
                    return frames, True
                raise

    def _split(self, frames: list[bytearray]) -> None:
        """Move the whole frames out of ``_ahead``; a frame begun there and not ended becomes
        ``_body``."""
        ahead = self._ahead
        pos = 0
        while len(ahead) - pos >= HEADER.size:
            (size,) = HEADER.unpack_from(ahead, pos)
            pos += HEADER.size
            have = len(ahead) - pos
            if have < size:
                self._body = bytearray(size)
                self._body[:have] = ahead[pos:]
                self._got = have
                pos = len(ahead)
                break
            frames.append(ahead[pos : pos + size])
            pos += size
        del ahead[:pos]


class FrameWriter:
    """Queues frames for a non-blocking pipe and writes as much as the pipe accepts."""

    __slots__ = ("_queue", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._queue: deque[memoryview] = deque()

    def put(self, *parts: bytes | Packer) -> None:
        self._queue.extend(_views(frame(*parts)))

    @property
    def pending(self) -> bool:
        return bool(self._queue)

    def flush(self) -> None:
        """Write until the pipe is full or the queue empty. Raises BrokenPipeError if the
        worker is gone."""
        queue = self._queue
        while queue:
            try:
                written = os.writev(self.fd, _batch(queue))
            except BlockingIOError:
                return
            _advance(queue, written)


# ── errors that cross the boundary ───────────────────────────────────────────────────────────


class CapturedError:
    """A task's exception, made safe to pickle, with the traceback formatted in the worker."""

    __slots__ = ("exc", "tb")

    def __init__(self, exc: BaseException | None, tb: str) -> None:
        self.exc = exc
        self.tb = tb

    def __reduce__(self) -> tuple[Any, ...]:
        return (CapturedError, (self.exc, self.tb))

    @classmethod
    def capture(cls, exc: BaseException) -> CapturedError:
        tb = "".join(traceback.format_exception(exc))
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            detail = ", ".join(repr(a) for a in exc.args)
            return cls(TaskAborted(type(exc).__name__, detail), tb)
        try:
            # An exception pickles but may not unpickle (a required __init__ argument that is not
            # in .args). Try the round trip here, where the cause can still be reported. A class
            # that came by value (a notebook's) goes back by value.
            pickle.loads(dumps_any(exc))
        except BaseException as err:
            reason = f"{type(exc).__name__}: {exc} (and pickling it failed: {err!r})"
            return cls(SerializationError("exception", reason), tb)
        exc.__traceback__ = None
        exc.__context__ = None
        exc.__cause__ = None
        return cls(exc, tb)

    def rebuild(self) -> BaseException:
        exc = self.exc if self.exc is not None else RuntimeError("unknown task error")
        with contextlib.suppress(BaseException):  # a user's class may refuse the attribute
            exc.__cause__ = RemoteTraceback(f'\n"""\n{self.tb}"""')
        return exc
