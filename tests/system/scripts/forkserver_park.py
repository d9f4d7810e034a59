"""A preload module of the fork server, imported right after ``cleanbreak._forkserver_start``
(``forkserver_child.py`` puts it there): it sends Ctrl-C to its own process group, as a
terminal would, at the moment the fork server has just unblocked SIGINT and SIGTERM."""

import os
import signal

os.killpg(os.getpgrp(), signal.SIGINT)
