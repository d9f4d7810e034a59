"""Run the cleanbreak benchmark suite and print (and save) the results as markdown.

    python benchmarks/run.py                 # everything, about 25 minutes on 2 cores
    python benchmarks/run.py --quick         # a short run, about 3 minutes
    python benchmarks/run.py --only tiny,lazy --workers 4
    python benchmarks/run.py --only dask     # needs distributed (the bench extra has it)

Every measurement and how it is taken is described in benchmarks/README.md. Results go to
stdout and to benchmarks/results.md (or --output); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import compileall
import datetime
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_black
import bench_dask
import bench_failures
import bench_interrupt
import bench_journal
import bench_lazy
import bench_memory
import bench_mpface
import bench_notebook
import bench_oneshot
import bench_parentcpu
import bench_payload
import bench_storage
import bench_throughput
from common import BENCH_DIR, Section, Settings, machine, progress
from libs import LIBRARIES, available, version

MEASUREMENTS: dict[str, tuple[str, Callable[[Settings], Section | list[Section]]]] = {
    "tiny": ("1. tiny tasks: per-call overhead", bench_throughput.run_tiny),
    "tiny-paired": (
        "1b. tiny tasks: Pool.map and multiprocessing.Pool.map in turn, in one process",
        bench_throughput.run_tiny_paired,
    ),
    "ms": ("2. 1 ms tasks: throughput and efficiency", bench_throughput.run_ms),
    "payload": (
        "3. 50 MB results and arguments: MB/s on first use and warm, peak RSS",
        bench_payload.run_payload,
    ),
    "lazy": ("4. endless generator: items pulled ahead", bench_lazy.run_lazy),
    "interrupt": ("5. Ctrl-C and SIGTERM", bench_interrupt.run_interrupt),
    "crash": ("6. a worker SIGKILLed", bench_failures.run_crash),
    "orphans": ("7. the parent SIGKILLed", bench_failures.run_orphans),
    "journal": ("8. the journal's overhead, and joblib Memory's", bench_journal.run_journal),
    "storage": (
        "8c. where a large result is kept: files, SQLite blob I/O, the B-tree",
        bench_storage.run_storage,
    ),
    "dask": ("9. the Dask backend's overhead per task, against Client.map", bench_dask.run_dask),
    "oneshot": ("10. one-shot calls: pool start to last result", bench_oneshot.run_oneshot),
    "parentcpu": ("11. the parent's CPU time per task", bench_parentcpu.run_parentcpu),
    "black": ("12. a real client: black through run_in_executor", bench_black.run_black),
    "notebook": (
        "13. notebook cells: by value against by reference, and the peers in a kernel",
        bench_notebook.run_notebook,
    ),
    "memory": (
        "14. the parent's peak memory while results stream through",
        bench_memory.run_memory,
    ),
    "mpface": (
        "15. the multiprocessing.Pool drop-in beside the stock pool",
        bench_mpface.run_mpface,
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    names = ", ".join(f"{k} ({v[0]})" for k, v in MEASUREMENTS.items())
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Benchmark cleanbreak against multiprocessing, concurrent.futures, loky, "
        "pebble, mpire and joblib.",
    )
    parser.add_argument("--quick", action="store_true", help="a short run (about 3 minutes)")
    parser.add_argument(
        "--only",
        metavar="NAMES",
        help=f"comma-separated measurements to run: {names}",
    )
    parser.add_argument(
        "--workers", type=int, default=2, metavar="N", help="worker processes (default: 2)"
    )
    parser.add_argument(
        "--reps",
        type=int,
        metavar="N",
        help="repetitions of the timed measurements (default: 3, 1 with --quick)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=BENCH_DIR / "results.md",
        metavar="PATH",
        help="where to write the markdown (default: benchmarks/results.md)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in MEASUREMENTS]
        if unknown or not wanted:
            parser.error(
                f"--only: unknown measurement {', '.join(unknown) or '(none)'}; choose from "
                + ", ".join(MEASUREMENTS)
            )
        args.only = wanted
    else:
        args.only = list(MEASUREMENTS)
    return args


def busy_warning(load: tuple[float, ...]) -> str:
    """A warning when something else was using the CPUs as the run started, else ''."""
    if load[0] > 0.5 * len(os.sched_getaffinity(0)):
        return "**the machine was busy: timings are less reliable**"
    return ""


def header(
    settings: Settings, started: datetime.datetime, elapsed: float, load: tuple[float, ...]
) -> str:
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    libraries = ", ".join(
        f"{lib} {version(lib)}" for lib in LIBRARIES if lib != "concurrent.futures"
    )
    missing = [lib for lib in LIBRARIES if not available(lib)]
    lines = [
        "# cleanbreak benchmarks",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M:%S %Z} (took {elapsed / 60:.1f} min)",
        f"- Machine: {machine()}",
        f"- Load average at start: {', '.join(f'{x:.2f}' for x in load)}"
        + (busy_warning(load) and f" ({busy_warning(load)})"),
        f"- Command: `{command}` (run from `{os.getcwd()}`)",
        f"- Workers: {settings.workers}; mode: {'quick' if settings.quick else 'full'}",
        f"- Libraries: {libraries}",
    ]
    if missing:
        lines.append(f"- Not installed (rows left empty): {', '.join(missing)}")
    lines.append("- How each figure is taken: see benchmarks/README.md")
    return "\n".join(lines) + "\n"


def compile_cleanbreak() -> None:
    """Byte-compile cleanbreak's modules, as pip does when it installs a wheel.

    Every peer comes from a wheel, compiled at install. cleanbreak is installed editable from
    ``src/``, so without this each process that imports it (the parent, and every worker that
    spawn or a fork server starts) would compile it from source first, about 27 ms per process
    here, and never cache the result where ``PYTHONDONTWRITEBYTECODE`` is set.
    """
    import cleanbreak

    compileall.compile_dir(os.path.dirname(cleanbreak.__file__), quiet=1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    compile_cleanbreak()
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        # Started in the background by a shell without job control, which ignores SIGINT for
        # it; every child would inherit that and shrug off the Ctrl-C measurements' signal.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    settings = Settings(workers=args.workers, quick=args.quick, reps=args.reps)
    started = datetime.datetime.now().astimezone()
    load = os.getloadavg()
    if busy_warning(load):
        progress(f"warning: load average {load[0]:.2f}: other work on this machine skews timings")
    t0 = time.monotonic()
    sections: list[Section] = []
    for name in args.only:
        title, run = MEASUREMENTS[name]
        progress(f"[{time.monotonic() - t0:5.0f} s] {title}")
        result = run(settings)
        sections.extend(result if isinstance(result, list) else [result])
    elapsed = time.monotonic() - t0
    text = header(settings, started, elapsed, load)
    text += "".join("\n" + section.markdown() for section in sections)
    print(text)
    args.output.write_text(text)
    progress(f"[{elapsed:5.0f} s] written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
