"""The Ctrl-C and SIGTERM policy: install, escalate, restore, and how the process ends.

Invariants:

- Handlers are installed only from the main thread (``signal.signal`` works nowhere else), and
  only over the default handler (``signal.default_int_handler`` for SIGINT, ``SIG_DFL`` for
  SIGTERM) or over a framework's handler that is known to be safe to chain (``CHAINED``):
  asyncio's ``Runner`` (``asyncio.run``) and the event loop's ``add_signal_handler``. A chained
  handler is called after ours has stopped the pools, and ours then raises nothing: the
  framework decides what its main thread does next (asyncio cancels the main task). Any other
  handler (the user's own, ``SIG_IGN``) is left alone, and the pool then reacts to the
  ``KeyboardInterrupt`` that handler raises, if any, when it reaches a pool call.
- One handler serves every live pool. It is restored when the last pool detaches, and only if
  it is still ours. A pool detached from another thread cannot restore it; the handler then
  finds no pool, puts the old handler back itself and acts as it would have. A chained
  asyncio handler whose run has ended is not put back: the default is.
- The handler only sets state and writes to the manager's wake pipe, then (at the stop level)
  raises ``Interrupted``. The waiting, killing and reaping happen in the manager thread and in
  the pool call that catches the exception.
- Once an ``Interrupted`` has reached the caller, the process ends as Ctrl-C would have ended
  it: an uncaught ``Interrupted`` kills the process with its signal, after the atexit handlers
  and with stdio flushed, so that a shell loop stops; and while the process exits, a second
  Ctrl-C is ignored, a third ends it at once, killed by the first signal all the same.

Things that don't work:

- ``signal.set_wakeup_fd`` would wake the manager from C, before the main thread runs Python
  again. It is a single process-wide slot that asyncio already uses, so a library cannot count
  on owning it.
- Letting the workers receive the terminal's SIGINT (as ``multiprocessing.Pool`` does) makes
  each worker turn it into the result of its current task (CPython gh-125886), or die mid-write
  of a result. Workers lead their own process groups and ignore SIGINT; the parent decides.
- A signal that lands just as the main thread goes to sleep in a lock (after its last check
  for signals, before the futex wait) wakes nothing: the C handler has run, and the Python
  one waits until the lock returns, which may be never. A wake-up through
  ``signal.set_wakeup_fd`` cannot reach a thread asleep in a lock either. So wherever the
  main thread waits in cleanbreak's code (a map's next result, a future, the end of a stop),
  it waits ``CHECK_EVERY`` seconds at a time, which bounds that race; it is not a poll for
  work, which always arrives as a notification.
- CPython kills itself with SIGINT after finalizing only when the uncaught exception is exactly
  ``KeyboardInterrupt`` (``Py_RunMain``); a subclass exits with status 1, which a shell loop
  ignores. Nothing in Python runs after finalization, and neither libc's ``on_exit`` nor
  ``Py_AtExit`` can call a function with the argument ``kill`` needs. So the excepthook does
  the visible part of finalization itself (joins the threads, runs the atexit handlers,
  flushes every open file) and then kills the process.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import io
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType

from ._errors import Interrupted

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see _notyping)
if TYPE_CHECKING:
    from typing import Any, NoReturn, ParamSpec, Protocol, TypeVar

    _P = ParamSpec("_P")
    _T = TypeVar("_T")
else:
    from ._notyping import Protocol

HANDLED = (signal.SIGINT, signal.SIGTERM)
# The longest the main thread sleeps in one wait inside cleanbreak (see the module docstring).
CHECK_EVERY = 0.05
_DEFAULTS: dict[int, Any] = {
    signal.SIGINT: signal.default_int_handler,
    signal.SIGTERM: signal.SIG_DFL,
}
# Frameworks' handlers that ours calls after it has stopped the pools: (module, qualname).
CHAINED = {
    ("asyncio.runners", "Runner._on_sigint"),  # asyncio.run, asyncio.Runner
    ("asyncio.unix_events", "_sighandler_noop"),  # loop.add_signal_handler
    # An IPython kernel's, while a cell that awaits runs: it cancels the cell's coroutine.
    ("ipykernel.ipkernel", "IPythonKernel._cancel_on_sigint.<locals>.handle_sigint"),
}


class Listener(Protocol):
    def on_signal(self, signum: signal.Signals) -> bool:
        """Record a signal. True: raise Interrupted in the main thread now."""

    def is_live(self) -> bool:
        """False once the pool has stopped: it no longer reacts to signals."""

    def settle(self, over: bool = False) -> None:
        """Finish a stop that no pool call waited for (``over``: the notebook cell ended)."""

    def raising(self, exc: Interrupted) -> None:
        """The handler is raising ``exc`` in the main thread for this signal."""


_lock = threading.RLock()  # the handler may run while the main thread holds it
_listeners: list[Listener] = []
_saved: dict[int, Any] = {}
_owner_pid = os.getpid()


def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def sliced(timeout: float | None) -> Iterator[float]:
    """The waits that make up one of ``timeout`` seconds (``None``: for ever), each at most
    ``CHECK_EVERY`` seconds long (see the module docstring)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if deadline is None:
            yield CHECK_EVERY
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            return
        yield min(left, CHECK_EVERY)


