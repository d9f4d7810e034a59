"""The journal: each task's outcome on disk, so that the same job run again skips what is done.

A journal is one SQLite file (the standard library's ``sqlite3``: embedded, no server) that
belongs to one function. Each row is one task's outcome, under the task's *key*: a digest of
the function's qualified name and of its arguments (or of what the user's ``key=`` returns
for them), computed by ``stable_digest`` so that it is the same in every process and on every
machine (Python's ``hash()`` is salted per process, so it will not do).

Writes go through one writer thread of the journal's own, in WAL mode, by group commit: as
soon as the writer is free it commits, in one transaction, every outcome queued meanwhile.
The pool's manager thread only pickles each outcome and queues it (a pickle taken at once, so
that a caller who changes a result it was given cannot change what was recorded). ``close()``
commits what is queued. A process killed with SIGKILL loses only what had reached the parent in
the last few milliseconds (the commit under way and what queued behind it): SQLite's WAL never
leaves a half-written transaction behind.

A result whose pickle passes ``BIG_VALUE`` bytes is not put in SQLite's B-tree (where it would
be written twice, to the WAL and then into the file, in overflow pages): the writer writes it
to a file of its own in the folder beside the journal (``PATH.d``, mode 0700), under a
temporary name, renames it into place, and then commits a row that names it. A SIGKILL between
the two leaves a file no row names, which the next open removes; a row never names a file
that is not complete. A pool's workers write such results there themselves (see
``_worker``), under temporary names of their own, before they send them: the parent then only
renames each file into place and queues its row. A worker killed in the middle of a write
leaves a temporary file, which the journal removes when it closes (every worker is gone by
then) or opens.

The file is created with mode 0600, since it holds pickles, and is opened only when it belongs
to the user running the process: unpickling runs code, so a journal from someone else must
never be opened. A running job holds an ``flock`` on the file; a second job on the same journal
gets ``JournalError`` rather than a corrupt mix.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import os
import pickle
import stat
import struct
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _signals
from ._errors import (
    BrokenPool,
    JournalError,
    RemoteTraceback,
    SerializationError,
    TaskTimeout,
    WorkerDied,
)
from ._units import Sink, Unit

if TYPE_CHECKING:
    import sqlite3

# sqlite3 is imported where it is used, not with the package: a pool without a journal (and
# every worker, which imports the package) does not pay for it.

__all__ = ["Journal", "JournalError", "JournalStatus"]

FORMAT = "cleanbreak-journal"
VERSION = "1"
# The manager thread waits (the pool slows down) while this much is queued and not yet written:
# results arriving faster than the disk takes them must not fill the memory.
MAX_QUEUED_BYTES = 256 << 20
# ... and while this many rows are: the writer takes about 100,000 small rows a second, and
# tiny tasks can come faster than that. So a SIGKILL loses at most this many, and the memory
# the queue holds stays small.
MAX_QUEUED_ROWS = 2000
LOOKUP_BATCH = 500
# A result whose pickle is this large or larger goes to a file beside the journal (see above).
BIG_VALUE = 1 << 20
_IN_FILE = b"cleanbreak-file:"  # a row's value that names such a file (no pickle starts so)
_FILE_SUFFIX = ".pickle"
CHECKPOINT_SECONDS = 1.0  # how often the writer copies the WAL into the file
# A task's outcome replaces a recorded failure (the task ran again), never a recorded result:
# when the same task runs twice in one run and fails once, its result is what counts.
_UPSERT = (
    "INSERT INTO outcomes VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
    "ok = excluded.ok, value = excluded.value, error_type = excluded.error_type, "
    "error_message = excluded.error_message, traceback = excluded.traceback, "
    "finished = excluded.finished WHERE outcomes.ok = 0"
)

# The failures that are a task's own outcome, and are recorded. Others (BrokenPool, a manager
# failure) are the pool's: the task never ran, so it runs again next time.
_TASK_FAILURES = (WorkerDied, TaskTimeout, SerializationError)


@dataclass(frozen=True)
class JournalStatus:
    """What ``Journal.status`` reads from a journal, without unpickling anything."""

    path: str
    function: str | None
    done: int
    failed: int
    total: int | None
    running_pid: int | None  # the pid of the job writing to it now, if one is
    failures: list[tuple[str, str, str]]  # (type, message, traceback), oldest first


# ── stable keys ──────────────────────────────────────────────────────────────────────────────


def _feed(h: Any, obj: object) -> None:
    """Feed ``obj`` to the hash ``h`` in a form that is the same in every process.

    Exact built-in types are encoded by value, with a tag per type (so ``1``, ``1.0``, ``True``
    and ``"1"`` differ, as do a tuple and a list); dict and set items are sorted by their own
    encoding, so their order (which for strings depends on the per-process hash salt) does not
    matter. Anything else is keyed by its pickle, which is deterministic for most types; pass
    ``key=`` for the rest.
    """
    t = type(obj)
    if type(obj) is str:
        b = obj.encode("utf-8", "surrogatepass")
        h.update(b"s%d:" % len(b))
        h.update(b)
    elif type(obj) is int:
        h.update(b"i%d;" % obj)
    elif obj is None:
        h.update(b"n")
    elif type(obj) is bool:
        h.update(b"T" if obj else b"F")
    elif type(obj) is float:
        h.update(b"f" + struct.pack("!d", obj))
    elif type(obj) is bytes or type(obj) is bytearray:
        h.update(b"b%d:" % len(obj))
        h.update(obj)
    elif type(obj) is tuple or type(obj) is list:
        h.update((b"(%d:" if t is tuple else b"[%d:") % len(obj))
        for item in obj:
            _feed(h, item)
    elif type(obj) is dict:
        h.update(b"{%d:" % len(obj))
        for part in sorted(_digest(k) + _digest(v) for k, v in obj.items()):
            h.update(part)
    elif type(obj) is set or type(obj) is frozenset:
        h.update(b"<%d:" % len(obj))
        for part in sorted(_digest(item) for item in obj):
            h.update(part)
    else:
        try:
            b = pickle.dumps(obj, protocol=5)
        except Exception as exc:
            raise TypeError(
                f"cannot make a journal key from {t.__name__} {obj!r:.60}: it does not pickle "
                f"({exc}); pass key= to name each task"
            ) from None
        h.update(b"p%d:" % len(b))
        h.update(b)


def _digest(obj: object) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    _feed(h, obj)
    return h.digest()


def stable_digest(obj: object) -> bytes:
    """A 16-byte digest of ``obj`` that is the same in every process and on every machine."""
    return _digest(obj)


def function_name(fn: Callable[..., Any]) -> str:
    """``module:qualname`` of the function a task runs; a partial counts as its function."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    func = getattr(fn, "__func__", fn)  # a bound method: its function
    module = getattr(func, "__module__", None) or type(func).__module__
    qualname = getattr(func, "__qualname__", None) or type(func).__qualname__
    return f"{module}:{qualname}"


