"""The ``cleanbreak`` command: ``cleanbreak demo`` runs a CPU-bound job you can stop with Ctrl-C.

``cleanbreak run MODULE:FUNCTION INPUT_FILE`` runs a function over the lines of a file, with a
journal so that the same command resumes; ``cleanbreak status JOURNAL`` shows what a journal
holds. The progress display uses rich when the ``cli`` extra is installed, and plain lines
otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, cast

from . import __version__
from ._errors import BrokenPool, Interrupted, JournalError
from ._journal import Journal, describe_failure
from ._map import MapRun
from ._pool import Pool, default_workers
from ._progress import Counts, Progress

if TYPE_CHECKING:
    from ._pool import OnInterrupt

DEMO_BASE = 10_000_000
DEMO_BLOCK = 10_000


def count_primes(block: int) -> int:
    """Count the primes in one block of integers above ten million, by trial division.

    Deliberately plain Python: about a tenth of a second of pure CPU per block.
    """
    lo = DEMO_BASE + block * DEMO_BLOCK
    found = 0
    for x in range(lo | 1, lo + DEMO_BLOCK, 2):
        if x % 3 == 0:
            continue
        d = 5
        while d * d <= x:
            if x % d == 0 or x % (d + 2) == 0:
                break
            d += 6
        else:
            found += 1
    return found


def _indexed(block: int) -> tuple[int, int]:
    return block, count_primes(block)


# ── running a job: the part that `run` and `demo` share ────────────────────────────────────


class _Job:
    """One run of ``fn`` over ``inputs`` on ``pool``, its outcomes handed to ``write``.

    Results come as they finish (``imap_unordered``'s order), each with its input: the inputs
    read and not yet answered are kept by index, which the run's window bounds.
    """

    def __init__(
        self,
        pool: Pool,
        fn: Callable[[Any], Any],
        inputs: Iterable[Any],
        total: int | None,
        write: Callable[[Any, Any, BaseException | None], None],
        *,
        label: str,
        hint: str | None,
    ) -> None:
        self.pool = pool
        self.fn = fn
        self.inputs = inputs
        self.total = total
        self.write = write
        self.label = label
        self.hint = hint
        self.pending: dict[int, Any] = {}
        self.failed = 0
        self.summary = ""

    def _source(self) -> Iterator[Any]:
        pending = self.pending
        for index, value in enumerate(self.inputs):
            pending[index] = value
            yield value

    def _progress(self, counts: Counts, _total: int | None) -> Progress:
        self._counts = counts
        return Progress(counts, self.total, label=self.label, resume_hint=self.hint)

    def run(self) -> None:
        """Run to the end; Ctrl-C raises ``Interrupted`` (from the pool's ``with`` block)."""
        run = MapRun(
            self.pool,
            self.pool._opts,
            self.fn,
            (self._source(),),
            ordered=False,
            timeout=None,
            chunksize=None,
            buffersize=None,
            journal=self.pool.journal,
            progress=self._progress,
        )
        how = "stopped"
        pending = self.pending
        try:
            while (piece := run.next_piece()) is not None:
                start, values, errors = piece
                count = len(values)
                del piece, values
                current = run.current
                assert current is not None
                for k, value in enumerate(current.take(count), start):
                    exc = errors.get(k - start)
                    if isinstance(exc, BrokenPool):
                        raise exc  # no task can run: one line (see main), not one per task
                    self.write(pending.pop(k), value, exc)
            how = "done"
        except KeyboardInterrupt:
            how = "interrupted"
            raise
        finally:
            self.failed = self._counts()[1]
            run.close(how)

    def keep(self, stop: Interrupted) -> None:
        """After Ctrl-C: write the results that finished and were not written yet."""
        for index, value in stop.completed.items():
            if index in self.pending:
                self.write(self.pending.pop(index), value, None)


def default_journal(target: str, input_path: str | None) -> str:
    """Where ``cleanbreak run`` keeps a job's journal unless told: one file per function and
    input file, in ``$XDG_CACHE_HOME/cleanbreak/journals`` (by default
    ``~/.cache/cleanbreak/journals``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(base, "cleanbreak", "journals")
    source = "<stdin>" if input_path is None else os.path.realpath(input_path)
    digest = hashlib.blake2b(source.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
    name = target.replace(":", ".").replace(os.sep, "_")
    return os.path.join(folder, f"{name}-{digest}.sqlite")


def _open_journal(path: str, *, fresh: bool, skip_failed: bool, make_folder: bool) -> Journal:
    if make_folder:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    return Journal(path, fresh=fresh, skip_failed=skip_failed)


def demo_notebook(path: str, blocks: int) -> int:
    from ._demo_notebook import write

    if os.path.exists(path):
        raise UsageError(f"{path} exists: remove it, or pass another path to --notebook")
    try:
        said = write(path, blocks)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    print(said, flush=True)
    return 0


def demo(workers: int, blocks: int, on_interrupt: str, fresh: bool) -> int:
    path = default_journal("cleanbreak-demo", f"<{blocks} blocks>")
    journal = _open_journal(path, fresh=fresh, skip_failed=False, make_folder=True)
    results: dict[int, int] = {}
    pids: list[int] = []
    started = time.monotonic()
    try:
        with Pool(workers, on_interrupt=_mode(on_interrupt), journal=journal) as pool:
            pids = pool._backend.pids
            done, _failed = journal.counts()
            print(
                f"cleanbreak demo: counting primes in {blocks} blocks of {DEMO_BLOCK:,} integers "
                f"on {workers} workers. Press Ctrl-C at any time.",
                flush=True,
            )
            if done:
                print(
                    f"Resuming: the journal has {min(done, blocks)} of {blocks} blocks done "
                    f"already ({path}); computing the rest.",
                    flush=True,
                )

            def write(_input: Any, value: Any, exc: BaseException | None) -> None:
                if exc is None:
                    block, count = value
                    results[block] = count

            job = _Job(pool, _indexed, range(blocks), blocks, write, label="blocks", hint=None)
            job.run()
    except Interrupted as exc:
        results.update(exc.completed.values())
        took = time.monotonic() - started
        alive = [pid for pid in pids if _alive(pid)]
        workers_left = f"{len(alive)} workers still alive" if alive else "every worker has exited"
        print(
            f"Stopped by {exc.signal.name} after {took:.1f} s: kept {len(results)} of {blocks} "
            f"results ({sum(results.values()):,} primes so far); {workers_left}. Run the same "
            "command to go on from here.",
            flush=True,
        )
        return 128 + int(exc.signal)
    took = time.monotonic() - started
    print(
        f"Done: {sum(results.values()):,} primes in {blocks} blocks, {took:.1f} s on {workers} "
        "workers. The next run starts afresh.",
        flush=True,
    )
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - the pid was reused by another user's process
        return True
    return True


def _mode(on_interrupt: str) -> OnInterrupt:
    return "drain" if on_interrupt == "drain" else "terminate"


# ── cleanbreak run ───────────────────────────────────────────────────────────────────────────


class UsageError(Exception):
    """Bad input to the command: its message is the one line the user sees (exit status 2)."""


def load_function(target: str) -> Callable[[Any], Any]:
    """``module:function`` (the function may be ``Class.method``), imported as ``python -m``
    would, with the current folder on the path."""
    module_name, sep, qualname = target.partition(":")
    if not sep or not module_name or not qualname:
        raise UsageError(
            f"{target!r} is not MODULE:FUNCTION; name the function as, for example, "
            "'mymodule:process'"
        )
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise UsageError(
                f"cannot import module {module_name!r}: there is no {exc.name!r} here; run "
                "from the folder that holds it, or add that folder to PYTHONPATH"
            ) from None
        raise UsageError(f"importing module {module_name!r} failed: {_one_line(exc)}") from None
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise UsageError(f"importing module {module_name!r} failed: {_one_line(exc)}") from None
    obj: Any = module
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(
                f"module {module_name!r} has no function {qualname!r}; check the name after "
                "the colon"
            ) from None
    if not callable(obj):
        raise UsageError(
            f"{target} is a {type(obj).__name__}, not a function; name a function after the colon"
        )
    return cast(Callable[[Any], Any], obj)


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()
    return text[0] if text else type(exc).__name__


def parse_line(line: str) -> Any:
    """One input: the line's JSON value if it parses as JSON, else the line as a string."""
    text = line.rstrip("\r\n")
    try:
        return json.loads(text)
    except ValueError:
        return text


def read_inputs(stream: TextIO) -> Iterator[Any]:
    """The inputs of a file or stdin, one per line; blank lines are skipped."""
    for line in stream:
        if line.strip():
            yield parse_line(line)


def count_inputs(path: str) -> int:
    with open(path, encoding="utf-8") as stream:
        return sum(1 for line in stream if line.strip())


def _jsonable(value: Any) -> Any:
    """For results that JSON cannot write as they are: numpy scalars and arrays as numbers and
    lists, sets as lists, bytes as text, anything else as its repr."""
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    return repr(value)


def error_record(exc: BaseException) -> dict[str, str]:
    kind, message, tb = describe_failure(exc)
    return {"type": kind, "message": message, "traceback": tb}


def _pool(args: argparse.Namespace, journal: Journal) -> Pool:
    """The pool for ``cleanbreak run``: local, or on the Dask cluster of ``--dask``."""
    if args.dask is None:
        return Pool(
            args.workers,
            on_interrupt=_mode(args.on_interrupt),
            task_timeout=args.timeout,
            retries=args.retries,
            journal=journal,
        )
    try:
        return Pool(
            on_interrupt=_mode(args.on_interrupt),
            task_timeout=args.timeout,
            retries=args.retries,
            journal=journal,
            dask=args.dask,
        )
    except (BrokenPool, ImportError) as exc:
        journal.close()
        raise UsageError(str(exc)) from None


def run_command(args: argparse.Namespace) -> int:
    if args.dask is not None and args.workers is not None:
        raise UsageError(
            "--workers is for a local pool; with --dask the cluster's workers run the tasks: "
            "drop --workers"
        )
    fn = load_function(args.target)
    total: int | None = None
    input_path: str | None = None if args.input == "-" else args.input
    if input_path is not None:
        try:
            total = count_inputs(input_path)
        except OSError as exc:
            raise UsageError(
                f"cannot read input file {input_path}: {exc.strerror or exc}; check the path"
            ) from None
        except UnicodeDecodeError as exc:
            raise UsageError(
                f"input file {input_path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                "give one input per line"
            ) from None
    output: TextIO = sys.stdout
    if args.output is not None:
        try:
            output = open(args.output, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise UsageError(
                f"cannot write output file {args.output}: {exc.strerror or exc}; check the path"
            ) from None
    path = args.journal or default_journal(args.target, input_path)
    journal = _open_journal(
        path, fresh=args.fresh, skip_failed=args.skip_failed, make_folder=args.journal is None
    )
    hint = "run the same command to resume"

    def write(value: Any, result: Any, exc: BaseException | None) -> None:
        if exc is None:
            record = {"input": value, "result": result}
        else:
            record = {"input": value, "error": error_record(exc)}
        output.write(json.dumps(record, ensure_ascii=False, default=_jsonable) + "\n")

    stream: TextIO | None = None
    job: _Job | None = None
    try:
        if input_path is not None:
            stream = open(input_path, encoding="utf-8")  # noqa: SIM115
        inputs = read_inputs(stream if stream is not None else sys.stdin)
        with _pool(args, journal) as pool:
            done, failed = journal.counts()
            if total is not None:
                journal.set_meta("total", str(total))
            resumed = f", resuming: {done + failed:,} outcomes recorded" if done + failed else ""
            print(f"cleanbreak: journal {path}{resumed}", file=sys.stderr, flush=True)
            job = _Job(pool, fn, inputs, total, write, label=args.target, hint=hint)
            try:
                job.run()
            except UnicodeDecodeError as exc:
                raise UsageError(
                    f"the input is not UTF-8 text ({exc.reason}); give one input per line"
                ) from None
    except Interrupted as stop:
        if job is not None:
            job.keep(stop)
        return 128 + int(stop.signal)
    finally:
        with contextlib.suppress(OSError):
            output.flush()
        if output is not sys.stdout:
            output.close()
        if stream is not None:
            stream.close()
    if job is not None and job.failed:
        print(
            f"cleanbreak: {job.failed} tasks failed; see their tracebacks with: cleanbreak status "
            f"{shlex.quote(path)}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


def status_command(path: str) -> int:
    info = Journal.status(path)
    print(f"journal:  {info.path}")
    print(f"function: {info.function or '(none yet)'}")
    of = f" of {info.total:,} inputs" if info.total is not None else ""
    print(f"outcomes: {info.done:,} done, {info.failed:,} failed{of}")
    if info.running_pid is not None:
        print(f"a run (pid {info.running_pid}) is writing to it now")
    for n, (kind, message, tb) in enumerate(info.failures, 1):
        print(f"\nfailure {n}: {kind}: {message}")
        print(tb.rstrip("\n"))
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""

    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return whole


_positive_int = _at_least(1)
_count = _at_least(0)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cleanbreak", description="A process pool that stops cleanly.")
    parser.add_argument("--version", action="version", version=f"cleanbreak {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    on_interrupt = {
        "choices": ("terminate", "drain"),
        "default": "terminate",
        "help": "on Ctrl-C, stop running tasks (terminate, the default) or let them finish (drain)",
    }
    run = sub.add_parser(
        "run",
        help="run MODULE:FUNCTION over the lines of INPUT_FILE; run it again to resume",
        description="Run MODULE:FUNCTION once per line of INPUT_FILE ('-' reads stdin). A line "
        "that parses as JSON is passed as that value, any other line as a string; blank lines "
        "are skipped. Each outcome is recorded in a journal, so the same command run again "
        "resumes where it stopped. Exit status: 0 all succeeded, 1 some failed, 2 bad usage, "
        "130 after Ctrl-C, 143 after SIGTERM.",
    )
    run.add_argument("target", metavar="MODULE:FUNCTION", help="the function to run")
    run.add_argument("input", metavar="INPUT_FILE", help="one input per line; '-' reads stdin")
    run.add_argument(
        "--workers", type=_positive_int, default=None, help="worker processes (default: CPUs)"
    )
    run.add_argument(
        "--timeout", type=_seconds, default=None, help="kill a task after this many seconds"
    )
    run.add_argument(
        "--retries",
        type=_count,
        default=0,
        help="retry a task this many times after its worker died or it timed out",
    )
    run.add_argument(
        "--journal",
        metavar="PATH",
        default=None,
        help="the journal file (default: one per function and input file, in "
        "$XDG_CACHE_HOME/cleanbreak/journals)",
    )
    run.add_argument(
        "--output",
        metavar="PATH",
        default=None,
        help="write the JSON Lines records here instead of stdout",
    )
    run.add_argument("--on-interrupt", **on_interrupt)  # type: ignore[arg-type]
    run.add_argument(
        "--dask",
        metavar="ADDRESS",
        default=None,
        help="run the tasks on the Dask cluster whose scheduler is at ADDRESS "
        "(tcp://host:8786; needs the dask extra)",
    )
    run.add_argument(
        "--fresh", action="store_true", help="forget what the journal holds and start over"
    )
    run.add_argument(
        "--skip-failed",
        action="store_true",
        help="keep the failures the journal recorded instead of running those tasks again",
    )
    status = sub.add_parser(
        "status", help="show what a journal holds: counts, and each failure with its traceback"
    )
    status.add_argument("journal", metavar="JOURNAL", help="the journal file")
    run_demo = sub.add_parser(
        "demo", help="run a CPU-bound job on all cores; press Ctrl-C, then run it again to resume"
    )
    run_demo.add_argument(
        "--workers", type=_positive_int, default=None, help="worker processes (default: CPUs)"
    )
    run_demo.add_argument(
        "--blocks", type=_positive_int, default=300, help="how many tasks (default: 300)"
    )
    run_demo.add_argument("--on-interrupt", **on_interrupt)  # type: ignore[arg-type]
    run_demo.add_argument(
        "--fresh", action="store_true", help="start over instead of resuming a stopped demo"
    )
    run_demo.add_argument(
        "--notebook",
        nargs="?",
        const="cleanbreak-demo.ipynb",
        default=None,
        metavar="PATH",
        help="write the demo as a Jupyter notebook instead (default: cleanbreak-demo.ipynb), "
        "to run its cells and press the interrupt button",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo" and args.notebook is not None:
            return demo_notebook(args.notebook, args.blocks)
        if args.command == "demo":
            return demo(
                args.workers or default_workers(), args.blocks, args.on_interrupt, args.fresh
            )
        if args.command == "run":
            return run_command(args)
        if args.command == "status":
            return status_command(args.journal)
    except (UsageError, JournalError) as exc:
        print(f"cleanbreak {args.command}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except BrokenPool as exc:
        print(f"cleanbreak {args.command}: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 1
    except Interrupted as exc:  # before any task ran
        return 128 + int(exc.signal)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away (``cleanbreak run ... | head``): stop quietly, as
        # a command killed by SIGPIPE would. What finished is in the journal.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    parser.print_help()
    return 2
