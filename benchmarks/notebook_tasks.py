"""The task functions of measurement 13, in each form that decides how cleanbreak sends them.

- ``inc`` and ``busy_1ms`` here, at the top of an importable module: they go *by reference*
  (module and name; plain pickle), cleanbreak's fast path.
- ``nested()``: the same functions defined inside a function, which nothing can import by name
  (as a closure or a lambda in a script): they go *by value* (cloudpickle).
- ``source()``: the same functions as text, which a ``python -c`` child runs in its own
  ``__main__``. ``python -c`` has no main module that a worker could import (nor has a notebook,
  the REPL or a script read from stdin), so they go *by value* there, as a notebook cell's do.

The bodies are the same text in all three, so the work per task is the same; only the way the
function travels differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

JOBS = ("inc", "busy_1ms")


def inc(x: int) -> int:
    return x + 1


def busy_1ms(x: int) -> int:
    end = time.perf_counter() + 0.001
    while time.perf_counter() < end:
        pass
    return x


def source() -> str:
    """The functions' definitions, as a ``python -c`` script (or a cell) would hold them."""
    import inspect  # here, not at the top: a script's workers import this module again
    import textwrap

    return "import time\n\n\n" + "\n\n".join(
        textwrap.dedent(inspect.getsource(f)) for f in (inc, busy_1ms)
    )


def nested() -> dict[str, Callable[[Any], Any]]:
    """The same functions, defined inside this function: not importable by name."""

    def inc(x: int) -> int:
        return x + 1

    def busy_1ms(x: int) -> int:
        end = time.perf_counter() + 0.001
        while time.perf_counter() < end:
            pass
        return x

    return {"inc": inc, "busy_1ms": busy_1ms}
