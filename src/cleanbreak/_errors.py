"""Every exception cleanbreak raises, in one place.

Each one also derives from the standard type that callers already catch, so that code written
for ``concurrent.futures`` keeps working::

    BaseException
    ├── KeyboardInterrupt
    │   └── Interrupted            Ctrl-C or SIGTERM stopped the pool; carries .completed
    └── Exception
        ├── CleanbreakError         base of the errors below
        │   ├── BrokenProcessPool (concurrent.futures.process)
        │   │   ├── WorkerDied       the worker running a task exited or was killed
        │   │   └── BrokenPool       workers cannot start (initializer failed, crash loop)
        │   ├── TimeoutError
        │   │   └── TaskTimeout      a task ran past its deadline; its worker was killed
        │   ├── TaskAborted          task code raised SystemExit or KeyboardInterrupt
        │   ├── JournalError         the journal cannot be used (locked, another function's, ...)
        │   └── PicklingError (pickle)
        │       └── SerializationError   a function, argument, result or exception would not pickle
        └── RemoteTraceback          set as __cause__ of a task's own exception

Each carries its details as attributes; they survive pickling, as do notes and a retried
task's ``.attempts`` (``__reduce__`` passes the instance's ``__dict__`` along).

``Interrupted`` derives from ``KeyboardInterrupt`` and so from ``BaseException``: an
``except Exception`` written around a ``map`` cannot swallow Ctrl-C by accident (the same
reasoning as trio's ``Cancelled``).
"""

from __future__ import annotations

import pickle
import signal as _signal
import sys
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see _notyping)
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "BrokenPool",
    "CleanbreakError",
    "Interrupted",
    "JournalError",
    "RemoteTraceback",
    "SerializationError",
    "TaskAborted",
    "TaskTimeout",
    "WorkerDied",
]


class CleanbreakError(Exception):
    """Base class of cleanbreak's own errors (not of :class:`Interrupted`)."""


