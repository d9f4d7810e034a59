"""Run flake8, unmodified, with cleanbreak's drop-in in ``multiprocessing.Pool``'s place
(flake8's ``-j`` mode drives ``multiprocessing.Pool``: an initializer, ``imap_unordered``,
``close``/``join``, and ``terminate`` on the way out of an error or a Ctrl-C).

    python benchmarks/flake8_dropin.py -j2 PATH...    # as `python -m flake8 -j2 PATH...`
"""

import multiprocessing
import sys

import cleanbreak.multiprocessing

multiprocessing.Pool = cleanbreak.multiprocessing.Pool  # type: ignore[assignment]  # the change

from flake8.main.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
