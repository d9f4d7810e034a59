"""Large buffers out of band, through shared memory; everything else through the pipe.

A message part is pickled (protocol 5) into a ``Packer``, a file-like object, instead of into
one ``bytes``. CPython's pickler hands any payload of 64 KiB or more to ``write()`` as the
object itself (the ``bytes``, the ``bytearray``, the ``PickleBuffer``), without copying it into
the pickle. The packer writes each one of at least ``THRESHOLD`` bytes straight into a
segment, a file in ``/dev/shm`` (memory, not disk), and leaves a *hole* in the stream that goes
through the pipe. Buffers that pickle protocol 5 hands out of band (numpy arrays, anything that
pickles as a ``PickleBuffer``) go into a segment of their own::

    sender                                  receiver
    ──────                                  ────────
    Pickler(Packer).dump(obj)               load(pipe_part, layout)
      small pieces ──── pipe ─────────────▶   Unpickler(_Stream): reads the pipe part, and
      large in-band payload ── segment ──▶      each hole straight from its segment into the
        (bytes, bytearray, str)                 new object (one copy: os.preadv)
      out-of-band buffer ── segment ──────▶   buffers= mmap of each segment (no copy: the
        (numpy, PickleBuffer)                   array lives in the shared pages)

The sender copies each large payload once (``pwrite`` into the segment), the receiver once for
``bytes`` and ``bytearray`` (it needs an object of its own) and not at all for out-of-band
buffers. Neither side maps a segment it writes or holds a second copy in its own memory. The
receiver's copy goes into fresh memory, so it is mostly page faults; one of 16 MiB or more is
shared out between the receiving thread and up to ``HELPERS`` helper threads (one fewer than the
CPUs), 8 MiB or more each, which take their faults at once.

Stream segments are written again. Filling a tmpfs file's fresh pages costs three times as
much as writing over pages it has (24 ms against 7 ms for 50 MB here), so each process keeps a
few stream segments, named with an ``s``: ``SPARES`` in a worker, and in the parent one more
than the workers (at least ``SPARES``). The first page of one holds a token: the sender writes
a new one before each message, the receiver writes zero once it has read the message (or given
up on it), and a sender writes only into a spare that reads zero. A spare is cut to the length
of its latest message, and emptied once read if that was over ``SPARE_MAX``. Out-of-band
segments are not written again: the receiver's object lives in their pages.

Segments never outlive the pool:

- The receiver opens and unlinks each one-off segment before it unpickles anything, so a
  segment that was received is gone from ``/dev/shm`` whatever happens next. Its memory is
  freed when the last mapping of it goes. A spare stays until its maker goes.
- When the tmpfs is full, a process removes its spares that are free (read by their receiver).
- Names are ``cb-<pid namespace>-<pool pid>-<token>-<creator>-<n>``. When a worker exits, the
  parent removes the segments that worker made (its spares too) and those it had sent it that
  it had not read (a spare of the parent's only if it still holds that message's token: read,
  it may carry another worker's message now). When the pool stops,
  for whatever reason, the parent removes every segment of the pool.
- When the parent dies, even by SIGKILL, each worker's watchdog removes every segment of the
  pool before it kills its process group. It takes the creation lock first, so that its own
  worker cannot make one after it looked.
- A pool that starts removes the segments of pools whose parent is gone from this pid
  namespace (all their processes were killed at once: an OOM kill of the whole group).

Where ``/dev/shm`` is missing or not writable (macOS), or a segment cannot be written (the
tmpfs is full), that payload simply stays in the pipe; a full tmpfs is reported once per
process, with a ``RuntimeWarning``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import mmap
import os
import pickle
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence

from ._signals import start_quiet_thread

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see _notyping)
if TYPE_CHECKING:
    from typing import Any, Final

SHM_DIR: Final = "/dev/shm"
# Payloads at least this large go into a segment. Below it, the pipe is as fast: a segment
# costs about six system calls and fresh pages on each side.
THRESHOLD: Final = 1 << 20
PROTOCOL: Final = 5

# A stream segment's first page holds its state: the token of the message it carries, or zero
# once it was read (free to be written again). The holes start on the next page.
HEADER: Final = 4096
_FREE: Final = bytes(8)
# Stream segments a process keeps to write again, rather than make new ones: writing into a
# tmpfs file's existing pages costs a third of filling fresh ones (``benchmarks/``).
SPARES: Final = 2
# A spare keeps no more pages than this once its message was read: a pool that once moved a
# huge payload does not hold that much of /dev/shm for the rest of its life.
SPARE_MAX = 64 << 20

# Where a part's large payloads are: (stream segment, its token, [(pipe offset, length), ...])
# for the holes in its stream (token 0: the receiver removes the segment, else it frees it),
# and [(segment, length, readonly), ...] for its out-of-band buffers.
Layout = tuple[str | None, int, list[tuple[int, int]], list[tuple[str, int, bool]]]


def _namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK | os.X_OK)


class Segments:
    """Makes and removes the segments of one pool, from one process (the parent or a worker).

    ``prefix`` names the pool; every segment name starts with it. ``None`` means segments are
    not used: everything goes through the pipe.
    """

    def __init__(self, prefix: str | None, spares: int = SPARES) -> None:
        self.prefix = prefix
        self.spares = max(spares, SPARES)
        self._creator = f"{os.getpid()}-"
        self._count = 0
        self._spares: list[str] = []  # stream segments this process made, to write again
        self._tokens = itertools.count(1)
        # Held while a segment is created, and for good by a watchdog that purges (see the top).
        self.lock = threading.Lock()

    @staticmethod
    def new_pool(spares: int = SPARES) -> Segments:
        if not available():
            return Segments(None)
        _reap_dead_pools()
        prefix = f"cb-{_namespace()}-{os.getpid()}-{os.urandom(4).hex()}-"
        return Segments(prefix, spares)

    def create(self, spare: bool = False) -> tuple[str, int]:
        """A new, empty segment: its name and a descriptor open for writing. A spare's name
        has an ``s`` before its number."""
        assert self.prefix is not None
        with self.lock:
            self._count += 1
            name = f"{self.prefix}{self._creator}{'s' if spare else ''}{self._count}"
            return name, _open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL)

    def stream(self) -> tuple[str, int, int]:
        """A segment for a message's holes: its name, a descriptor open for writing, and the
        token now in its header (0: a one-off segment, which its receiver removes).

        A spare whose receiver freed it is taken first; a new segment becomes a spare while
        there are fewer than ``self.spares``.
        """
        for name in list(self._spares):
            try:
                fd = _open(name, os.O_RDWR)
            except FileNotFoundError:  # removed by a purge
                self._spares.remove(name)
                continue
            except OSError:  # out of descriptors, say: not this time
                continue
            try:
                if _header(fd) == _FREE:
                    return name, fd, self._claim(fd)
            except OSError:
                pass
            os.close(fd)
        if len(self._spares) >= self.spares:
            return (*self.create(), 0)
        name, fd = self.create(spare=True)
        try:
            token = self._claim(fd)
        except OSError:
            os.close(fd)
            unlink(name)
            raise
        self._spares.append(name)
        return name, fd, token

    def _claim(self, fd: int) -> int:
        token = next(self._tokens)
        _write_all(fd, memoryview(_token_bytes(token)), 0)
        return token

    def shed(self, keep: str | None) -> None:
        """The tmpfs is full: remove the spares that are free (but ``keep``). One that holds
        a message its receiver has not read yet stays."""
        for name in list(self._spares):
            if name != keep and _holds(name, _FREE):
                unlink(name)
                self._spares.remove(name)

    def purge(self, creator: int | None = None) -> None:
        """Remove the pool's segments: all of them, or those made by process ``creator``."""
        if self.prefix is None:
            return
        start = self.prefix if creator is None else f"{self.prefix}{creator}-"
        with contextlib.suppress(OSError):
            for name in os.listdir(SHM_DIR):
                if name.startswith(start):
                    unlink(name)

    def purge_for_good(self) -> None:
        """The parent is gone: remove every segment of the pool, and make no more."""
        self.lock.acquire()
        self.purge()


