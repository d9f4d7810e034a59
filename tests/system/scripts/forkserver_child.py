"""Ctrl-C reaches the process group while the fork server starts, right after cleanbreak's
last preload module (``forkserver_park.py`` sends it). The pool gives ``Interrupted``; then a
plain ``multiprocessing`` process from the same fork server reports whether it starts with
Python's own SIGINT handler. Prints ``default`` or the handler found, exits 130; stderr must
be empty. Run it from the repository's root: the fork server finds its preload modules
through the current directory (before Python 3.13.8 it does not import the main module)."""

from __future__ import annotations

import multiprocessing
import signal
import sys
from multiprocessing import forkserver
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import cleanbreak
from tests.tasks import square

_set_preload = forkserver.set_forkserver_preload


def _park_after_ours(modules: list[str]) -> None:
    if modules and modules[-1] == "cleanbreak._forkserver_start":
        modules = [*modules, "tests.system.scripts.forkserver_park"]
    _set_preload(modules)


def _report_handler(conn: Connection) -> None:
    handler = signal.getsignal(signal.SIGINT)
    conn.send("default" if handler is signal.default_int_handler else repr(handler))


if __name__ == "__main__":
    forkserver.set_forkserver_preload = _park_after_ours  # type: ignore[assignment]
    code = 0
    try:
        with cleanbreak.Pool(1, mp_context="forkserver") as pool:
            list(pool.map(square, range(4)))
    except cleanbreak.Interrupted:
        code = 130
    ctx = multiprocessing.get_context("forkserver")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_report_handler, args=(theirs,))
    proc.start()
    print(ours.recv())
    proc.join()
    sys.exit(code)