class Interrupted(KeyboardInterrupt):
    """The pool was stopped by Ctrl-C (SIGINT) or SIGTERM.

    ``signal`` is the signal that stopped it. ``completed`` maps the index of every task that
    had finished with a result to that result: the input position for ``map`` and
    ``imap_unordered``, the submission order for ``submit``.
    """

    # Set by cleanbreak: _counted when its own signal handler raised this (the signal was
    # already counted), _filled once a pool call has put the finished results in .completed.
    # _pending, for one the handler raised in the caller's own code (no pool call was there to
    # gather the results): what fills .completed, once the pool has stopped, when it is first
    # read (see Pool.raising).
    _counted = False
    _filled = False
    _pending: Callable[[], tuple[dict[int, Any], int | None]] | None = None
    _gatherer_working = False  # the pool that set _pending was working at the signal

    def __init__(
        self,
        signal: _signal.Signals = _signal.SIGINT,
        completed: dict[int, Any] | None = None,
        *,
        total: int | None = None,
    ) -> None:
        self.signal = _signal.Signals(signal)
        self.completed = {} if completed is None else completed
        self.total = total
        super().__init__(self._message())

    @property
    def completed(self) -> dict[int, Any]:
        pending = self._pending
        if pending is not None:
            self._pending = None
            gathered, total = pending()
            self._completed.update(gathered)
            if total is not None:
                self.total = total
            self._filled = True
        return self._completed

    @completed.setter
    def completed(self, value: dict[int, Any]) -> None:
        self._completed = value

    def _message(self) -> str:
        if not (self._filled or self.completed):
            # Raised where no pool call was waiting (in the caller's own code): the pool
            # stops all the same, and its futures keep what finished.
            return f"interrupted by {self.signal.name}"
        of = f" of {self.total}" if self.total is not None else ""
        return (
            f"interrupted by {self.signal.name}: {len(self.completed)}{of} results kept "
            "in .completed"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        completed = self.completed
        dropped = ("_pending", "_completed", "_gatherer_working")
        state = {k: v for k, v in self.__dict__.items() if k not in dropped}
        return (_rebuild_interrupted, (int(self.signal), completed, self.total), state)

    def _render_traceback_(self) -> list[str]:
        """What IPython shows for it, in place of a traceback: a notebook cell that the
        interrupt button stopped ends with this line. The exception itself (and so the
        results) stays in ``sys.last_value`` (``sys.last_exc`` on Python 3.12 and later)."""
        if not (self._filled or self.completed):
            kept = "the pool's finished futures keep their results"
            return [f"{type(self).__name__}: {self}; {kept}"]
        where = "sys.last_exc" if sys.version_info >= (3, 12) else "sys.last_value"
        return [f"{type(self).__name__}: {self}; they are in {where}.completed"]

    def __str__(self) -> str:
        return self._message()


def _rebuild_interrupted(sig: int, completed: dict[int, Any], total: int | None) -> Interrupted:
    return Interrupted(_signal.Signals(sig), completed, total=total)


class WorkerDied(CleanbreakError, BrokenProcessPool):
    """The worker process running this task exited or was killed.

    Only this task fails; the pool replaces the worker and goes on. ``exitcode`` is the
    process's exit status (negative for a signal, as in ``multiprocessing``), ``signal`` the
    signal that killed it or ``None``, ``pid`` its process id and ``task`` the task's index. On
    a Dask cluster, ``lost`` holds what Dask said (its ``KilledWorker``, also the
    ``__cause__``), and ``exitcode`` and ``pid`` are unknown (``None`` and 0).
    """

    def __init__(
        self, exitcode: int | None, pid: int, task: int | None = None, *, lost: str | None = None
    ) -> None:
        self.exitcode = exitcode
        self.pid = pid
        self.task = task
        self.lost = lost  # on a Dask cluster: what Dask said of the lost worker (KilledWorker)
        self.signal: _signal.Signals | None = None
        if exitcode is not None and exitcode < 0:
            try:
                self.signal = _signal.Signals(-exitcode)
            except ValueError:
                self.signal = None
        super().__init__(self._message())

    def _message(self) -> str:
        what = f"task {self.task}" if self.task is not None else "a task"
        if self.lost is not None:
            return f"the Dask worker running {what} was lost: {self.lost}"
        if self.signal is not None:
            how = f"was killed by {self.signal.name}"
            if self.signal == _signal.SIGKILL:
                how += " (the kernel's OOM killer sends SIGKILL when memory runs out)"
            elif self.signal == _signal.SIGSEGV:
                how += " (a segmentation fault, usually in a C extension)"
        else:
            how = f"exited with code {self.exitcode}"
        return f"the worker (pid {self.pid}) running {what} {how}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_worker_died, (self.exitcode, self.pid, self.task), self.__dict__)

    def __str__(self) -> str:
        return self._message()


def _rebuild_worker_died(exitcode: int | None, pid: int, task: int | None) -> WorkerDied:
    return WorkerDied(exitcode, pid, task)  # .lost comes back with the instance's __dict__


class BrokenPool(CleanbreakError, BrokenProcessPool):
    """The pool cannot run tasks: its workers fail to start.

    Raised for every task still waiting, and by ``submit`` afterwards, when the initializer
    raised (its exception is the ``__cause__``) or when workers died again and again before
    finishing a single task. The pool stops instead of starting new workers in a loop.
    """


class TaskTimeout(CleanbreakError, TimeoutError):
    """The task ran past its ``task_timeout``: its worker was killed and replaced.

    ``timeout`` is the limit in seconds, ``pid`` the killed worker and ``task`` the task's index.
    The processes the task started were killed with it. On a Dask cluster, ``dask_worker`` is
    the worker's address: the task was stopped there, or the worker restarted if it could not
    be stopped.
    """

    def __init__(
        self, timeout: float, pid: int, task: int | None = None, *, dask_worker: str | None = None
    ) -> None:
        self.timeout = timeout
        self.pid = pid
        self.task = task
        self.dask_worker = dask_worker
        super().__init__(self._message())

    def _message(self) -> str:
        what = f"task {self.task}" if self.task is not None else "the task"
        if self.dask_worker is not None:
            return (
                f"{what} ran past its {self.timeout:g} s timeout on the Dask worker "
                f"{self.dask_worker} (pid {self.pid}); it was stopped there, or the worker "
                "restarted"
            )
        return (
            f"{what} ran past its {self.timeout:g} s timeout; its worker (pid {self.pid}) was "
            "killed and replaced"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_task_timeout, (self.timeout, self.pid, self.task), self.__dict__)

    def __str__(self) -> str:
        return self._message()


def _rebuild_task_timeout(timeout: float, pid: int, task: int | None) -> TaskTimeout:
    return TaskTimeout(timeout, pid, task)  # .dask_worker comes back with the __dict__


class TaskAborted(CleanbreakError):
    """Task code raised ``SystemExit`` or ``KeyboardInterrupt``.

    It is reported as this ordinary exception so that it fails the one task and cannot stop
    the caller's program. ``kind`` is the name of the exception the task raised.
    """

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(f"task raised {kind}({detail}); only this task failed")

    def __reduce__(self) -> tuple[Any, ...]:
        return (TaskAborted, (self.kind, self.detail), self.__dict__)


class SerializationError(CleanbreakError, pickle.PicklingError):
    """A task's function, arguments, result or exception could not be pickled.

    Only this task fails. ``part`` says which: ``"function"``, ``"arguments"``, ``"result"`` or
    ``"exception"``.
    """

    def __init__(self, part: str, reason: str) -> None:
        self.part = part
        self.reason = reason
        super().__init__(f"the task's {part} could not be pickled: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (SerializationError, (self.part, self.reason), self.__dict__)


class RemoteTraceback(Exception):
    """The traceback of a task's exception, as formatted inside the worker.

    It is attached as ``__cause__`` of the exception the caller receives, so that the
    traceback printed in the parent shows where in the worker the error happened.
    """

    def __init__(self, tb: str) -> None:
        self.tb = tb
        super().__init__(tb)

    def __str__(self) -> str:
        return self.tb


class JournalError(CleanbreakError):
    """The journal cannot be used: a running job holds it, it holds another function's
    results, it is not a journal, it belongs to another user, or it cannot be read. The message
    says what to do."""
