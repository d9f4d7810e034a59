"""What a worker cannot import still runs: it goes by value (cloudpickle).

Lambdas, closures, local functions and classes, and everything a notebook cell, the REPL,
``python -c`` or a script read from stdin defines, run under every start method; an importable
function still goes by reference, the same bytes as plain pickle; a function goes to each
worker once, not with every chunk. The notebook itself is tested through a real kernel in
``tests/system/test_notebook.py``.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import pickle
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import cleanbreak
from cleanbreak import _byvalue
from tests import tasks
from tests.tasks import GUARD

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("forkserver", "spawn", "fork")


def test_lambdas_closures_and_local_functions_run(pool: cleanbreak.Pool) -> None:
    k = 5

    def times_k(x: int) -> int:
        return x * k

    assert pool.submit(lambda x: x + 1, 1).result(timeout=GUARD) == 2
    assert list(pool.map(times_k, range(6), timeout=GUARD)) == [0, 5, 10, 15, 20, 25]
    assert sorted(pool.imap_unordered(lambda x: -x, range(5))) == [-4, -3, -2, -1, 0]
    assert pool.submit(lambda: k).result(timeout=GUARD) == 5  # a closure's cell


def test_a_function_sent_by_value_takes_what_it_uses_anew_once_that_changes(
    pool: cleanbreak.Pool,
) -> None:
    # As a notebook user sets a parameter again in a cell and runs the map again on a pool
    # held across cells: the workers hold the function from the first run, with a copy of
    # what it used then; that copy must not be used once what it copied is another object.
    k = 2

    def times_k(x: int) -> int:
        return x * k

    assert list(pool.map(times_k, range(4), timeout=GUARD)) == [0, 2, 4, 6]
    k = 3  # a closure's cell, set again
    assert list(pool.map(times_k, range(4), timeout=GUARD)) == [0, 3, 6, 9]
    assert pool.submit(times_k, 1).result(timeout=GUARD) == 3
    # A global of a module no worker can import (a cell's), and a function it calls.
    cell: dict[str, Any] = {"__name__": "a_cell"}
    exec("k = 2\ndef g(x): return x\ndef f(x): return g(x) * k", cell)
    f = cell["f"]
    assert list(pool.map(f, range(3), timeout=GUARD)) == [0, 2, 4]
    cell["k"] = 10
    assert list(pool.map(f, range(3), timeout=GUARD)) == [0, 10, 20]
    exec("def g(x): return -x", cell)
    assert pool.submit(f, 1).result(timeout=GUARD) == -10


class _Model:
    """An object a task function holds (a model, a table), known by a weak reference."""

    def __init__(self, n: int) -> None:
        self.n = n

    def add(self, x: int) -> int:
        return x + self.n


def _add(model: _Model, x: int) -> int:
    return x + model.n


def _using(model: _Model) -> Callable[[int], int]:
    """A closure over ``model``: it goes by value, with the object in what its copy took. It
    calls itself (its own cell holds it), as a recursive function does."""

    def run(x: int) -> int:
        return model.add(x) if x >= 0 else -run(-x)

    return run


def test_a_pool_does_not_keep_alive_what_its_functions_held(pool: cleanbreak.Pool) -> None:
    # A pool held across a notebook's cells, or a script's loop: a bound method, a partial or
    # a closure brings its object to each map; once the user lets it go, so does the pool.
    made = [_Model(1), _Model(2), _Model(3)]
    refs = [weakref.ref(h) for h in made]
    assert list(pool.map(made[0].add, range(3), timeout=GUARD)) == [1, 2, 3]
    assert list(pool.map(functools.partial(_add, made[1]), range(3), timeout=GUARD)) == [2, 3, 4]
    closure = _using(made[2])
    assert pool.submit(closure, 1).result(timeout=GUARD) == 4
    del made, closure
    gc.collect()
    assert [r() for r in refs[:2]] == [None, None]
    # What a copy by value took goes with the next look (the function died between two).
    assert list(pool.map(abs, [-1, -2], timeout=GUARD)) == [1, 2]  # a builtin: held
    assert list(pool.map(abs, [-3], timeout=GUARD)) == [3]
    assert refs[2]() is None


@pytest.mark.parametrize("method", METHODS)
def test_a_worker_lets_go_of_its_copies_of_functions_the_user_let_go(method: str) -> None:
    # A notebook's cell run again and again on a held pool: each run's function is another
    # object, with its own copy of the object it uses, and the worker's copies of the earlier
    # ones go as those functions do (it would otherwise hold its last 16).
    with cleanbreak.Pool(1, mp_context=method) as pool:
        for n in range(5):
            run = _using(_Model(n))
            assert list(pool.map(run, range(2), timeout=GUARD)) == [n, n + 1]
            assert list(pool.map(functools.partial(_add, _Model(n)), [0], timeout=GUARD)) == [n]
        gc.collect()  # (each run calls itself: a cycle, which only a collection frees)
        assert pool.submit(tasks.live, "_Model").result(timeout=GUARD) == 1  # the last run's
        del run
        gc.collect()
        assert pool.submit(tasks.live, "_Model").result(timeout=GUARD) == 0


def test_a_local_class_travels_both_ways_and_stays_itself(pool: cleanbreak.Pool) -> None:
    class Point:
        def __init__(self, x: int) -> None:
            self.x = x

    def shift(p: Point) -> Point:
        return Point(p.x + 1)

    out = list(pool.map(shift, [Point(i) for i in range(4)], timeout=GUARD))
    assert [p.x for p in out] == [1, 2, 3, 4]
    # The class came back as the caller's own, not as a copy made in the worker.
    assert all(type(p) is Point for p in out)


def test_a_local_exception_class_reaches_the_caller_as_itself(pool: cleanbreak.Pool) -> None:
    class Oops(ValueError):
        pass

    def fail(x: int) -> int:
        raise Oops(f"bad {x}")

    with pytest.raises(Oops, match="bad 3") as info:
        pool.submit(fail, 3).result(timeout=GUARD)
    assert isinstance(info.value.__cause__, cleanbreak.RemoteTraceback)
    assert "fail" in str(info.value.__cause__)


def test_an_importable_function_goes_by_reference() -> None:
    # The pickler that sends by value gives importable functions the very bytes plain
    # pickle gives: the worker imports them, as before.
    for fn in (tasks.square, os.getpid, pickle.dumps):
        assert _byvalue.dumps(fn) == pickle.dumps(fn, _byvalue.PROTOCOL)


def test_which_main_modules_a_worker_runs_again(tmp_path: Path) -> None:
    # What multiprocessing runs again in a worker it starts by spawn or a fork server: a
    # script, or a module run with -m; not -c, stdin, nor a package's __main__.
    probe = "from cleanbreak._byvalue import main_importable; print(main_importable())"
    (tmp_path / "script.py").write_text(probe)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "__main__.py").write_text(probe)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(tmp_path)])}
    cases = {
        "script": ([sys.executable, str(tmp_path / "script.py")], None, "True"),
        "-m module": ([sys.executable, "-m", "script"], None, "True"),
        "-m package": ([sys.executable, "-m", "pkg"], None, "False"),
        "-c": ([sys.executable, "-c", probe], None, "False"),
        "stdin": ([sys.executable, "-"], probe, "False"),
    }
    for name, (argv, stdin, expected) in cases.items():
        proc = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, env=env, cwd=tmp_path, check=True
        )
        assert proc.stdout.strip() == expected, name


def _run_script(argv: list[str], stdin: str | None = None, cwd: Path = ROOT) -> Any:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    proc = subprocess.run(
        argv,
        check=False,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=GUARD * 2,
        cwd=cwd,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # no worker printed anything
    return json.loads(proc.stdout.strip().splitlines()[-1])


# What a user types at the REPL, in `python -c` or pipes to `python -`: nothing of it is a file
# that a worker could import. The initializer is one of them too.
INTERACTIVE = textwrap.dedent(
    """
    import json, sys
    import cleanbreak

    def square(x):
        return x * x

    class Box:
        def __init__(self, v):
            self.v = v

    def unbox(b):
        return Box(b.v * 10)

    seen = []

    def init(tag):
        seen.append(tag)

    def tagged(x):
        return (x, seen)

    method = sys.argv[1]
    k = 3
    out = {
        "map": cleanbreak.map(square, range(6), workers=2, mp_context=method),
        "lambda": cleanbreak.map(lambda x: x + k, range(4), workers=2, mp_context=method),
    }
    with cleanbreak.Pool(2, mp_context=method, initializer=init, initargs=("hi",)) as pool:
        out["submit"] = pool.submit(square, 7).result()
        boxes = list(pool.map(unbox, [Box(i) for i in range(3)]))
        out["class"] = [[type(b) is Box, b.v] for b in boxes]
        out["init"] = pool.submit(tagged, 1).result()
    print(json.dumps(out))
    """
)
EXPECTED = {
    "map": [0, 1, 4, 9, 16, 25],
    "lambda": [3, 4, 5, 6],
    "submit": 49,
    "class": [[True, 0], [True, 10], [True, 20]],
    # The initializer and the task went by value apart, so each has its own copy of the
    # globals it uses (see _byvalue): the task does not see what the initializer appended.
    "init": [1, []],
}


@pytest.mark.parametrize("method", METHODS)
def test_python_c_runs_what_it_defines(method: str) -> None:
    out = _run_script([sys.executable, "-c", INTERACTIVE, method])
    assert out == EXPECTED


@pytest.mark.parametrize("method", METHODS)
def test_a_script_read_from_stdin_runs_what_it_defines(method: str) -> None:
    # multiprocessing itself would make every spawn or forkserver worker run "<stdin>" as a
    # file, and die: cleanbreak leaves a main module that is no file out.
    out = _run_script([sys.executable, "-", method], stdin=INTERACTIVE)
    assert out == EXPECTED


# In `python -c` (as in a notebook or the REPL) no worker can import the main module, so
# what is of it goes by value; what is not still goes as plain pickle sends it.
MAINLESS = textwrap.dedent(
    """
    import functools, json, operator, sys
    import cleanbreak
    from tests import tasks

    def f(x):
        return ("old", x)

    class Box:
        def __init__(self, v):
            self.v = v
        def get(self):
            return ("old", self.v)

    class Bag(dict):
        pass

    DATA = [None, True, 1.5, 2**80, "s", b"b", (1, [2]), {3: {4}}, frozenset({5}), bytearray(b"x")]
    pool = cleanbreak.Pool(2, mp_context=sys.argv[1])  # a forked worker has the old ones
    plain = {
        "map": list(pool.map(operator.neg, range(6), chunksize=2)),
        "star": list(pool.map(tasks.combine, [1, 2], [10, 20])),
        "submit": pool.submit(tasks.combine, 1, 2, scale=3).result(),
        "data": repr(pool.submit(tasks.identity, DATA).result()),
    }
    parent_plain = "cloudpickle" in sys.modules
    workers_plain = any(pool.map(tasks.imported, ["cloudpickle"] * 8, chunksize=1))

    def f(x):  # redefined, as at the REPL: the workers must run these, not the old ones
        return ("new", x)

    class Box:
        def __init__(self, v):
            self.v = v
        def get(self):
            return ("new", self.v)

    class Bag(dict):
        def __reduce__(self):
            return (f, (dict(self),))

    main = {
        "function": list(pool.map(f, range(2))),
        "partial": pool.submit(functools.partial(f, 5)).result(),
        "nested": pool.submit(tasks.star, (f, (7,))).result(),
        "method": pool.submit(Box(2).get).result(),
        "argument": list(pool.map(operator.methodcaller("get"), [Box(3)])),
        "reduce": pool.submit(tasks.identity, Bag(a=1)).result(),
    }
    pool.shutdown()
    print(json.dumps([plain, parent_plain, workers_plain, main]))
    """
)


@pytest.mark.parametrize("method", METHODS)
def test_with_no_main_module_only_what_is_of_it_goes_by_value(method: str) -> None:
    plain, parent_plain, workers_plain, main = _run_script([sys.executable, "-c", MAINLESS, method])
    assert plain == {
        "map": [0, -1, -2, -3, -4, -5],
        "star": [11, 22],
        "submit": 9,
        "data": repr(
            [None, True, 1.5, 2**80, "s", b"b", (1, [2]), {3: {4}}, frozenset({5}), bytearray(b"x")]
        ),
    }
    # Importable functions and plain data went as plain pickle sends them: nobody imported
    # cloudpickle for them (a fork server preloads it where the main module is not
    # importable, once for all its workers: see _manager._start_fork_server).
    assert parent_plain is False
    assert workers_plain is (method == "forkserver")
    # Everything of __main__ went by value, wherever it was: the workers ran what the caller
    # has now (a forked worker holds the old ones under the same names).
    assert main == {
        "function": [["new", 0], ["new", 1]],
        "partial": ["new", 5],
        "nested": ["new", 7],
        "method": ["new", 2],
        "argument": [["new", 3]],
        "reduce": ["new", {"a": 1}],
    }


GUARDED = textwrap.dedent(
    """
    import json, operator, sys
    import cleanbreak

    if __name__ == "__main__":
        # Defined under the guard: a worker that runs this file again (spawn, forkserver)
        # does not define them, and a forked worker was forked before they were.
        method = sys.argv[1]
        pool = cleanbreak.Pool(2, mp_context=method)

        def triple(x):
            return x * 3

        class Tag:
            def __init__(self, v):
                self.v = v

        out = {
            "submit": pool.submit(triple, 2).result(),
            "map": list(pool.map(triple, range(5), chunksize=2)),
            "arguments": [t.v for t in pool.map(operator.itemgetter(0), [(Tag(i),) for i in
                          range(3)])],
        }
        pool.shutdown()
        print(json.dumps(out))
    """
)


@pytest.mark.parametrize("method", METHODS)
def test_a_script_name_a_worker_lacks_is_sent_again_by_value(method: str, tmp_path: Path) -> None:
    script = tmp_path / "guarded.py"
    script.write_text(GUARDED)
    out = _run_script([sys.executable, str(script), method], cwd=tmp_path)
    assert out == {"submit": 6, "map": [0, 3, 6, 9, 12], "arguments": [0, 1, 2]}


ONCE = textwrap.dedent(
    """
    import json, os, sys
    import cleanbreak

    log = sys.argv[2]

    class Counted:
        # Unpickling it records the process that did: once per copy of the function.
        def __reduce__(self):
            return (loaded, (log,))

    def loaded(path):
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\\n")
        return Counted()

    marker = Counted()

    def work(x):
        marker  # the function holds it, so loading the function loads it
        return os.getpid()

    with cleanbreak.Pool(2, mp_context=sys.argv[1]) as pool:
        pids = list(pool.map(work, range(40), chunksize=1))
        pids += [pool.submit(work, i).result() for i in range(10)]
    print(json.dumps(pids))
    """
)


@pytest.mark.parametrize("method", METHODS)
def test_a_function_goes_to_each_worker_once(method: str, tmp_path: Path) -> None:
    log = tmp_path / "loads.txt"
    pids = _run_script([sys.executable, "-c", ONCE, method, str(log)])
    loads = [int(line) for line in log.read_text().split()]
    # 50 units of one function: it was unpickled once in each worker that ran any.
    assert sorted(loads) == sorted(set(pids))


def test_without_cloudpickle_what_must_go_by_value_fails_with_the_fix(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import json, operator, sys
        sys.modules["cloudpickle"] = None  # as if it were not installed
        import cleanbreak

        with cleanbreak.Pool(2, mp_context="spawn") as pool:
            fine = pool.submit(operator.neg, 2).result()  # importable: it still goes
            error = pool.submit(lambda: 1).exception()
        print(json.dumps([fine, type(error).__name__, str(error)]))
        """
    )
    fine, kind, message = _run_script([sys.executable, "-c", code])
    assert fine == -2
    assert kind == "SerializationError"
    assert "pip install cloudpickle" in message