class Keyer:
    """Makes the keys of one function's tasks: ``item(x)`` for ``map`` (``x`` a tuple of the
    items when there are several iterables), ``call(args, kwargs)`` for ``submit``. With
    ``key``, a ``map`` task's key is made from what ``key`` returns for its arguments."""

    def __init__(self, fn: Callable[..., Any], key: Callable[..., Any] | None, star: bool) -> None:
        self.name = function_name(fn)
        base = hashlib.blake2b(digest_size=16)
        _feed(base, self.name)
        partial_args: list[object] = []
        while isinstance(fn, functools.partial):
            partial_args.append((fn.args, fn.keywords))
            fn = fn.func
        _feed(base, partial_args)  # a partial's bound arguments are part of every task's key
        self._base = base
        self._key = key
        self._star = star

    def item(self, item: Any) -> bytes:
        """The key of a ``map`` task: that of the call ``fn(item)`` (``fn(*item)`` with
        several iterables), so ``submit(fn, x)`` and ``map(fn, [x])`` share it."""
        if self._key is None:
            return self.call(tuple(item) if self._star else (item,), {})
        h = self._base.copy()
        h.update(b"K")
        _feed(h, self._key(*item) if self._star else self._key(item))
        return h.digest()

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        h = self._base.copy()
        _feed(h, args)
        _feed(h, kwargs)
        return h.digest()


