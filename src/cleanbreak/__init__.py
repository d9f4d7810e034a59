"""cleanbreak: a process pool for CPU-bound Python that stops cleanly.

Press Ctrl-C and nothing new starts, the workers are reaped, and every finished result is kept.
"""

from __future__ import annotations

import importlib
import signal as _signal

from . import _signals
from ._errors import (
    BrokenPool,
    CleanbreakError,
    Interrupted,
    JournalError,
    RemoteTraceback,
    SerializationError,
    TaskAborted,
    TaskTimeout,
    WorkerDied,
)

__all__ = [
    "BrokenPool",
    "CleanbreakError",
    "Interrupted",
    "Journal",
    "JournalError",
    "JournalStatus",
    "Pool",
    "RemoteTraceback",
    "SerializationError",
    "TaskAborted",
    "TaskOptions",
    "TaskOptionsView",
    "TaskTimeout",
    "WorkerDied",
    "__version__",
    "default_workers",
    "map",
]

__version__ = "0.1.0"

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see _notyping)
if TYPE_CHECKING:
    from typing import Any

    from ._journal import Journal, JournalStatus
    from ._pool import Pool, TaskOptionsView, default_workers, map
    from ._units import TaskOptions

# Imported on first use, not with the package: a worker that spawn or a fork server starts
# imports the package to reach ``_worker``, and needs none of the pool's own modules (about
# 8 ms there); the journal brings in sqlite3.
_LAZY = {
    "Journal": "_journal",
    "JournalStatus": "_journal",
    "Pool": "_pool",
    "TaskOptions": "_units",
    "TaskOptionsView": "_pool",
    "default_workers": "_pool",
    "map": "_pool",
}


# The names whose first touch is a call that makes a pool: a Ctrl-C while their modules are
# imported is the pool's (see _signals.collecting).
_STARTS_A_POOL = frozenset({"Pool", "map"})


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cleanbreak' has no attribute {name!r}")
    if name not in _STARTS_A_POOL:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value
    caught: list[_signal.Signals] = []
    try:
        with _signals.collecting() as caught:
            value = getattr(importlib.import_module(f".{module}", __name__), name)
            globals()[name] = value
    except BaseException as exc:
        # A plain KeyboardInterrupt (SIGINT's default handler, in the instants before ours is
        # in place), or a failed import once a signal was recorded: Interrupted, as a moment
        # later in the pool's call.
        outcome = _signals.window_outcome(exc, caught)
        if outcome is exc:
            raise
        raise outcome from None
    if caught:
        raise _signals.early_interrupt(caught[0])
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
