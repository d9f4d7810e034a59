"""A ``submit`` task sent ahead to a busy worker, still cancellable until the worker starts it.

A ``submit`` task that waits in the parent until a worker is free costs the worker a round
trip to the parent between two tasks. Sent ahead, it waits in the worker's queue instead; but
``Future.cancel()`` must then still be able to stop it, and may say True only if the task
will never run. So the worker and the parent decide, one at a time, on a slot of their own:

- the parent, as it sends the task ahead, writes (task, QUEUED) in the next of the worker's
  ``SLOTS`` slots, and tells the worker which one;
- the worker, before it starts the task, reads the slot: (task, CANCELLED) means skip it;
  anything else, it writes (task, STARTED) and runs it;
- ``Future.cancel()`` reads the slot: only (task, QUEUED) can be cancelled, by writing
  (task, CANCELLED);
- the manager, to run the task on a worker that came free first, takes it back the same way
  (``_FutureSink.revoke``); the worker then skips the copy it holds, and the task goes on as
  if it had waited in the parent.

The slots are used in turn: the worker decides on tasks in the order they were sent, and a
task is sent ahead only once the worker has reported the task two places before it, so a slot
is written again only long after its worker has decided on it. (With one slot, the worker's
decision to start the task before could overwrite a ``Future.cancel()`` of the task after.)
Only a task actually sent moves on to the next slot: one whose Future was cancelled while it
waited in the parent gives its slot back (``withdraw``), or the slots would come round to one
still undecided.

Each decision is made holding a POSIX record lock (``fcntl.lockf``) on the slot's file, a
``memfd`` of 8 bytes that both processes map. The kernel orders the reads and writes around
the lock, and drops a lock whose holder dies, so a worker killed in the middle leaves nothing
held and nothing behind (a named semaphore, ``multiprocessing.Lock`` under forkserver and
spawn, would be reported leaked by the resource tracker if the parent were SIGKILLed). Record
locks do not exclude the threads of one process, so the parent's side also holds a
``threading.Lock``.

Linux only (``memfd_create``); elsewhere a ``submit`` task waits in the parent, as before.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
import time
import weakref
from typing import Final

QUEUED: Final = 1
STARTED: Final = 2
CANCELLED: Final = 3
_SLOT = struct.Struct("q")
SLOTS: Final = 4
# The longest Future.cancel() waits for a worker that holds the lock (it holds it for
# microseconds; a stopped worker, for ever): it then answers that it cannot cancel.
_CANCEL_WAIT: Final = 0.1


def available() -> bool:
    return hasattr(os, "memfd_create")


def _code(uid: int, state: int) -> int:
    return uid * 4 + state


class _Locked:
    """The record lock on a slot file, blocking or not."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def take(self, wait: float | None) -> bool:
        if wait is None:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
            return True
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.0002)

    def drop(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)


class Claim:
    """The parent's side of one worker's slot."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("cleanbreak-claim", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, _SLOT.size * SLOTS)
        self._map = mmap.mmap(self.fd, _SLOT.size * SLOTS)
        self._next = 0  # the slot the next task sent ahead takes (the manager thread's)
        self._lock = threading.Lock()
        self._record = _Locked(self.fd)
        # Kept as long as the worker or a future that may cancel a unit on it needs it.
        weakref.finalize(self, os.close, self.fd)

    def offer(self, uid: int) -> int:
        """The unit ``uid`` is about to be sent ahead (the manager thread): its slot."""
        slot = self._next
        self._next = (slot + 1) % SLOTS
        with self._lock:
            self._record.take(None)
            try:
                _SLOT.pack_into(self._map, slot * _SLOT.size, _code(uid, QUEUED))
            finally:
                self._record.drop()
        return slot

    def withdraw(self, slot: int) -> None:
        """The unit offered ``slot`` is not sent after all (its Future was cancelled while
        it waited in the parent): the next unit takes that slot. Only a unit actually sent
        may move on to the next slot, or the slots would come round again to one whose
        worker has not yet decided on it."""
        self._next = slot

    def cancel(self, uid: int, slot: int) -> bool:
        """Stop ``uid`` from starting (any thread): True if it had not started and now never
        will, False if it started (or the worker did not let go of the slot in time)."""
        with self._lock:
            if not self._record.take(_CANCEL_WAIT):
                return False
            try:
                if _SLOT.unpack_from(self._map, slot * _SLOT.size)[0] != _code(uid, QUEUED):
                    return False
                _SLOT.pack_into(self._map, slot * _SLOT.size, _code(uid, CANCELLED))
                return True
            finally:
                self._record.drop()

    def started(self, uid: int, slot: int) -> bool:
        """Whether the worker started ``uid`` (for a worker that is gone: the slot keeps what
        it last decided)."""
        with self._lock:
            value: int = _SLOT.unpack_from(self._map, slot * _SLOT.size)[0]
        return value == _code(uid, STARTED)


class WorkerClaim:
    """The worker's side of its slot."""

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, _SLOT.size * SLOTS)
        self._record = _Locked(fd)

    def start(self, uid: int, slot: int) -> bool:
        """Before the worker runs ``uid``, sent ahead: False if it was cancelled."""
        at = slot * _SLOT.size
        self._record.take(None)
        try:
            if _SLOT.unpack_from(self._map, at)[0] == _code(uid, CANCELLED):
                return False
            _SLOT.pack_into(self._map, at, _code(uid, STARTED))
            return True
        finally:
            self._record.drop()
