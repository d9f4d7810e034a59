"""Imported by the fork server as it starts, as the last of its preload modules.

cleanbreak starts the fork server with SIGINT and SIGTERM blocked: a Ctrl-C to the process
group that came while the new interpreter starts up, or while it imports the main module,
would otherwise kill it with a ``KeyboardInterrupt`` traceback on the terminal. Here, after
those imports, both are unblocked with their handlers set to ignore them, so that a signal
still pending is dropped.

- SIGTERM's handler is put back at once: its default action ends the process without a word.
- SIGINT stays ignored. The fork server's ``main`` ignores it too, a few instructions later,
  and until then a Ctrl-C would raise ``KeyboardInterrupt`` in whatever runs, this module's
  own import included ("Exception ignored in ... _get_module_lock"). ``main`` records the
  handler it found as the one each child it forks gets back, so that record is corrected
  in the child: the processes the fork server forks for anyone start with the handler a
  process normally has.

It also imports what each of our workers would otherwise import as it starts (about 6 ms
each): the worker's own modules, ``multiprocessing.heap`` for the pool's gate,
``popen_forkserver``, and ``pkgutil``, which ``runpy`` takes to run the main module. The fork
server's children have them already.
"""

from __future__ import annotations

import multiprocessing.heap
import multiprocessing.popen_forkserver  # noqa: F401
import pkgutil  # noqa: F401
import signal
from multiprocessing import forkserver

import cleanbreak._worker  # noqa: F401

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see _notyping)
if TYPE_CHECKING:
    from typing import Any

_HANDLED = (signal.SIGINT, signal.SIGTERM)
_previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _HANDLED}
signal.pthread_sigmask(signal.SIG_UNBLOCK, set(_HANDLED))
signal.signal(signal.SIGTERM, _previous[signal.SIGTERM])

_serve_one = getattr(forkserver, "_serve_one", None)


def _serve_one_as_started(*args: Any) -> Any:
    """``forkserver._serve_one(child_r, fds, unused_fds, handlers)`` with the SIGINT handler
    the fork server had before this module ignored it."""
    handlers = args[-1]
    if isinstance(handlers, dict) and handlers.get(signal.SIGINT) is signal.SIG_IGN:
        args = (*args[:-1], {**handlers, signal.SIGINT: _previous[signal.SIGINT]})
    assert _serve_one is not None
    return _serve_one(*args)


if _serve_one is None:  # pragma: no cover - a Python whose fork server is built otherwise
    signal.signal(signal.SIGINT, _previous[signal.SIGINT])
else:
    forkserver._serve_one = _serve_one_as_started  # type: ignore[attr-defined]
