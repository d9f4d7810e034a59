"""Imported by the fork server as it starts, as the last of its preload modules.

cleanbreak starts the fork server with SIGINT and SIGTERM blocked: a Ctrl-C to the process
group that came while the new interpreter starts up, or while it imports the main module,
would otherwise kill it with a ``KeyboardInterrupt`` traceback on the terminal. Here, after
those imports, both are unblocked with their handlers set to ignore them for that moment, so
that a signal still pending is dropped; then the handlers are put back. The fork server's
``main`` ignores SIGINT a few instructions later, and the processes it forks for anyone start
with the mask and handlers a process normally has.
"""

import signal

_HANDLED = (signal.SIGINT, signal.SIGTERM)
_previous = [signal.signal(sig, signal.SIG_IGN) for sig in _HANDLED]
signal.pthread_sigmask(signal.SIG_UNBLOCK, set(_HANDLED))
for _sig, _handler in zip(_HANDLED, _previous, strict=True):
    signal.signal(_sig, _handler)