def _open(name: str, flags: int) -> int:
    return os.open(os.path.join(SHM_DIR, name), flags | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


def unlink(name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(SHM_DIR, name))


def unlink_all(names: Sequence[str]) -> None:
    for name in names:
        unlink(name)


def remove_unread(sent: Sequence[tuple[str, int]]) -> None:
    """Remove the segments of messages whose receiver died: each ``(name, token)``. A spare
    whose header no longer holds the token was read, and may carry another message now."""
    for name, token in sent:
        if not token or _holds(name, _token_bytes(token)):
            unlink(name)


def _token_bytes(token: int) -> bytes:
    return token.to_bytes(len(_FREE), "little")


def _header(fd: int) -> bytes:
    """What a spare's header holds: a token, or ``_FREE``."""
    return os.pread(fd, len(_FREE), 0) or _FREE  # empty: made, never written


def _holds(name: str, header: bytes) -> bool:
    """Whether spare ``name`` exists and its header reads ``header``."""
    try:
        fd = _open(name, os.O_RDONLY)
    except OSError:
        return False
    try:
        return _header(fd) == header
    except OSError:
        return False
    finally:
        os.close(fd)


def _reap_dead_pools() -> None:
    """Remove the segments of pools in this pid namespace whose parent no longer exists."""
    ours = f"cb-{_namespace()}-"
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(ours)]
    except OSError:
        return
    dead: dict[str, bool] = {}
    for name in names:
        pid = name[len(ours) :].split("-", 1)[0]
        if pid not in dead:
            dead[pid] = not pid.isdigit() or not _alive(int(pid))
        if dead[pid]:
            unlink(name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _bytes_of(obj: Any) -> memoryview:
    """A flat byte view of what the pickler passed to ``write``."""
    if isinstance(obj, pickle.PickleBuffer):
        return obj.raw()
    view = memoryview(obj)
    return view if view.ndim == 1 and view.itemsize == 1 else view.cast("B")


class Packer:
    """The file a part is pickled into: see the top of this module.

    After ``pack()``, ``chunks`` is what goes through the pipe and ``size`` its length;
    ``layout`` says where the rest is (``None``: all of it is in the pipe), ``names`` lists the
    one-off segments made (not a spare, which is not removed), ``sent`` every segment with its
    token, and ``total`` counts every byte of the part.
    """

    __slots__ = (
        "_stream",
        "_stream_end",
        "_stream_fd",
        "_token",
        "chunks",
        "holes",
        "names",
        "oob",
        "segments",
        "size",
    )

    def __init__(self, segments: Segments) -> None:
        self.segments = segments
        self.chunks: list[Any] = []
        self.size = 0
        self.holes: list[tuple[int, int]] = []
        self.oob: list[tuple[str, int, bool]] = []
        self.names: list[str] = []
        self._stream: str | None = None
        self._stream_fd = -1
        self._stream_end = HEADER
        self._token = 0

    def pack(self, obj: object, pickler: type[pickle.Pickler] = pickle.Pickler) -> Packer:
        """Pickle ``obj`` into this part, with ``pickler`` (by default plain pickle; see
        ``_byvalue`` for the one that sends by value what a worker cannot import)."""
        try:
            if self.segments.prefix is None:
                pickler(self, PROTOCOL).dump(obj)
            else:
                pickler(self, PROTOCOL, buffer_callback=self._buffer).dump(obj)
            if self._token:  # a longer message was in it before: give back what is past this one
                with contextlib.suppress(OSError):  # only memory kept longer if it fails
                    os.ftruncate(self._stream_fd, self._stream_end)
        except BaseException:
            self.release()
            raise
        finally:
            if self._stream_fd >= 0:
                os.close(self._stream_fd)
                self._stream_fd = -1
        if self._stream is not None and not self.holes:  # taken, but nothing went into it
            self._drop_stream()
        return self

    def release(self) -> None:
        """Give back the segments of a part that will not be sent."""
        self._drop_stream()
        unlink_all(self.names)

    def _drop_stream(self) -> None:
        if self._stream is None:
            return
        if self._token:  # a spare: free it for the next message
            with contextlib.suppress(OSError):
                free(self._stream)
        else:
            unlink(self._stream)
            self.names.remove(self._stream)
        self._stream = None
        self._token = 0
        self.holes = []

    @property
    def sent(self) -> list[tuple[str, int]]:
        """Each segment this part names, with its token (0 where it has none)."""
        stream = [(self._stream, self._token)] if self._stream and self._token else []
        return stream + [(name, 0) for name in self.names]

    @property
    def layout(self) -> Layout | None:
        if not self.holes and not self.oob:
            return None
        return (self._stream if self.holes else None, self._token, self.holes, self.oob)

    @property
    def total(self) -> int:
        return self.size + sum(n for _, n in self.holes) + sum(n for _, n, _ in self.oob)

    def write(self, data: Any) -> int:
        view = _bytes_of(data)
        n = view.nbytes
        if n >= THRESHOLD and self.segments.prefix is not None and self._hole(view):
            return n
        self.chunks.append(data if isinstance(data, bytes) else view)
        self.size += n
        return n

    def _hole(self, view: memoryview) -> bool:
        try:
            if self._stream_fd < 0:
                self._stream, self._stream_fd, self._token = self.segments.stream()
                if not self._token:
                    self.names.append(self._stream)
            _write_all(self._stream_fd, view, self._stream_end)
        except OSError as exc:  # the tmpfs is full, or /dev/shm went away: keep it in the pipe
            if self._stream_fd >= 0:
                with contextlib.suppress(OSError):  # give back what was written of it
                    os.ftruncate(self._stream_fd, self._stream_end)
                self.segments.shed(keep=self._stream)
            _say_full(exc, view.nbytes)
            return False
        self.holes.append((self.size, view.nbytes))
        self._stream_end += view.nbytes
        return True

    def _buffer(self, buf: pickle.PickleBuffer) -> bool:
        """pickle's buffer_callback: False sends the buffer out of band."""
        try:
            view = buf.raw()
        except BufferError:  # not contiguous: in band
            return True
        if view.nbytes < THRESHOLD:
            return True
        try:
            name, fd = self.segments.create()
        except OSError as exc:
            _say_full(exc, view.nbytes)
            return True
        self.names.append(name)
        try:
            _write_all(fd, view, 0)
        except OSError as exc:
            unlink(name)
            _say_full(exc, view.nbytes)
            return True
        finally:
            os.close(fd)
        self.oob.append((name, view.nbytes, view.readonly))
        return False


_said_full = False


def _say_full(exc: OSError, nbytes: int) -> None:
    """Once per process: the tmpfs is full, so large payloads take the slow way. Containers
    often get a small one (Docker: 64 MB)."""
    global _said_full
    if _said_full or exc.errno != errno.ENOSPC:
        return
    _said_full = True
    try:
        fs = os.statvfs(SHM_DIR)
        room = f"{fs.f_bavail * fs.f_frsize >> 20} of its {fs.f_blocks * fs.f_frsize >> 20} MiB"
    except OSError:
        room = "its space"
    message = (
        f"cleanbreak: {SHM_DIR} has no room for a {nbytes >> 20} MiB buffer ({room} free), "
        "so large payloads go through a pipe, which is slower; give it more room (in Docker: "
        "--shm-size=2g)"
    )
    with contextlib.suppress(Exception):  # -W error must not fail the payload: it still goes
        warnings.warn(message, RuntimeWarning, stacklevel=2)


def load(data: memoryview, layout: Layout | None) -> Any:
    """Unpickle a part: its pipe bytes, and the segments its layout names."""
    if layout is None:
        return pickle.loads(data)
    stream, token, holes, oob = layout
    names = ([stream] if stream else []) + [name for name, _, _ in oob]
    # Open every segment and unlink it (free a spare) first: whatever fails next, none is
    # left behind.
    fds: list[int] = []
    try:
        try:
            for name in names:
                fds.append(_open(name, os.O_RDONLY))
        finally:
            unlink_all(names[1:] if stream and token else names)
        first = 1 if stream else 0
        if stream and token and _header(fds[0]) != _token_bytes(token):
            token = 0  # not this message's any more: leave it to whoever holds it now
            raise pickle.UnpicklingError(f"shared-memory segment {stream} holds another message")
        buffers = [_map(fd, n, ro) for fd, (_, n, ro) in zip(fds[first:], oob, strict=True)]
        if not stream:
            return pickle.loads(data, buffers=buffers)
        return pickle.Unpickler(_Stream(data, holes, fds[0]), buffers=buffers).load()
    finally:
        for fd in fds:
            os.close(fd)
        if stream and token:  # read, or unreadable: its sender may write the next message in it
            with contextlib.suppress(OSError):
                free(stream)


def largest(layout: Layout | None) -> int:
    """The size of the largest payload a part's layout names (0 for none)."""
    if layout is None:
        return 0
    _stream, _token, holes, oob = layout
    return max([n for _, n in holes] + [n for _, n, _ in oob], default=0)


def free(name: str) -> None:
    """Mark a spare stream segment free: its message was read. A spare that holds more than
    ``SPARE_MAX`` gives its pages back first."""
    fd = _open(name, os.O_WRONLY)
    try:
        if os.fstat(fd).st_size > HEADER + SPARE_MAX:
            os.ftruncate(fd, HEADER)
        _write_all(fd, memoryview(_FREE), 0)
    finally:
        os.close(fd)


def discard(layout: Layout | None) -> None:
    """Remove the segments of a part that will not be loaded (a spare is only freed)."""
    if layout is not None:
        stream, token, _, oob = layout
        unlink_all([name for name, _, _ in oob])
        if stream and token:
            with contextlib.suppress(OSError):
                free(stream)
        elif stream:
            unlink(stream)


def _map(fd: int, length: int, readonly: bool) -> mmap.mmap:
    """The segment's pages, mapped without a copy. Private: a write (to a writable array)
    copies the page it touches, so the object behaves as memory of this process alone, also
    in a child forked later."""
    prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
    return mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE, prot=prot)