# ── the journal ──────────────────────────────────────────────────────────────────────────────

_open_journals: weakref.WeakSet[Journal] = weakref.WeakSet()


def _schema(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS outcomes (key BLOB PRIMARY KEY, ok INTEGER NOT NULL, "
        "value BLOB, error_type TEXT, error_message TEXT, traceback TEXT, finished REAL NOT NULL)"
    )


class Journal:
    """An on-disk record of each task's outcome, for ``Pool(journal=...)`` and
    ``cleanbreak.map(..., journal=...)``.

    Pass a path (``journal="run.sqlite"``) or a ``Journal`` for its options. ``fresh=True``
    forgets what the journal holds and starts over. By default a task that failed in an earlier
    run runs again; ``skip_failed=True`` gives its recorded failure instead.

    A journal holds pickles, so it is created with mode 0600, and one that belongs to another
    user is refused: never open a journal you did not make, since unpickling runs code.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, fresh: bool = False, skip_failed: bool = False
    ) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"journal must be a path or a cleanbreak.Journal, got {path!r}")
        for name, value in (("fresh", fresh), ("skip_failed", skip_failed)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        self.path = os.path.abspath(os.fspath(path))
        self.fresh = fresh
        self.skip_failed = skip_failed
        self.function: str | None = None
        self._fd = -1
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[tuple[Any, ...]] = []
        # Rows queued or being written: a lookup sees them before they are committed.
        self._unwritten: dict[bytes, tuple[Any, ...]] = {}
        self._queued_bytes = 0
        self._queued = 0  # rows ever queued
        self._written = 0  # rows ever committed (or dropped after a write error)
        self._stopping = False
        self._writer: threading.Thread | None = None
        self._closer: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._checkpoints_done = threading.Event()
        self._error: BaseException | None = None
        self._warned = False
        self._spill: str | None = None  # the folder, once made and checked for the workers
        self.reused = 0  # results given from the journal, not run again

    def __repr__(self) -> str:
        return f"<cleanbreak.Journal {self.path!r}>"

    @staticmethod
    def of(journal: Journal | str | os.PathLike[str] | None) -> Journal | None:
        if journal is None or isinstance(journal, Journal):
            return journal
        return Journal(journal)

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    # ── opening ──────────────────────────────────────────────────────────────────────────

    def open(self, meta: dict[str, str] | None = None) -> None:
        """Lock the file, create it (0600) or check it, and start the writer thread."""
        import sqlite3

        for other in [self, *_open_journals]:
            closer = other._closer  # a quick close still releasing the file: wait for it
            if other.path == self.path and closer is not None and closer.is_alive():
                closer.join()
        if self.is_open or any(j.path == self.path for j in list(_open_journals)):
            raise JournalError(
                f"journal {self.path} is in use by another pool of this process: close that "
                "pool first, or pass another journal path"
            )
        self._fd = _open_locked(self.path)
        try:
            if self.fresh:
                os.ftruncate(self._fd, 0)
                for suffix in ("-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path + suffix)
            self._reader = _connect(self.path)
            with self._reader:
                _schema(self._reader)
                found = dict(self._reader.execute("SELECT name, value FROM meta"))
                if found and found.get("format") != FORMAT:
                    raise JournalError(
                        f"{self.path} is an SQLite file but not a cleanbreak journal: pass "
                        "another journal path"
                    )
                if found.get("version", VERSION) != VERSION:
                    raise JournalError(
                        f"journal {self.path} was written by a newer cleanbreak (format "
                        f"{found['version']}): upgrade cleanbreak, or pass another journal path"
                    )
                rows = {"format": FORMAT, "version": VERSION, "pid": str(os.getpid())}
                if not found:
                    rows["created"] = str(time.time())
                rows.update(meta or {})
                self._reader.executemany(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)", list(rows.items())
                )
            self.function = found.get("function")
            self._tidy_folder()
        except sqlite3.DatabaseError as exc:
            self._release()
            raise JournalError(
                f"cannot use {self.path} as a journal ({exc}): pass another journal path"
            ) from None
        except BaseException:
            self._release()
            raise
        self._stopping = False
        self._error = None
        self._writer = _signals.start_quiet_thread(self._write_loop, "cleanbreak-journal")
        self._checkpoints_done.clear()
        self._checkpointer = _signals.start_quiet_thread(self._checkpoint_loop, "cleanbreak-wal")
        _open_journals.add(self)

    @property
    def folder(self) -> str:
        """Where results of ``BIG_VALUE`` bytes or more are kept, one file each."""
        return self.path + ".d"

    def spill_folder(self) -> str | None:
        """The folder, made if need be and checked, for workers to write large results to;
        None where it cannot be used (the parent then writes them, or says why)."""
        if self._spill is None and self._error is None:
            try:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(self.folder, 0o700)
                _check_folder(self.folder)
            except (OSError, JournalError):
                return None
            self._spill = self.folder
        return self._spill

    def record_spilled(self, key: bytes, name: str) -> bool:
        """Record a result that a worker wrote to ``name`` in the folder: rename the file into
        place and queue the row that names it. False (and the file is gone) if it could not."""
        if os.sep in name or not name.startswith(".w"):
            return False
        final = key.hex() + _FILE_SUFFIX
        try:
            os.replace(os.path.join(self.folder, name), os.path.join(self.folder, final))
        except OSError:
            self.drop_spilled(name)
            return False
        self._put((key, 1, _IN_FILE + final.encode(), None, None, None, time.time()))
        return True

    def drop_spilled(self, name: str) -> None:
        """Remove a file a worker wrote for a result that is not recorded."""
        if os.sep not in name and name.startswith(".w"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.folder, name))

    def _tidy_spilled(self) -> None:
        """At close (every worker is gone): remove what workers left half-written, and the
        folder if it holds nothing."""
        spill, self._spill = self._spill, None
        if spill is None:
            return
        with contextlib.suppress(OSError):
            for name in os.listdir(spill):
                if name.startswith(".w") and name.endswith(".tmp"):
                    self.drop_spilled(name)
            os.rmdir(spill)  # fails if it holds anything: what it holds is kept

    def _tidy_folder(self) -> None:
        """Remove what no row names: every file after ``fresh``; otherwise the files a SIGKILL
        left between their rename and their row's commit, and temporary files."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise JournalError(f"cannot read {self.folder}: {exc.strerror}") from None
        _check_folder(self.folder)
        assert self._reader is not None
        for name in names:
            keep = False
            if not self.fresh and name.endswith(_FILE_SUFFIX):
                with contextlib.suppress(ValueError):
                    key = bytes.fromhex(name.removesuffix(_FILE_SUFFIX))
                    row = self._reader.execute(
                        "SELECT value FROM outcomes WHERE key = ?", (key,)
                    ).fetchone()
                    keep = row is not None and row[0] == _IN_FILE + name.encode()
            if not keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.folder, name))

    def _store(self, key: bytes, blob: bytes) -> bytes | None:
        """Write a large pickle to its own file (see the module's docstring); what the row
        holds in its place, or None if the file could not be written (the row then holds the
        pickle itself)."""
        name = key.hex() + _FILE_SUFFIX
        final = os.path.join(self.folder, name)
        tmp = os.path.join(self.folder, f".{name}.tmp")
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.folder, 0o700)
            _check_folder(self.folder)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except (OSError, JournalError):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return None
        return _IN_FILE + name.encode()

    def bind(self, name: str) -> None:
        """Check that the journal is ``name``'s, or make it so if it is new."""
        if self.function == name:
            return
        if self.function is not None:
            raise JournalError(
                f"journal {self.path} holds the results of {self.function}, not {name}: give "
                "each function its own journal, or start over with fresh=True (--fresh)"
            )
        with self._read_lock:
            assert self._reader is not None
            with self._reader:
                self._reader.execute("INSERT OR REPLACE INTO meta VALUES ('function', ?)", (name,))
        self.function = name

    def set_meta(self, name: str, value: str) -> None:
        with self._read_lock:
            assert self._reader is not None
            with self._reader:
                self._reader.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    # ── reading ──────────────────────────────────────────────────────────────────────────

    def counts(self) -> tuple[int, int]:
        """How many results and failures the journal has committed."""
        with self._read_lock:
            assert self._reader is not None
            found = dict(self._reader.execute("SELECT ok, count(*) FROM outcomes GROUP BY ok"))
        return found.get(1, 0), found.get(0, 0)

    def lookup(self, keys: Sequence[bytes]) -> dict[bytes, tuple[Any, BaseException | None]]:
        """The recorded outcomes of these keys: ``(value, None)`` for a result, ``(None, exc)``
        for a failure (only with ``skip_failed``). A result that no longer unpickles (its
        class was renamed, say) counts as missing, and runs again."""
        found: dict[bytes, tuple[Any, BaseException | None]] = {}
        where = "" if self.skip_failed else " AND ok = 1"
        if self._unwritten:
            with self._cond:
                recent = [self._unwritten.get(key) for key in keys]
            for row in recent:
                if row is not None and (row[1] or self.skip_failed):
                    outcome = _load(row[1], row[2], row[3], row[4], row[5], self.path)
                    if outcome is not None:
                        found[row[0]] = outcome
            keys = [key for key in keys if key not in found]
        with self._read_lock:
            assert self._reader is not None
            for begin in range(0, len(keys), LOOKUP_BATCH):
                part = keys[begin : begin + LOOKUP_BATCH]
                marks = ",".join("?" * len(part))
                rows = self._reader.execute(
                    "SELECT key, ok, value, error_type, error_message, traceback FROM outcomes "
                    f"WHERE key IN ({marks}){where}",
                    part,
                )
                # Row by row: one pickle at a time beside the values made from the others.
                for key, ok, blob, etype, message, tb in rows:
                    outcome = _load(ok, blob, etype, message, tb, self.path)
                    if outcome is not None:
                        found[key] = outcome
        self.reused += len(found)
        return found

    # ── writing (called by the pool's manager thread) ────────────────────────────────────

    def record(self, key: bytes, value: Any) -> None:
        try:
            blob = pickle.dumps(value, protocol=5)
        except BaseException as exc:
            self._warn(f"a result was not journaled: it does not pickle ({exc!r})")
            return
        self._put((key, 1, blob, None, None, None, time.time()))

    def record_failure(self, key: bytes, exc: BaseException) -> bool:
        """Record a task's failure; False if it is the pool's failure, not the task's."""
        if isinstance(exc, BrokenPool) or not _is_task_failure(exc):
            return False
        etype, message, tb = describe_failure(exc)
        try:
            blob: bytes | None = pickle.dumps(exc, protocol=5)
        except BaseException:
            blob = None
        self._put((key, 0, blob, etype, message, tb, time.time()))
        return True

    def _put(self, row: tuple[Any, ...]) -> None:
        size = len(row[2] or b"") + 64
        with self._cond:
            while (
                (
                    self._queued_bytes > MAX_QUEUED_BYTES
                    or self._queued - self._written >= MAX_QUEUED_ROWS
                )
                and self._error is None
                and self._writer is not None
                and self._writer.is_alive()
            ):
                self._cond.wait(_signals.CHECK_EVERY)
            self._queue.append(row)
            self._unwritten[row[0]] = row
            self._queued_bytes += size
            self._queued += 1
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every outcome recorded so far is committed. False on timeout."""
        with self._cond:
            target = self._queued
            for part in _signals.sliced(timeout):
                if self._written >= target or self._writer is None or not self._writer.is_alive():
                    return True
                self._cond.wait(part)
            return self._written >= target

    def close(self, *, quick: bool = False) -> None:
        """Commit what is queued, stop the writer, and release the lock. Safe to call twice,
        and from two threads at once.

        With ``quick`` (on Ctrl-C), it returns once everything is committed, and a thread
        closes the file: closing the last connection copies the WAL into the file and syncs
        it to disk, which can take a tenth of a second. That copy is crash-safe, so the
        process may exit in the middle of it.
        """
        with self._close_lock:
            writer = self._writer
            if writer is not None:
                with self._cond:
                    self._stopping = True
                    self._cond.notify_all()
                while writer.is_alive():
                    writer.join(_signals.CHECK_EVERY)
                self._writer = None
            if quick and self._fd >= 0:
                self._closer = _signals.start_quiet_thread(self._release, "cleanbreak-journal")
                return
        self._release()

    def _release(self) -> None:
        with self._close_lock:
            self._let_go()
            _open_journals.discard(self)

    def _checkpoint_loop(self) -> None:
        """Copy the WAL into the file (and sync it) once a second, on a connection of its
        own, so that the WAL does not grow for ever. PASSIVE: it holds up neither the writer
        nor the readers, and a stop's last commit never waits for its sync."""
        import sqlite3

        try:
            conn = _connect(self.path)
        except sqlite3.Error:
            return
        try:
            while not self._checkpoints_done.wait(CHECKPOINT_SECONDS):
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _let_go(self) -> None:
        import sqlite3

        self._tidy_spilled()
        checkpointer = self._checkpointer
        if checkpointer is not None:  # its connection closes before the last one
            self._checkpoints_done.set()
            checkpointer.join()
            self._checkpointer = None
        if self._reader is not None:
            with self._read_lock:
                with contextlib.suppress(sqlite3.Error):
                    self._reader.close()
                self._reader = None
        if self._fd >= 0:
            os.close(self._fd)  # releases the flock
            self._fd = -1

    def _write_loop(self) -> None:
        """Group commit: whenever the writer is free, it commits everything queued, in one
        transaction. One result alone when results come slowly (on disk a few milliseconds
        after it reached the parent), large batches when they come fast."""
        import sqlite3

        conn: sqlite3.Connection | None = None
        try:
            conn = _connect(self.path)
        except sqlite3.Error as exc:
            self._fail(exc)
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                batch, self._queue = self._queue, []
                if not batch:  # stopping, and nothing is left
                    break
            if conn is not None and self._error is None:
                self._commit(conn, batch)
            with self._cond:
                for row in batch:
                    if self._unwritten.get(row[0]) is row:
                        del self._unwritten[row[0]]
                self._written += len(batch)
                self._queued_bytes -= sum(len(row[2] or b"") + 64 for row in batch)
                self._cond.notify_all()
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[tuple[Any, ...]]) -> None:
        import sqlite3

        if any(row[1] and len(row[2]) >= BIG_VALUE for row in batch):
            batch = [self._out_of_tree(row) for row in batch]

        try:
            with conn:
                conn.executemany(_UPSERT, batch)
            return
        except sqlite3.DataError:  # a value over SQLite's limit (1 GB): all but that one
            pass
        except (sqlite3.Error, OSError, MemoryError) as exc:
            self._fail(exc)
            return
        for row in batch:
            try:
                with conn:
                    conn.execute(_UPSERT, row)
            except sqlite3.DataError as exc:
                self._warn(f"a result was not journaled: {exc} (SQLite takes at most 1 GB)")
            except (sqlite3.Error, OSError, MemoryError) as exc:
                self._fail(exc)
                return

    def _out_of_tree(self, row: tuple[Any, ...]) -> tuple[Any, ...]:
        if not row[1] or len(row[2]) < BIG_VALUE:
            return row
        named = self._store(row[0], row[2])
        return row if named is None else (row[0], 1, named, *row[3:])

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._warn(
            f"the journal {self.path} stopped recording: {exc}; the results still reach you, "
            "but a resumed run will compute the later ones again"
        )

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            with contextlib.suppress(Exception):
                print(f"cleanbreak: warning: {message}", file=sys.stderr, flush=True)

    # ── status ───────────────────────────────────────────────────────────────────────────

    @staticmethod
    def status(path: str | os.PathLike[str]) -> JournalStatus:
        """Read a journal's counts and failures (no pickle is loaded)."""
        import fcntl  # POSIX only, as is the pool
        import sqlite3

        path = os.path.abspath(os.fspath(path))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise JournalError(f"cannot read journal {path}: {exc.strerror}") from None
        try:
            running: int | None = None
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BlockingIOError:
                running = -1
            try:
                conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
                with contextlib.closing(conn):
                    meta = dict(conn.execute("SELECT name, value FROM meta"))
                    if meta.get("format") != FORMAT:
                        raise JournalError(f"{path} is not a cleanbreak journal")
                    counts = dict(conn.execute("SELECT ok, count(*) FROM outcomes GROUP BY ok"))
                    failures = conn.execute(
                        "SELECT error_type, error_message, traceback FROM outcomes WHERE ok = 0 "
                        "ORDER BY finished"
                    ).fetchall()
            except sqlite3.DatabaseError as exc:
                raise JournalError(f"{path} is not a cleanbreak journal ({exc})") from None
            if running is not None:
                running = int(meta.get("pid", "0")) or None
            total = meta.get("total")
            return JournalStatus(
                path=path,
                function=meta.get("function"),
                done=counts.get(1, 0),
                failed=counts.get(0, 0),
                total=int(total) if total is not None else None,
                running_pid=running,
                failures=[(str(a), str(b), str(c)) for a, b, c in failures],
            )
        finally:
            os.close(fd)


