"""Functions for ``cleanbreak run`` in the system tests (``tests/system/test_run.py``).

Each takes one input, as ``cleanbreak run`` passes it. ``logged`` leaves one file per
execution in the folder ``$RUN_LOG`` as it starts (the test's handshake, and its count of how
often each input ran), then works for ``$RUN_SECONDS`` seconds.
"""

from __future__ import annotations

import os
import time
from typing import Any

NOT_A_FUNCTION = 42


def logged(x: int) -> int:
    folder = os.environ["RUN_LOG"]
    with open(os.path.join(folder, f"{x}.{os.getpid()}.{time.monotonic_ns()}"), "w"):
        pass
    seconds = float(os.environ.get("RUN_SECONDS", "0.01"))
    if seconds:
        time.sleep(seconds)
    if isinstance(x, int) and x < 0:
        raise ValueError(f"negative input {x}")
    return x * x


def describe(value: Any) -> dict[str, Any]:
    return {"type": type(value).__name__, "value": value}


def runs_of(folder: str) -> dict[int, int]:
    """How many times each input started, from ``logged``'s files."""
    counts: dict[int, int] = {}
    for name in os.listdir(folder):
        x = int(name.split(".")[0])
        counts[x] = counts.get(x, 0) + 1
    return counts