def wait_event(event: threading.Event, timeout: float | None = None) -> bool:
    """``event.wait(timeout)``, in slices of at most ``CHECK_EVERY`` seconds."""
    return any(event.wait(part) for part in sliced(timeout)) or event.is_set()


def start_quiet_thread(target: Callable[[], object], name: str) -> threading.Thread:
    """Start a daemon thread that never takes SIGINT or SIGTERM.

    The kernel hands a process-directed signal to any thread that does not block it. A thread
    of ours that took one would leave the main thread, perhaps asleep in a lock or a read,
    unwoken: the Python handler runs only in the main thread, once it runs bytecode again. So
    our threads block both (a thread inherits the mask of the thread that starts it), and the
    signal goes to the main thread, where a blocking call returns EINTR and the handler runs
    at once.
    """
    thread = threading.Thread(target=target, name=name, daemon=True)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return thread


def chainable(handler: Any) -> bool:
    """Whether ``handler`` is a framework's that ours may install over and then call."""
    func = handler.func if isinstance(handler, functools.partial) else handler
    func = getattr(func, "__func__", func)
    key = (getattr(func, "__module__", None), getattr(func, "__qualname__", None))
    return key in CHAINED


def attach(listener: Listener) -> bool:
    """Start routing SIGINT and SIGTERM to ``listener``. Returns whether our handler is in place."""
    with _lock:
        if listener not in _listeners:
            _listeners.append(listener)
        if in_main_thread():
            _install()
            _follow_ipython_cells()
        return signal.getsignal(signal.SIGINT) is _handler


def _install() -> None:
    """Put our handler in place of the default ones (or of a chainable one). Main thread."""
    global _owner_pid
    for sig in HANDLED:
        current = signal.getsignal(sig)
        if current is _handler:
            continue
        if current is _DEFAULTS[sig] or chainable(current):
            _owner_pid = os.getpid()
            _saved[sig] = current
            signal.signal(sig, _handler)
    if sys.unraisablehook is sys.__unraisablehook__ and _saved:
        sys.unraisablehook = _unraisable


# ── in a notebook ────────────────────────────────────────────────────────────────────────────
#
# An IPython kernel sets SIGINT's handler for each cell it runs (Python's default while the
# cell runs, SIG_IGN between cells, or, for a cell that awaits, a handler that cancels it), and
# puts its own back after the cell: ours, installed when a cell made the pool, is gone by the
# next cell. So while a pool lives, ours goes in again before each cell runs (IPython's
# ``pre_run_cell`` event), over the kernel's, which it then stands for: the interrupt button
# stops the pool at once, whichever cell is running, even one that only waits for a future.

_ipython_followed = False
# How many cells run, one inside another (a cell may run another: ``run_cell``): the hooks act
# for the outermost only. (A cell already running when the hooks went in counts as none.)
_cell_depth = 0


def _follow_ipython_cells() -> None:
    """Once per process, in an IPython shell: reinstall our handler before each cell."""
    global _ipython_followed
    if _ipython_followed:
        return
    module = sys.modules.get("IPython")  # never imported here for this
    get_ipython = getattr(module, "get_ipython", None)
    if get_ipython is None:
        return
    try:
        shell = get_ipython()
        if shell is None:
            return
        shell.events.register("pre_run_cell", _before_cell)
        shell.events.register("post_run_cell", _after_cell)
    except Exception:  # an IPython without events: the pool's calls still catch Ctrl-C
        return
    _ipython_followed = True


def _before_cell(info: object = None) -> None:
    """IPython's ``pre_run_cell`` event, in the main thread, as a cell starts."""
    global _cell_depth
    _cell_depth += 1
    if _cell_depth == 1:
        _drop_put_off()
    with _lock:
        if in_main_thread() and any(listener.is_live() for listener in list(_listeners)):
            _install()


def _after_cell(result: object = None) -> None:
    """IPython's ``post_run_cell`` event, as a cell ends: a cell that the interrupt button
    stopped in its own code (not in a pool call) ends only once the pool has stopped, so
    that when the cell is over every worker is gone, as after a pool call. (A cell that
    another runs is part of that one: the outer cell's end does this.)"""
    global _cell_depth
    _cell_depth = max(0, _cell_depth - 1)
    if in_main_thread() and not _cell_depth:
        for listener in list(_listeners):
            listener.settle(over=True)
        _drop_put_off()


def _drop_put_off() -> None:
    """An Interrupted still put off as a cell ends was for that cell: no pool call of a later
    cell may raise it (the press was not that cell's), and the signal that was to bring it
    back is called off. (Our handler is gone after the cell, and it could not reach it.)"""
    global _put_off, _unsent, _taken, _in_flight
    if not in_main_thread():
        return
    ours = any(_getsignal(sig) is _handler for sig in HANDLED)
    with _send_lock:
        if _put_off is None:
            if not ours:
                _taken, _in_flight = 0, False  # nothing sent to ours can reach it now
            return
        _put_off = _unsent = None
        coming = _in_flight and ours
        _in_flight = False
        if coming:
            _taken += 1  # on its way to ours, which stays in place to take it
            return
    _restore_if_unused()