def describe_failure(exc: BaseException) -> tuple[str, str, str]:
    """A task's failure as text: its type's qualified name, its message, and its traceback as
    the worker formatted it."""
    kind = type(exc)
    name = kind.__qualname__
    if kind.__module__ != "builtins":
        name = f"{kind.__module__}.{name}"
    try:
        message = str(exc)
    except BaseException:
        message = f"<{name} whose str() failed>"
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        tb = cause.tb.strip().removeprefix('"""').removesuffix('"""').strip("\n") + "\n"
    else:
        tb = "".join(traceback.format_exception_only(exc))
    return name, message, tb


def _is_task_failure(exc: BaseException) -> bool:
    if isinstance(exc, _TASK_FAILURES):
        return True
    # A task's own exception: it came back from the worker with its remote traceback.
    return isinstance(exc.__cause__, RemoteTraceback)


def _open_locked(path: str) -> int:
    import fcntl  # POSIX only, as is the pool

    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise JournalError(
            f"cannot create journal {path}: the folder {folder} does not exist; create it first"
        )
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise JournalError(f"cannot open journal {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise JournalError(
                f"journal {path} belongs to another user (uid {st.st_uid}); a journal holds "
                "pickles, and opening it would run their code: pass a journal path of your own"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _writer_pid(path)
            raise JournalError(
                f"journal {path} is in use by another run{who}: wait for it to finish, or pass "
                "another journal path"
            ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_folder(folder: str) -> None:
    """The folder of large results must be a folder of this user's (not a link): its files
    are pickles."""
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise JournalError(
            f"{folder} is not a folder of yours; it holds a journal's pickles, and reading them "
            "would run their code: remove it, or pass another journal path"
        )


def _writer_pid(path: str) -> str:
    import sqlite3

    with contextlib.suppress(Exception):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        with contextlib.closing(conn):
            row = conn.execute("SELECT value FROM meta WHERE name = 'pid'").fetchone()
            if row:
                return f" (pid {row[0]})"
    return ""


def _connect(path: str) -> sqlite3.Connection:
    import sqlite3

    conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
    try:
        conn.isolation_level = "DEFERRED"  # ``with conn`` commits
        # SQLite's default page of 4 KiB. (Pages of 64 KiB write a 50 MB result a quarter
        # faster, but keys are digests, so a commit of 1,000 small rows dirties up to 1,000
        # pages of the key index: 64 MB each commit with large pages, 4 MB with these.)
        conn.execute("PRAGMA journal_mode=WAL")
        # Keys are digests, so rows land at random places in the index: a cache of 32 MiB keeps
        # much of the index in memory (a third faster than the default 2 MiB for a million rows).
        conn.execute("PRAGMA cache_size=-32768")
        # The writer thread copies the WAL into the file itself, at most once a second and
        # never in the last commit of a stop, which must be quick (see _write_loop).
        conn.execute("PRAGMA wal_autocheckpoint=0")
        # NORMAL in WAL mode: a commit survives the death of this process (SIGKILL, the OOM
        # killer); after a power cut the last commits may be lost, but the file is never corrupt.
        conn.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        conn.close()  # not a database, say: no connection left for the collector to find
        raise
    return conn


def _load(
    ok: int, blob: bytes | None, etype: str, message: str, tb: str, path: str
) -> tuple[Any, BaseException | None] | None:
    if ok:
        try:
            if blob is not None and blob.startswith(_IN_FILE):
                name = blob[len(_IN_FILE) :].decode()
                if os.sep in name or not name.endswith(_FILE_SUFFIX):
                    return None
                with open(os.path.join(path + ".d", name), "rb") as f:
                    return pickle.load(f), None
            return pickle.loads(blob), None  # type: ignore[arg-type]
        except Exception:  # unpickles no more, or its file is gone: it runs again
            return None
    exc: BaseException | None = None
    if blob is not None:
        with contextlib.suppress(Exception):
            exc = pickle.loads(blob)
    if not isinstance(exc, BaseException):
        exc = RuntimeError(f"{etype}: {message}")
    with contextlib.suppress(Exception):
        exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
        exc.add_note(f"recorded by an earlier run in the journal {path} (skip_failed)")
    return None, exc


def close_all() -> None:
    """Commit and close every journal still open (at interpreter exit)."""
    for journal in list(_open_journals):
        with contextlib.suppress(Exception):
            journal.close()


atexit.register(close_all)


class Recorder:
    """A sink in front of another, that records each outcome in the journal before passing
    it on. ``keys`` maps the caller's index of each item sent to run to its key."""

    __slots__ = ("_files", "inner", "journal", "keys", "prefetch", "spill")
    merges = False  # its outcomes are recorded by key, one unit at a time

    def __init__(self, inner: Sink, journal: Journal) -> None:
        self.inner = inner
        self.journal = journal
        self.keys: dict[int, bytes] = {}
        self.prefetch = inner.prefetch
        # The folder the workers write large results to (the backend reads it), and the files
        # they wrote for results not delivered yet, by index.
        self.spill = journal.spill_folder()
        self._files: dict[int, str] = {}

    def spilled(self, start: int, files: dict[int, str]) -> None:
        """Results ``start + k`` that are coming were written by the worker to ``files[k]``."""
        for k, name in files.items():
            self._files[start + k] = name

    def start(self, unit: Unit) -> bool:
        return self.inner.start(unit)

    def deliver(
        self, start: int, values: list[Any], errors: dict[int, BaseException], seconds: float
    ) -> None:
        keys = self.keys
        journal = self.journal
        files = self._files
        for k, value in enumerate(values):
            key = keys.pop(start + k, None)
            name = files.pop(start + k, None) if files else None
            if key is None:
                if name is not None:
                    journal.drop_spilled(name)
                continue
            exc = errors.get(k) if errors else None
            if exc is None:
                if name is None or not journal.record_spilled(key, name):
                    journal.record(key, value)
            else:
                journal.record_failure(key, exc)
        self.inner.deliver(start, values, errors, seconds)

    def _drop(self, start: int, count: int) -> None:
        for index in range(start, start + count):
            name = self._files.pop(index, None)
            if name is not None:
                self.journal.drop_spilled(name)

    def fail(self, start: int, count: int, exc: BaseException) -> None:
        if self._files:
            self._drop(start, count)
        for index in range(start, start + count):
            key = self.keys.get(index)
            if key is not None and self.journal.record_failure(key, exc):
                del self.keys[index]
        self.inner.fail(start, count, exc)

    def cancel(self, start: int, count: int) -> None:
        if self._files:
            self._drop(start, count)
        self.inner.cancel(start, count)
