"""The journal at scale: ``cleanbreak run`` over N lines, Ctrl-C'd, then resumed.

    python benchmarks/journal_scale.py 10000000 --stop-after 150

Writes N lines (0 .. N-1) to a file in a scratch folder, runs
``cleanbreak run operator:neg FILE --output OUT --workers 2`` with its journal in that folder
(``XDG_CACHE_HOME``), sends it Ctrl-C (SIGINT to its process group, as a terminal does) after
``--stop-after`` seconds, then runs the same command again to the end. For each run it prints
the exit status, the summary line, and the parent's peak RSS (sampled every 0.5 s with
psutil); at the end, the journal's size and the number of output records (one per input is
expected). Needs psutil (the ``bench`` extra). Figures of 2026-12-03 are in the README
("Resume where you stopped: the journal", Scale).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def _run(folder: Path, source: Path, stop_after: float | None, fresh: bool) -> None:
    argv = [sys.executable, "-m", "cleanbreak", "run", "operator:neg", str(source)]
    argv += ["--output", str(folder / "out.jsonl"), "--workers", "2"]
    if fresh:
        argv.append("--fresh")
    env = dict(os.environ, XDG_CACHE_HOME=str(folder / "cache"))
    proc = subprocess.Popen(
        argv,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    watched = psutil.Process(proc.pid)
    peak = 0
    start = time.monotonic()
    sent = False
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, watched.memory_info().rss)
        if stop_after is not None and not sent and time.monotonic() - start > stop_after:
            os.killpg(proc.pid, signal.SIGINT)
            sent = True
        time.sleep(0.5)
    assert proc.stderr is not None
    lines = proc.stderr.read().strip().splitlines()
    took = time.monotonic() - start
    print(f"exit {proc.returncode} after {took:.0f} s: {lines[-1] if lines else '(no output)'}")
    print(f"  parent's peak RSS: {peak >> 20} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lines", type=int)
    parser.add_argument("--stop-after", type=float, default=150.0, help="seconds before Ctrl-C")
    args = parser.parse_args()
    # A shell may have started this script with SIGINT ignored (a background job), which the
    # run would inherit: it must take Ctrl-C as a terminal's foreground job would. (A handled
    # signal is reset to the default in a new program; an ignored one stays ignored.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="cb-journal-scale-") as tmp:
        folder = Path(tmp)
        source = folder / "in.txt"
        with source.open("w") as f:
            f.writelines(f"{i}\n" for i in range(args.lines))
        _run(folder, source, args.stop_after, fresh=True)
        _run(folder, source, None, fresh=False)
        journals = list((folder / "cache").rglob("*.sqlite"))
        size = sum(p.stat().st_size for p in journals)
        with (folder / "out.jsonl").open() as f:
            records = sum(1 for _ in f)
        print(f"journal: {size >> 20} MB; output records: {records:,} (inputs: {args.lines:,})")


if __name__ == "__main__":
    main()