_HUGE_PAGE: Final = 2 << 20
# A large copy is timed, and huge pages chosen or not, for this many bytes at a time.
_SLICE: Final = 4 * _HUGE_PAGE
_madvise: Any = None
# A copy of 2 * PART bytes or more is shared out between threads, at least PART bytes each:
# the caller's and up to HELPERS helpers (one fewer than the CPUs).
PART: Final = _SLICE
HELPERS = 3
_helpers_of: tuple[int, _Helpers | None] = (0, None)  # (pid, its helpers)


class _Advice:
    """Whether to ask for huge pages for the next slice of a large copy, from how fast earlier
    slices ran.

    Into memory the kernel has at hand, a huge page is three times cheaper to fill than 512
    small ones (9 against 28 ms for 50 MB here). On a virtual machine whose host takes back
    the memory its guest frees (virtio-balloon free page reporting, in 2 MiB blocks), a huge
    page is one of those blocks, and filling it costs a host fault per page: 110 ms against
    50 for small pages. So each slice of a copy is timed; the next one takes the way that was
    cheaper the last time each was tried, and every ``EXPLORE``-th one the other way, since
    which is cheaper changes as memory is freed and taken back, even within one copy.
    """

    EXPLORE: Final = 16

    __slots__ = ("_cost", "_count")

    def __init__(self) -> None:
        self._cost = {True: 0.0, False: 0.0}  # ns per byte of the latest slice each way; 0: none
        self._count = 0

    def choose(self) -> bool:
        self._count += 1
        huge = self._cost[True] <= self._cost[False]
        return huge != (self._count % self.EXPLORE == 0)

    def record(self, huge: bool, ns: int, nbytes: int) -> None:
        if nbytes > 0:
            self._cost[huge] = ns / nbytes


