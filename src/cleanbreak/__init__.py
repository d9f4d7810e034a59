"""cleanbreak: a process pool for CPU-bound Python that stops cleanly.

Press Ctrl-C and nothing new starts, the workers are reaped, and every finished result is kept.
"""

from typing import TYPE_CHECKING, Any

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
from ._pool import Pool, TaskOptionsView, default_workers, map
from ._units import TaskOptions

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

if TYPE_CHECKING:
    from ._journal import Journal, JournalStatus


def __getattr__(name: str) -> Any:
    # The journal (and sqlite3) is imported on first use, not with the package.
    if name in ("Journal", "JournalStatus"):
        from . import _journal

        return getattr(_journal, name)
    raise AttributeError(f"module 'cleanbreak' has no attribute {name!r}")
