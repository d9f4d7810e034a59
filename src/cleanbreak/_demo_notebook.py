"""``cleanbreak demo --notebook``: the demo as a Jupyter notebook, to run cell by cell.

The notebook defines its task in a cell (it goes to the workers by value), holds a pool in a
variable with a journal, and runs the job with a live progress display. Pressing the
interrupt button stops it at once and keeps what finished; running the cell again finishes the
job, taking what the journal has without computing it again.
"""

from __future__ import annotations

import json
import os

from . import __version__

INTRO = """\
# cleanbreak in a notebook

Run the cells in order. While the job cell runs, press the **interrupt button** (■, or
*Kernel → Interrupt*): nothing new starts, the workers stop at once, and every block that had
finished is kept, in `results` and in the journal on disk. Run the job cell again and it goes
on from where it stopped: the journal gives back what is done, and only the rest runs.
"""

TASK = '''\
import cleanbreak


def count_primes(block):
    """The primes in one block of 10,000 integers above ten million: about 0.1 s of CPU."""
    lo = 10_000_000 + block * 10_000
    found = 0
    for x in range(lo | 1, lo + 10_000, 2):
        if x % 3 == 0:
            continue
        d = 5
        while d * d <= x:
            if x % d == 0 or x % (d + 2) == 0:
                break
            d += 6
        else:
            found += 1
    return block, found'''

POOL = """\
# A pool held in a variable lives from cell to cell, and on after an interrupt.
pool = cleanbreak.Pool(journal={journal!r})"""

JOB = """\
results = {{}}
try:
    for block, primes in pool.imap_unordered(count_primes, range({blocks}), progress=True):
        results[block] = primes
except cleanbreak.Interrupted as stop:
    results.update(stop.completed.values())  # finished, not yet handed over: kept too
    print(f"Stopped: kept {{len(results)}} of {blocks} blocks. Run this cell again to finish.")
else:
    print(f"All {blocks} blocks: {{sum(results.values()):,}} primes.")"""

AFTER = """\
Left uncaught, the interrupt ends a cell with one line, `Interrupted: ... results kept in
.completed`, and the exception, with its results, stays in `sys.last_value` (`sys.last_exc` on
Python 3.12 and later). `cleanbreak.map(...)` keeps every finished result in
`.completed`; futures from `pool.submit(...)` keep their own.
"""

END = """\
pool.shutdown()  # or leave it: the workers go when the kernel does"""


def notebook(blocks: int, journal: str) -> dict[str, object]:
    """The notebook, as nbformat 4 JSON."""

    def cell(name: str, kind: str, source: str) -> dict[str, object]:
        out: dict[str, object] = {"cell_type": kind, "id": name, "metadata": {}, "source": source}
        if kind == "code":
            out.update(execution_count=None, outputs=[])
        return out

    return {
        "cells": [
            cell("intro", "markdown", INTRO),
            cell("task", "code", TASK),
            cell("pool", "code", POOL.format(journal=journal)),
            cell("job", "code", JOB.format(blocks=blocks)),
            cell("after", "markdown", AFTER),
            cell("end", "code", END),
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
            "cleanbreak": {"version": __version__},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def write(path: str, blocks: int) -> str:
    """Write the demo notebook to ``path``, its journal beside it; a line saying what to do."""
    journal = os.path.splitext(os.path.basename(path))[0] + ".sqlite"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(notebook(blocks, journal), f, indent=1)
        f.write("\n")
    return (
        f"wrote {path}: open it in Jupyter (`jupyter lab {path}`, or VS Code), run its cells, "
        "and press the interrupt button while the job runs"
    )
