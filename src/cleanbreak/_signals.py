"""The Ctrl-C and SIGTERM policy: install, escalate, restore.

Invariants:

- Handlers are installed only from the main thread (``signal.signal`` works nowhere else), and
  only over the default handler: ``signal.default_int_handler`` for SIGINT, ``SIG_DFL`` for
  SIGTERM. A handler the user installed is left alone, and the pool then reacts to the
  ``KeyboardInterrupt`` that handler raises, if any, when it reaches a pool call.
- One handler serves every live pool. It is restored when the last pool detaches, and only if
  it is still ours. A pool detached from another thread cannot restore it; the handler then
  finds no pool, puts the old handler back itself and acts as it would have.
- The handler only sets state and writes to the manager's wake pipe, then (at the stop level)
  raises ``Interrupted``. The waiting, killing and reaping happen in the manager thread and in
  the pool call that catches the exception.

Things that don't work:

- ``signal.set_wakeup_fd`` would wake the manager from C, before the main thread runs Python
  again. It is a single process-wide slot that asyncio already uses, so a library cannot count
  on owning it.
- Letting the workers receive the terminal's SIGINT (as ``multiprocessing.Pool`` does) makes
  each worker turn it into the result of its current task (CPython gh-125886), or die mid-write
  of a result. Workers lead their own process groups and ignore SIGINT; the parent decides.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

from ._errors import Interrupted

HANDLED = (signal.SIGINT, signal.SIGTERM)
_DEFAULTS: dict[int, Any] = {
    signal.SIGINT: signal.default_int_handler,
    signal.SIGTERM: signal.SIG_DFL,
}


class Listener(Protocol):
    def on_signal(self, signum: signal.Signals) -> bool:
        """Record a signal. True: raise Interrupted in the main thread now."""

    def is_live(self) -> bool:
        """False once the pool has stopped: it no longer reacts to signals."""


_lock = threading.RLock()  # the handler may run while the main thread holds it
_listeners: list[Listener] = []
_saved: dict[int, Any] = {}
_owner_pid = os.getpid()


def start_quiet_thread(target: Callable[[], object], name: str) -> None:
    """Start a daemon thread that never takes SIGINT or SIGTERM.

    The kernel hands a process-directed signal to any thread that does not block it. A thread
    of ours that took one would leave the main thread, perhaps asleep in a lock or a read,
    unwoken: the Python handler runs only in the main thread, once it runs bytecode again. So
    our threads block both (a thread inherits the mask of the thread that starts it), and the
    signal goes to the main thread, where a blocking call returns EINTR and the handler runs
    at once.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        threading.Thread(target=target, name=name, daemon=True).start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def attach(listener: Listener) -> bool:
    """Start routing SIGINT and SIGTERM to ``listener``. Returns whether our handler is in place."""
    global _owner_pid
    with _lock:
        _listeners.append(listener)
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                current = signal.getsignal(sig)
                if current is _handler:
                    continue
                if current is _DEFAULTS[sig]:
                    _owner_pid = os.getpid()
                    _saved[sig] = current
                    signal.signal(sig, _handler)
        return signal.getsignal(signal.SIGINT) is _handler


def detach(listener: Listener) -> None:
    with _lock:
        if listener in _listeners:
            _listeners.remove(listener)
        if not _listeners and threading.current_thread() is threading.main_thread():
            _restore()


def _restore() -> None:
    for sig, previous in list(_saved.items()):
        if signal.getsignal(sig) is _handler:
            signal.signal(sig, previous)
        del _saved[sig]


def _handler(signum: int, frame: FrameType | None) -> None:
    sig = signal.Signals(signum)
    if os.getpid() != _owner_pid:
        # A child forked by the fork start method, before the worker replaced this handler.
        return
    live = [listener for listener in list(_listeners) if listener.is_live()]
    if not live:
        _act_as_before(sig)
        return
    raise_now = False
    for listener in live:
        raise_now = listener.on_signal(sig) or raise_now
    if raise_now:
        exc = Interrupted(sig)
        exc._counted = True
        raise exc


def _act_as_before(sig: signal.Signals) -> None:
    """No pool is live: behave as the handler we replaced would have."""
    previous = _saved.get(sig, _DEFAULTS[sig])
    with _lock:
        if not _listeners:
            _restore()
    if previous is signal.default_int_handler:
        raise KeyboardInterrupt
    if previous == signal.SIG_DFL:
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