_ADVICE: Final = _Advice()


def _madvise_huge() -> Any:
    """``(ctypes, madvise)`` with ``madvise(address, length)`` asking for transparent huge
    pages (as numpy does for its large arrays): filling such memory then takes one page fault
    per 2 MiB instead of one per 4 KiB. ``None`` where that cannot be asked (not Linux)."""
    global _madvise
    if _madvise is None:
        try:
            import ctypes

            advice = mmap.MADV_HUGEPAGE  # Linux only
            fn = ctypes.CDLL(None, use_errno=True).madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            _madvise = (ctypes, lambda address, length: fn(address, length, advice))
        except (ImportError, AttributeError, OSError):
            _madvise = False
    return _madvise or None


class _Job:
    """One part of a copy, for a helper thread; ``done`` is set once it ran, whatever happened."""

    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[], tuple[int, bool]]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result = (0, False)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()


class _Helpers:
    """Threads that copy parts of large reads. All are started here, so that handing one a job
    cannot fail later (``ThreadPoolExecutor`` starts its threads as jobs come, after it has
    queued the job: a thread that then fails to start leaves the job queued, to run after its
    caller gave up on it)."""

    def __init__(self, n: int) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        for k in range(n):
            name = f"cleanbreak-copy-{k}"
            start_quiet_thread(self._serve, name)
        self.count = n

    def _serve(self) -> None:
        while True:
            self._jobs.get().run()

    def submit(self, fn: Callable[[], tuple[int, bool]]) -> _Job:
        job = _Job(fn)
        self._jobs.put(job)
        return job

    @staticmethod
    def wait(jobs: Sequence[_Job]) -> None:
        """Return once every job ran, even if a signal handler raises meanwhile (in a worker's
        main thread): until then a helper may write into memory its caller would free. What
        the handler raised is raised after."""
        raised: BaseException | None = None
        for job in jobs:
            while not job.done.is_set():
                try:
                    job.done.wait()
                except BaseException as exc:
                    raised = raised or exc
        if raised is not None:
            raise raised