def detach(listener: Listener) -> None:
    with _lock:
        if listener in _listeners:
            _listeners.remove(listener)
        if not _listeners and in_main_thread():
            _restore()


def _restore() -> None:
    if _put_off is not None:
        return  # its signal is still to come back to our handler (see take_put_off)
    for sig, previous in list(_saved.items()):
        if signal.getsignal(sig) is _handler:
            signal.signal(sig, _still_wanted(sig, previous))
        del _saved[sig]
    if sys.unraisablehook is _unraisable:
        sys.unraisablehook = sys.__unraisablehook__


def _still_wanted(sig: int, previous: Any) -> Any:
    """The handler to put back: ``previous``, unless it is the handler of an asyncio run that
    has ended (asyncio would have put the default back, had ours not been in its place)."""
    if isinstance(previous, functools.partial) and chainable(previous):
        task = previous.keywords.get("main_task")
        if task is not None and task.done():
            return _DEFAULTS[sig]
    return previous


# ── a child forked from this process ────────────────────────────────────────────────────────
#
# A process forked from this one while a pool lives (by a stock ``multiprocessing.Pool`` or
# ``Process`` with the fork start method, or by ``os.fork``) is a copy with our handler in it,
# and none of the pools: they stay the parent's. It gets back the handlers it would have had
# without cleanbreak, at once, so that ``Process.terminate()`` and a stock pool's
# ``terminate()`` end it, and Ctrl-C does what it did before. Our own workers are forked with
# both signals blocked and set their own handlers before they unblock them.


def _forget_in_child() -> None:
    global _lock, _send_lock, _put_off, _unsent, _taken, _in_flight, _collected_put_off
    _lock = threading.RLock()  # a thread of the parent may have held it at the fork
    _send_lock = threading.Lock()
    _put_off = _unsent = _collected_put_off = None  # the parent's (no thread here sends it)
    _in_flight = False
    _taken = 0
    for sig, previous in list(_saved.items()):
        if signal.getsignal(sig) is _handler:
            with contextlib.suppress(ValueError):  # defensive: the forking thread is main
                signal.signal(sig, _still_wanted(sig, previous))
    _saved.clear()
    _listeners.clear()
    if sys.unraisablehook is _unraisable:
        sys.unraisablehook = sys.__unraisablehook__


# In the child, the thread that forked is the main thread, whichever it was in the parent.
os.register_at_fork(after_in_child=_forget_in_child)


# ── the first touch of ``cleanbreak.Pool`` or ``cleanbreak.map`` ─────────────────────────────
#
# The package imports the pool's modules on first use (a worker needs none of them), and that
# import takes a few milliseconds. A Ctrl-C then would end the user's line with a plain
# KeyboardInterrupt in the middle of an import (SIGTERM: death, by its default action). So
# while that import runs, our handler is in place and only records the signal; the line then
# ends with ``Interrupted``, as it would a moment later inside ``Pool()``.

_collected: list[signal.Signals] | None = None  # signals recorded meanwhile
# The Interrupted put off (see take_put_off) whose signal came back meanwhile: it is the one
# that ``early_interrupt`` then gives the caller.
_collected_put_off: Interrupted | None = None


@contextlib.contextmanager
def collecting() -> Iterator[list[signal.Signals]]:
    """While the pool's modules are imported: SIGINT and SIGTERM are recorded, not acted on.
    The caller raises ``early_interrupt`` for what was recorded. (Main thread only.)"""
    global _collected
    if not in_main_thread() or _collected is not None:
        yield []
        return
    caught: list[signal.Signals] = []
    try:
        with _lock:
            # Recording first: a signal that comes once our handler is in place is recorded
            # (one that comes before finds the default handler: see below).
            _collected = caught
            _install()
        yield caught
    finally:
        # The window closes with both signals blocked in this thread, so that none lands
        # between the two handlers put back (SIGINT's default back and SIGTERM's not yet: a
        # stress run saw a plain KeyboardInterrupt raised in the middle of the restore), nor
        # after the recording ends and before the handlers are back.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            _close_window(caught)
        except KeyboardInterrupt:  # (delivered to another thread, run here: see below)
            caught.append(signal.SIGINT)
        finally:
            _collected = None
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            except KeyboardInterrupt:  # SIGINT's default handler, for one that came just now
                caught.append(signal.SIGINT)


def _close_window(caught: list[signal.Signals]) -> None:
    """``collecting``'s end, with SIGINT and SIGTERM blocked in the main thread: the handlers
    are put back (unless a pool's handler is in place now), and a signal that came while they
    were blocked is recorded, as it would have been a moment earlier. (One sent to the
    process can still reach another thread, whose C handler then has the main thread run the
    Python handler in place at its next instruction.)"""
    with _lock:
        if _listeners:
            return
        _restore()
        take = getattr(signal, "sigtimedwait", None)  # (not on macOS: there it goes on)
        if take is None:
            return
        pending = signal.sigpending()
        for sig in HANDLED:
            if sig in pending and signal.getsignal(sig) is not _handler:
                take([sig], 0)  # taken: it would reach the default handler
                caught.append(sig)


def making_a_pool(init: Callable[_P, _T]) -> Callable[_P, _T]:
    """For a pool's ``__init__`` (and ``cleanbreak.map``, which makes one): from its first
    instruction, SIGINT and SIGTERM are recorded (``collecting``) until the pool puts its
    handler in place for itself (``attach`` ends the recording, and the pool raises
    ``Interrupted`` for what was recorded: ``end_collecting``). A signal while the arguments
    are checked is so the pool's, as one a moment later would be, where it would otherwise end
    the process (SIGTERM's default action) or raise a plain ``KeyboardInterrupt``. If
    ``__init__`` fails before that, the signal wins: ``Interrupted``. A plain
    ``KeyboardInterrupt`` (SIGINT's default handler, in the instants before ours is in place
    or after it is put back) ends the call as ``Interrupted`` too."""

    @functools.wraps(init)
    def made(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        caught: list[signal.Signals] = []
        try:
            # (Where another pool's handler is in place already, it acts for this one as
            # before.)
            window: contextlib.AbstractContextManager[list[signal.Signals]]
            window = collecting() if not _listeners else contextlib.nullcontext([])
            with window as caught:
                return init(*args, **kwargs)
            # (A pool made puts its handler in place, and end_collecting hands it what was
            # recorded: nothing is left here to raise.)
        except BaseException as exc:
            outcome = window_outcome(exc, caught)
            if outcome is exc:
                raise
            raise outcome from None

    return made


def window_outcome(exc: BaseException, caught: list[signal.Signals]) -> BaseException:
    """What a call whose window (``collecting``) was open raises for ``exc``: ``Interrupted``
    for a plain KeyboardInterrupt (SIGINT's default handler, in the instants before ours is
    in place), and for any failure once a signal was recorded (it came first, or as the
    window closed); else ``exc`` itself."""
    if isinstance(exc, Interrupted):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return early_interrupt(caught[0] if caught else signal.SIGINT)
    if caught:
        return early_interrupt(caught[0])
    return exc


def end_collecting() -> signal.Signals | None:
    """For a pool whose handler is now in place (after ``attach``), in ``Pool()``: the signals
    from here on are the pool's, not recorded; the first recorded so far, if any, is returned
    for the pool to raise ``Interrupted`` for (and is no longer the caller's to raise)."""
    global _collected
    with _lock:
        caught, _collected = _collected, None
    if not caught:
        return None
    first = caught[0]
    caught.clear()
    return first


def early_interrupt(sig: signal.Signals) -> Interrupted:
    """The ``Interrupted`` for a signal that came while the pool's modules were imported."""
    global _collected_put_off
    exc, _collected_put_off = _collected_put_off, None
    if exc is not None:
        return exc.with_traceback(None)
    interrupted(sig)
    return Interrupted(sig)


# ── where an exception cannot be raised ──────────────────────────────────────────────────────
#
# A signal's handler runs between two bytecodes of whatever the main thread runs, and that may
# be a weakref callback or a __del__ method that the garbage collector called: an exception
# raised there is printed as "Exception ignored in ..." and dropped, so the caller would never
# see its Interrupted (the pool stops all the same). So the raise is put off: the handler has
# itself called again in a moment (``_put_off_raise``), and raises once the main thread has
# left the callback. The weakref module's own callbacks and
# __del__ methods are known by their frames; for any other callback, our hook of
# ``sys.unraisablehook`` catches the dropped Interrupted (instead of printing it) and puts it
# off in the same way. The hook goes in with our signal handler, only over Python's own.
#
# The same holds, and worse, for the import system's own code: the weakref callback that drops
# a module's import lock takes the global import lock before its ``try``, so an exception raised
# between the two leaves that lock held for good, and the next ``os.fork()`` (which takes it)
# or import in another thread waits for ever (a stress run hung so: the manager thread in
# ``fork``, starting a worker). While the main thread runs importlib's bytecode, nothing is
# raised there: it is put off too.
#
# And for ``threading.Condition.__enter__``, which is Python code around a C acquire: the
# handler runs as that call returns, so an exception raised there leaves ``__enter__`` with the
# lock taken and the ``with`` block never entered, and nothing releases it. A future's condition
# was left so by the main thread's ``add_done_callback`` (under ``apply_async``), and the
# manager then waited for it for ever as it set the result (a stress run of the drop-in hung).
# Put off only once the condition is held: a signal that comes while the acquire still waits
# breaks it, as before. The same for ``Condition.__exit__``, whose handler may run as it is
# entered, before the C release: an exception raised there leaves the lock taken just the same
# (a lone script of a Condition entered and left in a loop, SIGINT every 0.3 ms, raising as
# this handler would: 1 lock left taken in 2,665 KeyboardInterrupts on 3.11; the drop-in's
# stress test hung so, about once in 400 to 800 runs of 1,000 round trips on 3.13.0, the manager
# thread waiting for a future's condition, or the main thread for a result's).

_FINALIZING_FILES = ("weakref.py", "_weakrefset.py")
_IMPORT_MACHINERY = "<frozen importlib._bootstrap"  # and _bootstrap_external
_CONDITION_STEPS = (threading.Condition.__enter__.__code__, threading.Condition.__exit__.__code__)
_put_off: Interrupted | None = None  # the Interrupted put off


# And while the main thread sends a unit to a worker itself (``_manager.LocalBackend.put``), it
# changes the manager's state step by step: an exception raised in between could lose the unit.
# It sets ``holding`` for that while (tens of microseconds), and only while the handlers that can
# run are ours (``raises_only_ours``); the handler still does its work at once (the stop closes
# the gate, so no task starts late), and only the raise is put off. ``Pool()`` sets it too,
# while it makes its backend (milliseconds): another live pool's signal raised there would leave
# that backend's thread and workers running with nobody to stop them; the pool being made
# raises its own ``Interrupted`` for the signal as soon as it holds its backend.

# The C function (``signal`` imports it): signal.getsignal makes SIG_DFL and SIG_IGN enum
# members, 50 times slower.
_getsignal: Callable[[int], Any] = getattr(
    sys.modules.get("_signal"), "getsignal", signal.getsignal
)
holding = False  # the main thread is inside a step that no exception may break (see above)


def raises_only_ours() -> bool:
    """Whether every Python handler for SIGINT and SIGTERM is ours, chaining none, so that a
    signal raises nothing in the main thread while ``holding`` is set. (``SIG_IGN``,
    ``SIG_DFL`` and a handler set from C run no Python code there; a framework's handler that
    ours chains, asyncio's, may raise ``KeyboardInterrupt`` itself: see ``_in_loop``.)"""
    for sig in HANDLED:
        handler = _getsignal(sig)
        if handler is _handler:
            if _saved.get(sig) is not _DEFAULTS[sig]:  # it chains a framework's (see _install)
                return False
        elif callable(handler):
            return False
    return True


def _in_finalizer(frame: FrameType | None) -> bool:
    """Whether the main thread runs a weakref callback or a ``__del__`` (a few frames deep), or
    the import system's own code (the frame it is in), or holds a condition's lock in
    ``Condition.__enter__`` or ``__exit__``, or holds (see ``holding``)."""
    if holding or _in_import_machinery(frame) or _in_condition_step(frame):
        return True
    for _ in range(4):
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "__del__" or code.co_filename.endswith(_FINALIZING_FILES):
            return True
        if code in _OURS_PUTTING_OFF:
            return True  # still in our hook: it has not returned to the callback's caller
        frame = frame.f_back
    return False


def _in_condition_step(frame: FrameType | None) -> bool:
    """Whether ``frame`` is ``Condition.__enter__`` or ``__exit__`` with its lock held (see
    above)."""
    if frame is None or frame.f_code not in _CONDITION_STEPS:
        return False
    is_owned = getattr(frame.f_locals.get("self"), "_is_owned", None)
    try:
        return is_owned is None or bool(is_owned())
    except Exception:  # pragma: no cover - not a threading.Condition after all
        return True


def _in_import_machinery(frame: FrameType | None) -> bool:
    """Whether ``frame`` is importlib's own code (not a module's that it imports)."""
    return frame is not None and frame.f_code.co_filename.startswith(_IMPORT_MACHINERY)


_PUT_OFF_SECONDS = 0.002
_putting_off = False
_taken = 0  # Interrupteds put off and raised by a pool call before their signal came back


# The signal that brings a put-off Interrupted back is sent by a thread of ours, a moment later.
# A pool call may take the Interrupted first (``take_put_off``): the signal is then called off if
# it has not gone yet, and ignored when it comes if it has. Either way it must never reach a
# handler other than ours, so the handlers are not handed back while an Interrupted is put off
# (a CI run saw the signal come back after the pool's shutdown had restored Python's handler:
# a KeyboardInterrupt traceback). ``_send_lock`` makes "not yet sent" and "sent" exact.
_send_lock = threading.Lock()
_unsent: object | None = None  # the token of the thread that is to send the signal back
# That thread sent it to our handler, which has not had it yet. (It sends nothing while
# another handler is in place: a notebook kernel puts its own back as a cell ends, and the
# signal would be lost to it, or raise KeyboardInterrupt in the kernel's code.)
_in_flight = False


def raise_put_off() -> None:
    """Raise the stop's Interrupted now if the handler put it off (the signal came in a
    callback that the garbage collector ran, or while the main thread sent a unit): it has not
    reached the caller, and a call on the stopped pool is the first place it can."""
    if in_main_thread():
        put_off = take_put_off()
        if put_off is not None:
            raise put_off.with_traceback(None)


def take_put_off() -> Interrupted | None:
    """The Interrupted put off, for a pool call to raise now (a future cancelled by the stop
    raises it, not CancelledError); the signal that was to bring it back is called off, or
    ignored when it comes."""
    global _put_off, _taken, _unsent, _in_flight
    with _send_lock:
        exc, _put_off = _put_off, None
        if exc is not None:
            if _unsent is not None:
                _unsent = None  # its thread will not send it
            elif _in_flight:
                _in_flight = False
                _taken += 1
    if exc is not None:
        _restore_if_unused()
    return exc


def _restore_if_unused() -> None:
    """Hand the handlers back if no pool is left (see ``detach``) now that no Interrupted is
    put off."""
    with _lock:
        if not _listeners and in_main_thread():
            _restore()


def _put_off_raise(exc: Interrupted) -> None:
    """Have the handler called again in a moment to raise ``exc``: a thread of ours sends the
    signal to the main thread (waking it from a blocking call), by which time the main thread
    has left the callback (if not, it is put off again)."""
    global _put_off, _putting_off
    _put_off = exc
    sig = exc.signal
    if _putting_off:  # called again from in here: a thread is on its way
        return
    _putting_off = True
    try:
        _send_again_soon(sig, callable_off=True)
    finally:
        _putting_off = False


def _send_again_soon(sig: signal.Signals, callable_off: bool = False) -> None:
    """Send ``sig`` to the main thread in a moment, from a thread of ours (waking it from a
    blocking call); with ``callable_off``, unless ``take_put_off`` calls it off first."""
    global _unsent
    main = threading.main_thread().ident
    assert main is not None
    token = object()
    if callable_off:
        _unsent = token

    def send() -> None:
        global _unsent, _in_flight
        time.sleep(_PUT_OFF_SECONDS)
        with _send_lock:
            if callable_off:
                if _unsent is not token:
                    return  # called off, or a later thread sends it
                _unsent = None
                if _getsignal(sig) is not _handler:
                    return  # see _in_flight: the Interrupted stays for a pool call to take
                _in_flight = True
            signal.pthread_kill(main, sig)

    start_quiet_thread(send, "cleanbreak-put-off")


def _unraisable(unraisable: Any) -> None:
    """``sys.unraisablehook`` while our handler is in place: an Interrupted of ours that a
    callback dropped is raised again in a moment (see above)."""
    exc = unraisable.exc_value
    if isinstance(exc, Interrupted) and exc._counted and _put_off is None and in_main_thread():
        _put_off_raise(exc)
        return
    sys.__unraisablehook__(unraisable)


# The frames of our own put-off code (up to the thread start that sends the signal again).
_OURS_PUTTING_OFF = (_unraisable.__code__, _put_off_raise.__code__, _send_again_soon.__code__)


def _handler(signum: int, frame: FrameType | None) -> None:
    global _put_off, _taken, _in_flight, _collected_put_off
    sig = signal.Signals(signum)
    if os.getpid() != _owner_pid:
        # A child forked where no at-fork hook ran (a fork from C): as _forget_in_child does.
        previous = _saved.get(sig, _DEFAULTS[sig])
        _forget_in_child()
        _deliver_as(previous, sig, frame)
        return
    if _collected is not None:
        if _in_flight and _put_off is not None:
            # It brings back an Interrupted put off: that is the one to raise (early_interrupt).
            _collected_put_off, _put_off, _in_flight = _put_off, None, False
        _collected.append(sig)
        for listener in list(_listeners):
            # A pool another thread started meanwhile: it stops, as it would have at once.
            if listener.is_live():
                listener.on_signal(sig)
        return
    if _taken:
        _taken -= 1  # it came back for one already raised (take_put_off)
        return
    _in_flight = False
    if _put_off is not None:
        # Called again for an Interrupted put off (see _in_finalizer), which is raised now
        # unless the main thread is still in the callback. (A Ctrl-C that comes in this very
        # moment counts as this one.)
        if _in_finalizer(frame):
            _put_off_raise(_put_off)
            return
        exc, _put_off = _put_off, None
        previous = _saved.get(sig)
        _restore_if_unused()
        if previous is not None and chainable(previous) and not _in_cell(frame):
            # It was put off in a notebook cell's own code, which has since gone on to await:
            # raised here, in the event loop's own code, it would pass the cell by (the
            # kernel prints it, and the cell runs on). The kernel's handler stops the cell, as
            # for a press while it waits.
            _in_loop(previous, signum)
            return
        raise exc.with_traceback(None)
    live = [listener for listener in list(_listeners) if listener.is_live()]
    if not live:
        _act_as_before(sig, frame)
        return
    raise_now = False
    for listener in live:
        raise_now = listener.on_signal(sig) or raise_now
    previous = _saved.get(sig)
    if previous is not None and chainable(previous) and not (raise_now and _in_cell(frame)):
        # The framework runs the main thread: let it know, and let it unwind (asyncio cancels
        # its main task; the pool calls in it then raise Interrupted).
        _in_loop(previous, signum)
        return
    if raise_now and _cancel_asyncio_main():
        return
    if raise_now:
        exc = Interrupted(sig)
        exc._counted = True
        for listener in live:
            listener.raising(exc)
        if _in_finalizer(frame):
            _put_off_raise(exc)
            return
        raise exc


def _in_cell(frame: FrameType | None) -> bool:
    """Whether the main thread, stopped at ``frame``, runs a notebook cell's own code (or what
    it calls), as the cell's coroutine when the cell awaits. The kernel's handler for such a
    cell only cancels it, at its next ``await`` that waits: a cell that works between its
    awaits (on results already in) would run on. Raised here, ``Interrupted`` goes up through
    the cell's code to IPython's ``run_code``, which shows every exception of the cell's, as
    in a cell that does not await; outside the cell's code (the event loop's own, while the
    cell waits), the kernel's handler cancels it as before."""
    child = None
    while frame is not None:
        code = frame.f_code
        if code.co_name == "run_code" and "IPython" in code.co_filename:
            return child is not None and child.f_code is frame.f_locals.get("code_obj")
        child, frame = frame, frame.f_back
    return False


def _running_loop() -> Any:
    """The asyncio event loop running in this thread, or None (asyncio is never imported
    here for it)."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return None
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _main_task(handler: object) -> Any:
    """The main task of ``asyncio.Runner``'s SIGINT handler (a ``functools.partial``), or
    None for any other handler."""
    return handler.keywords.get("main_task") if isinstance(handler, functools.partial) else None


def a_framework_took_a_ctrl_c() -> bool:
    """Whether the framework whose SIGINT handler ours chains took a Ctrl-C that it has not
    yet delivered. asyncio's handler (``asyncio.run``) and an IPython kernel's (a cell that
    awaits) only ask, each in its own way, to cancel the coroutine that runs, which runs on
    until its next ``await``, and so into ``Pool()``: the signal came after the run or the
    cell started and before our handler was in place. It is the pool's, as one a moment later
    would be. (Main thread, with ours in place.)"""
    handler = _saved.get(signal.SIGINT)
    if handler is None or not chainable(handler):
        return False
    task = _main_task(handler)
    if task is not None:
        if task.done():
            return False
        runner = getattr(getattr(handler, "func", None), "__self__", None)
        # asyncio's own record (3.11-3.13): the signals it took, and a cancel not delivered.
        return getattr(runner, "_interrupt_count", 0) > 0 and bool(
            getattr(task, "_must_cancel", False)
        )
    return _kernel_took_a_ctrl_c(handler)


def _kernel_took_a_ctrl_c(handler: Any) -> bool:
    """An IPython kernel's handler for a cell that awaits (``IPythonKernel._cancel_on_sigint``)
    took a Ctrl-C whose cancel has not reached the cell: the handler queues a callback on the
    event loop that completes a future of its own (``sigint_future``), whose done-callback, also
    queued, cancels the cell's task; the cancel reaches the cell's code at its next ``await``.
    Either callback may be waiting in the loop's queue while the cell's code runs (the second
    when the cell awaited once since the press): look for each. What it reads is
    ipykernel's closure and the loop's queue, both private (ipykernel 6-7, Python 3.11-3.13),
    so anything unexpected reads as "no"."""
    pending = _closure(handler).get("sigint_future")
    loop = _running_loop()
    asyncio = sys.modules.get("asyncio")
    if loop is None or asyncio is None or not isinstance(pending, asyncio.Future):
        return False
    if pending.cancelled():  # the cell's task is over: the kernel no longer listens
        return False
    cell_task = asyncio.current_task(loop)
    try:
        queued = list(getattr(loop, "_ready", ()))
    except RuntimeError:  # pragma: no cover - changed by another thread as it was read
        return False
    for handle in queued:
        for call in (getattr(handle, "_callback", None), *(getattr(handle, "_args", None) or ())):
            func = getattr(call, "func", None)  # both are functools.partial objects
            if func is None:
                continue
            if not pending.done():  # set_sigint_result, which holds the future it completes
                if any(v is pending for v in _closure(func).values()):
                    return True
            elif cell_task is not None and call.args[:1] == (cell_task,):
                return True  # cancel_unless_done(cell_task), sigint_future's done-callback
    return False


def _closure(func: Any) -> dict[str, Any]:
    """The variables a nested function holds from the ones around it, by name."""
    names = getattr(getattr(func, "__code__", None), "co_freevars", ())
    held = {}
    for name, cell in zip(names, getattr(func, "__closure__", None) or (), strict=False):
        with contextlib.suppress(ValueError):  # a variable not yet assigned
            held[name] = cell.cell_contents
    return held


def _cancel_asyncio_main() -> bool:
    """A signal asyncio does not handle (SIGTERM) while ``asyncio.run`` runs the main thread:
    cancel its main task, as asyncio does on Ctrl-C, rather than raise in the middle of the
    event loop. True if it was done."""
    runner = _saved.get(signal.SIGINT)
    if runner is None or not chainable(runner):
        return False
    task = _main_task(runner)
    loop = _running_loop()
    if loop is None or task is None or task.done() or task.get_loop() is not loop:
        return False
    _once_stopped(loop, task.cancel)  # as a callback of its own: see _in_loop
    return True


_STOPPED_POLL = 0.002  # seconds between two looks at whether the pools have stopped


def _once_stopped(loop: Any, cancel: Callable[[], object]) -> None:
    """Call ``cancel`` (which cancels the coroutine the loop runs) as a callback of ``loop``,
    once no pool is stopping. Until every worker of a stopped pool is gone, its last results
    are on their way to its futures, and from each to the asyncio future the coroutine may
    await (another callback of the loop): cancelled first, that asyncio future would lose the
    result for good (a held pool's, whose caller holds no other future). Those transfers are
    callbacks too, queued by the manager thread before its pool stopped, but perhaps behind
    this one: the cancel goes to the back of the queue once more, behind them."""

    def when_stopped() -> None:
        if any(listener.is_live() for listener in list(_listeners)):
            loop.call_later(_STOPPED_POLL, when_stopped)
            return
        loop.call_soon(cancel)

    loop.call_soon_threadsafe(when_stopped)


def _in_loop(handler: Callable[[int, FrameType | None], object], signum: int) -> None:
    """Call asyncio's signal handler as a callback of the running loop, not here.

    A signal handler runs between two bytecodes of whatever the main thread runs: under
    asyncio, in the middle of one of the loop's callbacks, such as the one that passes a pool
    future's result on to its asyncio future (it checks that the asyncio future is not
    cancelled, then sets its result). asyncio's handler cancels the main task, and with it
    that future, in between: the callback then fails with ``InvalidStateError``, printed as
    "Exception in callback". Run as a callback of its own, the cancel falls between two; and
    only once the pools have stopped (see ``_once_stopped``).
    """
    loop = _running_loop()
    task = _main_task(handler)
    if loop is None or loop.is_closed() or (task is not None and task.done()):
        handler(signum, None)  # nothing to cancel: asyncio raises KeyboardInterrupt here
        return

    def later() -> None:
        if task is not None and task.done() and _first is not None:
            # The run ended before this callback came, with the pool's Interrupted for this
            # signal: there is nothing left for asyncio to cancel, nor to raise.
            return
        handler(signum, None)

    _once_stopped(loop, later)


def _act_as_before(sig: signal.Signals, frame: FrameType | None) -> None:
    """No pool is live: behave as the handler we replaced would have."""
    previous = _saved.get(sig, _DEFAULTS[sig])
    with _lock:
        if not _listeners:
            _restore()
    if (holding or _in_import_machinery(frame)) and callable(previous):
        # It may raise (Python's own raises KeyboardInterrupt): not in importlib's code (see
        # _in_finalizer). The signal comes back in a moment, to whichever handler is then in
        # place.
        _send_again_soon(sig)
        return
    _deliver_as(previous, sig, frame)


def _deliver_as(previous: Any, sig: signal.Signals, frame: FrameType | None) -> None:
    """Do what ``previous``, the handler ours replaced, does with ``sig``."""
    if previous is signal.default_int_handler:
        raise KeyboardInterrupt
    if previous == signal.SIG_DFL:
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    elif callable(previous):
        previous(int(sig), frame)


# ── how the process ends after an Interrupted ────────────────────────────────────────────────

shutting_down = False  # the interpreter has begun to exit: the main thread has finished
_first: signal.Signals | None = None  # the signal of the first Interrupted raised here
_extra = 0  # Ctrl-Cs that came while the process exited after it
_hooked: Any = None  # the excepthook ours calls first


def interrupted(sig: signal.Signals) -> None:
    """An ``Interrupted`` for ``sig`` is about to reach the caller."""
    global _first, _hooked
    if _first is None:
        _first = sig
    if _hooked is None and in_main_thread():
        _hooked = sys.excepthook
        sys.excepthook = _excepthook


def _excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    # Called by the interpreter for an uncaught exception (not by code: no Python caller), in
    # a process that is about to end (not at an interactive prompt, which goes on).
    ends = (
        sys._getframe().f_back is None
        and in_main_thread()
        and not (sys.flags.interactive or sys.flags.inspect or hasattr(sys, "ps1"))
    )
    if ends and isinstance(exc, Interrupted):
        _calm_exit()
    _hooked(kind, exc, tb)
    if ends and isinstance(exc, Interrupted):
        _finish_and_die(exc.signal)


def _finish_and_die(sig: signal.Signals) -> NoReturn:
    """End as an uncaught KeyboardInterrupt ends CPython: what the exit would do that a user
    can see (threads joined, atexit handlers run, files flushed), then death by ``sig``."""
    try:
        shutdown = getattr(threading, "_shutdown", None)
        if shutdown is not None:
            shutdown()
        atexit._run_exitfuncs()
        _flush_open_files()
    finally:
        die_of(sig)


def _flush_open_files() -> None:
    """Flush every open file: finalization would have, as it closed them."""
    for obj in gc.get_objects():
        if isinstance(obj, io.IOBase):
            with contextlib.suppress(Exception):
                if not obj.closed and obj.writable():
                    obj.flush()


def die_of(sig: signal.Signals) -> NoReturn:
    """End the process as ``sig``'s default action does, stdout and stderr flushed first."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)  # pragma: no cover - the signal came first


def _calm_exit() -> None:
    """After an Interrupted, while the process exits: a further Ctrl-C is ignored, and one
    more after it ends the process at once, as killed by the first signal."""
    if _first is None or not in_main_thread():
        return
    current = signal.getsignal(signal.SIGINT)
    if current is signal.default_int_handler or current is _handler:
        signal.signal(signal.SIGINT, _on_sigint_while_exiting)


def _on_sigint_while_exiting(signum: int, frame: FrameType | None) -> None:
    global _extra
    _extra += 1
    if _extra >= 2 and _first is not None:
        die_of(_first)


def _on_interpreter_exit() -> None:
    global shutting_down
    shutting_down = True
    _calm_exit()


# Called as the main thread finishes, before the non-daemon threads are joined and before any
# atexit handler, whichever order those were registered in (concurrent.futures uses the same).
_register = getattr(threading, "_register_atexit", atexit.register)
try:
    _register(_on_interpreter_exit)
except RuntimeError:  # pragma: no cover - imported while the interpreter exits
    shutting_down = True