def _helpers() -> _Helpers | None:
    """This process's helper threads: one fewer than the CPUs it may use, at most ``HELPERS``;
    ``None`` on one CPU, or where threads cannot be started. Made again in a forked child,
    which has none of its parent's threads."""
    global _helpers_of
    pid, helpers = _helpers_of
    if pid != os.getpid():
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            cpus = os.cpu_count() or 1
        n = min(HELPERS, cpus - 1)
        helpers = None
        if n > 0:
            with contextlib.suppress(RuntimeError):  # can't start a thread: the caller copies
                helpers = _Helpers(n)
        _helpers_of = (os.getpid(), helpers)
    return helpers


def _copy(fd: int, dest: memoryview, offset: int) -> int:
    """Read from a segment into fresh memory. Returns the bytes read: fewer than asked only at
    the segment's end.

    Page faults are most of the cost of this copy (fresh memory, several per 4 KiB page on a
    virtual machine), and a core takes them only so fast. So a copy of ``2 * PART`` bytes or
    more is cut into parts of at least ``PART`` bytes, one per thread, this one and helpers,
    which take their faults at once: ``os.preadv`` lets go of the GIL. Each part is read in
    slices of ``_SLICE`` bytes that start on a huge-page boundary of ``dest``, each with huge
    pages or not, as ``_Advice`` says: which way is cheaper can change within one copy, so
    each slice is timed.
    """
    libc = _madvise_huge() if dest.nbytes >= 2 * _HUGE_PAGE else None
    if libc is None:
        return os.preadv(fd, [dest], offset)
    ctypes, madvise = libc
    address = ctypes.addressof(ctypes.c_char.from_buffer(dest))
    lead = -address % _HUGE_PAGE  # the first slice ends on the first huge-page boundary
    cuts = sorted({0, *range(lead, dest.nbytes, _SLICE), dest.nbytes})
    slices = list(itertools.pairwise(cuts))
    helpers = _helpers() if dest.nbytes >= 2 * PART else None
    n = 1 if helpers is None else min(helpers.count + 1, dest.nbytes // PART)
    parts = [slices[k * len(slices) // n : (k + 1) * len(slices) // n] for k in range(n)]

    def run(part: list[tuple[int, int]]) -> tuple[int, bool]:
        """Copy the slices of one part: (bytes read, all of them?)."""
        got = 0
        for begin, end in part:
            piece = dest[begin:end]
            whole = piece.nbytes & -_HUGE_PAGE  # the huge pages in it (none in the lead)
            if whole:
                huge = _ADVICE.choose()
                if huge:
                    madvise(address + begin, whole)  # advice only: a failure changes nothing
                start = time.thread_time_ns()  # CPU time: a wait for a core is not the memory's
                k = os.preadv(fd, [piece], offset + begin)
                _ADVICE.record(huge, time.thread_time_ns() - start, k)
            else:
                k = os.preadv(fd, [piece], offset + begin)
            got += k
            if k < piece.nbytes:
                return got, False
        return got, True

    jobs = [] if helpers is None else [helpers.submit(functools.partial(run, p)) for p in parts[1:]]
    try:
        done = [run(parts[0])]
    finally:
        _Helpers.wait(jobs)
    for job in jobs:
        if job.error is not None:
            raise job.error
        done.append(job.result)
    total = 0
    for got, whole in done:  # in order: what follows a short part is not contiguous with it
        total += got
        if not whole:
            break
    return total


class _Stream:
    """The pickle stream of a part, for ``pickle.Unpickler``: the pipe bytes, with each hole
    read from the stream segment when the unpickler reaches it."""

    __slots__ = ("_data", "_fd", "_file_pos", "_hole_left", "_holes", "_pos")

    def __init__(self, data: memoryview, holes: list[tuple[int, int]], fd: int) -> None:
        self._data = data
        self._pos = 0  # in data
        self._holes = deque(holes)
        self._hole_left = 0  # bytes of the current hole not read yet
        self._file_pos = HEADER
        self._fd = fd

    def _span(self, n: int) -> tuple[bool, int]:
        """Where the next read comes from (the segment?), and how much of it is contiguous."""
        if not self._hole_left and self._holes and self._holes[0][0] == self._pos:
            self._hole_left = self._holes.popleft()[1]
        if self._hole_left:
            return True, min(n, self._hole_left)
        end = self._holes[0][0] if self._holes else len(self._data)
        return False, min(n, end - self._pos)

    def _from_file(self, n: int) -> None:
        self._file_pos += n
        self._hole_left -= n
        if n == 0:
            raise pickle.UnpicklingError("a shared-memory segment was cut short")

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        got = 0
        while got < len(view):
            from_file, k = self._span(len(view) - got)
            if k <= 0:
                break
            if from_file:
                k = _copy(self._fd, view[got : got + k], self._file_pos)
                self._from_file(k)
            else:
                view[got : got + k] = self._data[self._pos : self._pos + k]
                self._pos += k
            got += k
        return got

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = len(self._data) + self._hole_left + sum(k for _, k in self._holes)
        pieces: list[bytes] = []
        while n > 0:
            from_file, k = self._span(n)
            if k <= 0:
                break
            if from_file:
                piece = os.pread(self._fd, k, self._file_pos)
                self._from_file(len(piece))
            else:
                piece = bytes(self._data[self._pos : self._pos + k])
                self._pos += k
            pieces.append(piece)
            n -= len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def readline(self) -> bytes:
        from_file, k = self._span(len(self._data))
        if from_file:  # pragma: no cover - protocol 5 writes no line inside a payload
            return self.read(k)
        end = bytes(self._data[self._pos : self._pos + k]).find(b"\n")
        return self.read(k if end < 0 else end + 1)
