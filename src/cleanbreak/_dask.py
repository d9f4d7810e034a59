"""The Dask backend: the same ``Pool`` on a ``dask.distributed`` cluster.

``Pool(dask="tcp://scheduler:8786")`` (or a ``distributed.Client``) puts a ``DaskBackend``
behind the pool instead of the local processes. ``Pool``, its signal policy, ``map``'s window
and the journal do not change: they talk to a ``Backend`` (``_units``), which this module
implements a second time.

How it keeps cleanbreak's promises on a cluster, where a thread in a worker cannot be killed:

- *No task starts after the signal.* Each unit runs on a worker as ``run_unit``, which reads a
  per-pool gate before each item. On Ctrl-C the backend broadcasts ``stop_units`` to every
  worker (``Client.run``, outside the task queue, so it is not held up behind tasks): it closes
  the gate there. Units waiting in the scheduler's queue find it closed when they start, and
  return at once.
- *Running tasks stop (terminate)*: ``stop_units`` also raises ``_Stop`` in the threads
  running this pool's items (``PyThreadState_SetAsyncExc``, the thread-level twin of the local
  worker's SIGTERM handler). The unit returns the items it had finished, so they are kept. Code
  stuck in C (a long numpy call, a ``sleep``) sees the exception only once it returns to
  Python: after ``STOP_GRACE`` seconds the backend kills the worker processes still running
  its items, through their nanny (which starts new ones; from the nanny, since a worker in C
  code that holds the GIL runs nothing itself), once it has fetched the results those workers hold
  of units that had finished, and taken the values of the items the running units had
  finished (``take_finished``). Workers without a nanny cannot be restarted, so they
  are left to finish the item, whose result is discarded.
- *Drain* closes the gate only: running items finish, their results are kept.
- Only ``2 * threads`` units are submitted at a time, so a stop has little to cancel, and an
  endless input stays bounded (``map``'s window bounds what is read).
- The cluster is left running for its other users; a ``Client`` the pool made is closed.

By value: the cluster need not have the user's own code. Since distributed 2023.4 the scheduler
unpickles each task, and a worker that cannot unpickle one ends. So each function is judged
once per pool (``needs_value``): one that plain pickle cannot send (a lambda, a closure, a
notebook's or ``python -c``'s function) or that names anything of the user's own modules
(``is_local``: ``__main__``, and Python files outside the standard library and site-packages)
goes *packed*: pickled here by cloudpickle with those modules by value (``dumps_by_value``), as
are its units' items; ``run_unit`` unpickles the function once per worker process (by its
digest), the items per unit, and sends the results back pickled the same way, so an instance of
the user's class travels both ways. The scheduler sees bytes only. A payload up to
``INLINE_LIMIT`` travels inline with each unit (as cheap as a dependency, measured); a larger
one becomes the result of a task of its own, made once per pool, which Dask copies to each
worker that needs it, once. Anything else (the standard library, installed packages) goes as
before, as it is, Dask pickling it into the graph by reference; should the scheduler fail to
unpickle such a task (its arguments hold an object of the user's module), that function goes
packed from then on. What cannot be shipped fails once, with one line that says what to do:
every unit of that function fails with the same ``BrokenPool`` (a function that does not pickle
by value, a module the workers lack); a scheduler that cannot load cleanbreak's own task breaks
the pool.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import io
import itertools
import os
import pickle
import queue
import sys
import threading
import time
import types
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

from . import _byvalue
from ._errors import BrokenPool, SerializationError, TaskTimeout, WorkerDied
from ._signals import start_quiet_thread
from ._units import Intake, Unit, record_attempts
from ._wire import CALL_ONE, CALL_STAR, DONE, STOPPED, CapturedError

RUNNING, DRAINING, STOPPING, KILLING = 0, 1, 2, 3  # the same levels as _manager's
STOP_GRACE = 0.5  # seconds from the stop to the kill of workers still running our items
CONNECT_TIMEOUT = 10.0
FETCH_TIMEOUT = 30.0  # seconds to fetch a finished unit's result from its worker
# Seconds to wait for the scheduler to pass a stop on to the workers. Even without waiting for
# the function's result (wait=False), Client.run waits for each worker to take it, and a worker
# in C code that holds the GIL takes nothing: the stop waited for that C code to end, hours.
SEND_TIMEOUT = 1.0
# Seconds a stop gives each step of taking what workers hold before it ends them (see
# _kill_holders): a deadlock guard, each takes milliseconds.
KEEP_SECONDS = 1.0
MAX_RESUBMITS = 3  # a unit whose result is lost this often fails with WorkerDied
EXTRA = "pip install 'cleanbreak[dask]'"


def import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ImportError(
            f"Pool(dask=...) needs dask.distributed, which is not installed: {EXTRA}"
        ) from None
    return distributed


# ── on the worker ────────────────────────────────────────────────────────────────────────────


class _Stop(BaseException):
    """Raised in a thread running one of our items, to stop it (see ``stop_units``)."""


class _Held:
    """A unit running on this worker, as ``take_finished`` reads it."""

    __slots__ = ("began", "errors", "key", "packed", "token", "values")

    def __init__(self, token: str, key: str, packed: bool) -> None:
        self.token = token
        self.key = key
        self.packed = packed
        self.values: list[Any] = []
        self.errors: dict[int, CapturedError] = {}
        self.began = time.perf_counter()


def _task_key() -> str:
    """The key of the Dask task this thread runs ("" outside one)."""
    import distributed.worker

    return str(getattr(getattr(distributed.worker, "thread_state", None), "key", ""))


_closed: set[str] = set()  # pools whose gate is closed on this worker
_running: dict[int, tuple[str, str, int]] = {}  # thread id -> (pool token, task key, item)
_expired: set[tuple[int, str, int]] = set()  # (thread id, task key, item) past their timeout
# A _Stop is made (_raise_in) only with this lock held and the item on _running; a thread
# leaves _running with it held, and calls off a _Stop made for it that came too late.
_raise_lock = threading.Lock()
_raised: set[int] = set()  # threads a _Stop was made for, since they last left an item
# Thread id -> the unit it runs, from run_unit's start to its return (packing included), read
# by take_finished while the thread is stuck in an item.
_units: dict[int, _Held] = {}
TIMED_OUT = 99  # run_unit's status: the item after ``values`` ran past its timeout
UNLOADABLE = 98  # run_unit's status: a packed unit's function or arguments did not load here
WORKER_FUNCTIONS = 64  # functions sent by value that a worker process keeps, unpickled
# ...and while their pickles come to at most this many bytes together (the newest is kept
# whatever its size): a notebook's closure over a model, run again and again, would otherwise
# leave up to 64 copies of the model in each worker.
WORKER_FUNCTION_BYTES = 256 << 20
_loaded: OrderedDict[str, tuple[Callable[..., Any], int]] = OrderedDict()  # digest -> (fn, bytes)
_loaded_bytes = 0
_loaded_lock = threading.Lock()
_loads = 0  # functions unpickled in this process (see loads_here)


def _calls(kind: int, fn: Callable[..., Any], item: Any) -> Iterator[Any]:
    """An iterator, in C, that calls ``fn`` on ``item`` once: ``list.extend`` over it stores
    the value with no Python code between the function's return and the store, where a
    ``_Stop`` could break in and lose a result that was made (see ``_run_items``)."""
    if kind == CALL_ONE:
        return map(fn, (item,))
    if kind == CALL_STAR:
        return itertools.starmap(fn, (item,))
    args, kwargs = item
    return itertools.starmap(functools.partial(fn, **kwargs), (args,))


def run_unit(
    token: str,
    kind: int,
    fn: Any,
    items: Any,
    timeout: float | None = None,
    digest: str | None = None,
) -> tuple[int, Any, dict[int, CapturedError], float, int]:
    """Run a unit's items on a Dask worker: ``(status, values, errors, seconds, pid)``.

    The gate is read before each item; ``STOPPED`` means the items after ``values`` did not
    run (the gate closed, or ``_Stop`` broke off the running one), ``TIMED_OUT`` that the item
    after ``values`` ran past ``timeout`` and was broken off. An item still running
    ``STOP_GRACE`` seconds after its timeout (stuck in C) ends the worker process; its nanny
    starts a new one.

    With a ``digest``, the unit came packed (see "By value" in the module docstring): ``fn``
    is the function pickled (loaded once per worker process, by its digest), ``items`` the
    items pickled, and ``values`` goes back as the pickle of ``(values, errors)``. If either
    does not load here, the status is ``UNLOADABLE``, ``values`` names the part
    (``"function"`` or ``"arguments"``) and ``errors[0]`` holds why."""
    me = threading.get_ident()
    held = _Held(token, _task_key(), digest is not None)
    _units[me] = held
    try:
        if digest is None:
            return _run_items(token, kind, fn, items, timeout, held)
        try:
            call = _load_function(digest, fn)
        except BaseException as exc:
            return UNLOADABLE, "function", {0: CapturedError.capture(exc)}, 0.0, os.getpid()
        try:
            work = pickle.loads(items)
        except BaseException as exc:
            return UNLOADABLE, "arguments", {0: CapturedError.capture(exc)}, 0.0, os.getpid()
        del fn, items
        status, values, errors, seconds, pid = _run_items(token, kind, call, work, timeout, held)
        return status, _pack_outcome(values, errors), {}, seconds, pid
    finally:
        _units.pop(me, None)


def _run_items(
    token: str,
    kind: int,
    fn: Callable[..., Any],
    items: Sequence[Any],
    timeout: float | None,
    held: _Held | None = None,
) -> tuple[int, list[Any], dict[int, CapturedError], float, int]:
    import distributed

    if held is None:
        held = _Held(token, _task_key(), False)
    key = held.key
    me = threading.get_ident()
    values = held.values
    errors = held.errors
    began = held.began
    worker: Any = None
    status = DONE
    k = 0
    timer: threading.Timer | None = None
    try:
        for k, item in enumerate(items):
            if token in _closed:
                status = STOPPED
                break
            timer = None
            if timeout is not None:
                if worker is None:
                    worker = distributed.get_worker()  # in this thread, not the timer's
                timer = threading.Timer(timeout, _expire, (me, token, key, k, worker))
                timer.daemon = True
                timer.start()
            calls = _calls(kind, fn, item)
            failure: BaseException | None = None
            closed = False
            try:
                # The gate is read again, with the item put on _running in the same hold of
                # the lock under which stop_units closes it: a stop that came since the read
                # above either finds the item running, and breaks into it, or is seen here.
                # (Read once, unlocked, the item could start after a stop had found nothing
                # to break into.)
                with _raise_lock:
                    closed = token in _closed
                    if not closed:
                        _running[me] = (token, key, k)
                if not closed:
                    try:
                        values.extend(calls)
                    except _Stop:
                        raise
                    except BaseException as exc:
                        failure = exc  # captured below, where no _Stop can break in
            finally:
                # From here on no raise reaches this thread: none is made once the item is
                # off _running, and one made too late (the item had ended) is called off.
                with _raise_lock:
                    _running.pop(me, None)
                    if me in _raised:
                        _raised.discard(me)
                        _call_off(me)
            if timer is not None:
                timer.cancel()
            if closed:
                status = STOPPED
                break
            if len(values) == k:
                if failure is None:  # map() and starmap() swallow a StopIteration
                    failure = StopIteration(f"{_function_name(fn)} raised StopIteration")
                errors[k] = CapturedError.capture(failure)
                values.append(None)
    except _Stop:
        # Nothing more can break in (see above). The item's value is kept if it had one.
        if timer is not None:
            timer.cancel()
        if (me, key, k) in _expired:
            _expired.discard((me, key, k))
            status = TIMED_OUT  # the client fails item k as timed out: its value goes
            del values[k:]
            errors.pop(k, None)
        else:
            status = STOPPED
    return status, values, errors, time.perf_counter() - began, os.getpid()


def _load_function(digest: str, payload: bytes) -> Callable[..., Any]:
    """The function pickled in ``payload``, unpickled once per worker process."""
    global _loads, _loaded_bytes
    with _loaded_lock:
        held = _loaded.get(digest)
        if held is not None:
            _loaded.move_to_end(digest)
            return held[0]
    fn = pickle.loads(payload)
    with _loaded_lock:
        _loads += 1
        if digest not in _loaded:  # (another thread may have loaded it meanwhile)
            _loaded[digest] = (fn, len(payload))
            _loaded_bytes += len(payload)
        while len(_loaded) > WORKER_FUNCTIONS or (
            _loaded_bytes > WORKER_FUNCTION_BYTES and len(_loaded) > 1
        ):
            _loaded_bytes -= _loaded.popitem(last=False)[1][1]
    return cast(Callable[..., Any], fn)


def _pack_outcome(values: list[Any], errors: dict[int, CapturedError]) -> bytes:
    """``(values, errors)`` pickled for the client, by value where the client's module is not
    here (an instance of a class that came by value goes back by value). A value that does
    not pickle fails its item alone."""
    try:
        return _byvalue.dumps((values, errors), True)
    except BaseException:
        pass
    for k, value in enumerate(values):
        if k in errors:
            continue
        try:
            _byvalue.dumps(value, True)
        except BaseException as exc:
            reason = f"{type(value).__name__}: {type(exc).__name__}: {exc}"
            errors[k] = CapturedError(SerializationError("result", reason), "")
            values[k] = None
    return _byvalue.dumps((values, errors), True)


def loads_here() -> int:
    """Run by ``Client.run``: how many functions this worker process has unpickled (for
    tests: a function sent by value is unpickled once per worker process)."""
    return _loads


def _expire(tid: int, token: str, key: str, k: int, worker: Any) -> None:
    """A timed item's deadline, in a timer thread of the worker: break it off, tell the
    client (which cancels the task, so that Dask does not run it again elsewhere), and end
    the worker process if the item is still running ``STOP_GRACE`` seconds later."""
    with _raise_lock:
        if _running.get(tid) != (token, key, k):
            return
        _expired.add((tid, key, k))
        _raise_in(tid)
    with contextlib.suppress(Exception):
        message = {"key": key, "item": k, "worker": worker.address, "pid": os.getpid()}
        worker.loop.add_callback(worker.log_event, _topic(token), message)
    time.sleep(STOP_GRACE)
    if _running.get(tid) == (token, key, k):
        os._exit(1)


def _topic(token: str) -> str:
    return f"cleanbreak-timeout-{token}"


def _raise_in(tid: int) -> None:
    """Make ``_Stop`` break into thread ``tid`` (with ``_raise_lock`` held, the item checked
    to be running there)."""
    import ctypes

    _raised.add(tid)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(_Stop))


def _call_off(tid: int) -> None:
    """Cancel a ``_Stop`` made for thread ``tid`` that has not broken in yet."""
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)


async def stop_units(token: str, terminate: bool, keys: Sequence[str] | None = None) -> None:
    """Run by ``Client.run`` on each worker, in its event loop (a coroutine, which is what
    ``Client.run(wait=False)`` takes): close the pool's gate (unless only some ``keys`` are to
    stop), and with ``terminate`` break off its running items."""
    with _raise_lock:  # (see _run_items)
        if keys is None:
            _closed.add(token)
        if not terminate:
            return
        for tid, (owner, key, _k) in list(_running.items()):
            if owner == token and (keys is None or key in keys):
                _raise_in(tid)


def take_finished(token: str) -> dict[str, tuple[int, Any, dict[int, CapturedError], float, int]]:
    """Run by ``Client.run`` on a worker the client is about to end, where units of the pool
    still run ``STOP_GRACE`` after the stop (stuck in C): for each such unit, by its key, what
    ``run_unit`` would return had it stopped now, if it had finished items (a unit holds their
    values until it returns, and they would go with the process)."""
    out: dict[str, tuple[int, Any, dict[int, CapturedError], float, int]] = {}
    for held in list(_units.values()):
        done = list(held.values)
        if held.token != token or not done:
            continue
        failed = {i: e for i, e in list(held.errors.items()) if i < len(done)}
        seconds = time.perf_counter() - held.began
        if held.packed:
            out[held.key] = (STOPPED, _pack_outcome(done, failed), {}, seconds, os.getpid())
        else:
            out[held.key] = (STOPPED, done, failed, seconds, os.getpid())
    return out


async def end_worker_process(dask_worker: Any) -> bool:
    """Run by ``Client.run(nanny=True)`` (a coroutine, which is what ``wait=False`` takes) in a
    worker's nanny: end its worker process now (SIGKILL), which the nanny then starts again.
    From the nanny, so that it works while the worker's own event loop cannot run (C code that
    holds the GIL: a function run in the worker itself never ran there). Whether there was a
    process to end."""
    import signal

    process = getattr(getattr(dask_worker, "process", None), "process", None)
    pid = getattr(process, "pid", None)
    if not isinstance(pid, int):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return True


def running_here() -> list[str]:
    """Run by ``Client.run``: the keys of the units whose items run in this worker now (for
    tests: a thread that no ``Client.processing()`` shows any more may still run)."""
    return [key for _token, key, _k in list(_running.values())]


# ── what the cluster has, and what goes by value (on the client) ─────────────────────────

# On every machine of the cluster: run_unit is cleanbreak's, and the workers run Dask.
REQUIRED = frozenset({"cleanbreak", "dask", "distributed"})
INLINE_LIMIT = 64 * 1024  # a function pickled to at most this goes inline with each unit
_local: dict[str, bool] = {}  # module name -> is_local
_local_modules_seen: tuple[int, list[types.ModuleType]] = (-1, [])
_registry_lock = threading.Lock()


def _installed_roots() -> tuple[str, ...]:
    import site
    import sysconfig

    paths = {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    with contextlib.suppress(Exception):
        paths.update(site.getsitepackages())
    with contextlib.suppress(Exception):
        paths.add(site.getusersitepackages())
    return tuple(os.path.join(os.path.realpath(p), "") for p in paths if p)


def is_local(name: str) -> bool:
    """Whether module ``name`` is the user's own code, which the cluster need not have: the
    client's ``__main__`` (a script, a notebook, the REPL), or a Python file outside the
    standard library and site-packages (a module beside the script, a project checkout on
    ``PYTHONPATH``, an editable install). The standard library, installed packages, built-in
    and extension modules, and cleanbreak and Dask themselves are taken to be on the cluster.
    """
    known = _local.get(name)
    if known is not None:
        return known
    found = _judge(name)
    if name in sys.modules:  # judged by its file: for good
        _local[name] = found
    return found


def _judge(name: str) -> bool:
    if name == "__main__":
        return True
    if name.partition(".")[0] in REQUIRED or name in sys.builtin_module_names:
        return False
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if not isinstance(path, str) or not path.endswith((".py", ".pyc")):
        return False  # built in, frozen, an extension module, or made at run time
    real = os.path.realpath(path)
    if real.startswith(_roots()):
        return False
    parts = real.split(os.sep)
    return "site-packages" not in parts and "dist-packages" not in parts


_roots_found: tuple[str, ...] | None = None


def _roots() -> tuple[str, ...]:
    global _roots_found
    if _roots_found is None:
        _roots_found = _installed_roots()
    return _roots_found


def _local_modules() -> list[types.ModuleType]:
    """The user's own modules that this process has imported (see ``is_local``)."""
    global _local_modules_seen
    count = len(sys.modules)
    if _local_modules_seen[0] != count:
        found = [
            module
            for name, module in list(sys.modules.items())
            if isinstance(module, types.ModuleType)
            and name != "__main__"
            and getattr(module, "__name__", None) == name
            and is_local(name)
        ]
        _local_modules_seen = (count, found)
    return _local_modules_seen[1]


def dumps_by_value(obj: object) -> bytes:
    """``obj`` pickled so that a machine without the user's own modules loads it: functions
    and classes of ``__main__`` and of every module ``is_local`` names go by value
    (cloudpickle, each such module registered with ``register_pickle_by_value`` for the
    time of the call); everything else by reference."""
    with _registry_lock:
        try:
            import cloudpickle
        except ImportError:  # pragma: no cover - a dependency of cleanbreak and of distributed
            return _byvalue.dumps(obj, True)  # raises PicklingError with the fix
        have = cloudpickle.list_registry_pickle_by_value()
        added = []
        for module in _local_modules():
            if module.__name__ not in have:
                with contextlib.suppress(ValueError):
                    cloudpickle.register_pickle_by_value(module)
                    added.append(module)
        try:
            buffer = io.BytesIO()
            _pickler()(buffer, _byvalue.PROTOCOL).dump(obj)
            return buffer.getvalue()
        finally:
            for module in added:
                with contextlib.suppress(ValueError):
                    cloudpickle.unregister_pickle_by_value(module)


def _pickler() -> type[pickle.Pickler]:
    """``_byvalue``'s pickler, everything of ``__main__`` by value (a worker's ``__main__`` is
    Dask's), code keeping its file name."""
    return _byvalue.pickler(True)


class _Discard(io.RawIOBase):
    def write(self, b: Any) -> int:
        return len(b)

    def writable(self) -> bool:
        return True


class _Names(pickle.Pickler):
    """Plain pickle that notes the module of each class, function and object it meets."""

    def __init__(self) -> None:
        super().__init__(_Discard(), _byvalue.PROTOCOL)
        self.modules: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
            name = getattr(obj, "__module__", None)
        else:
            name = type(obj).__module__
        if isinstance(name, str):
            self.modules.add(name)
        return NotImplemented


def needs_value(fn: object) -> bool:
    """Whether the cluster may lack what ``fn`` needs, so that it goes packed and by value:
    plain pickle cannot send it (a lambda, a closure, a nested function), or it names a
    function, class or object of the user's own modules (``is_local``)."""
    names = _Names()
    try:
        names.dump(fn)
    except BaseException:
        return True
    return any(is_local(name) for name in names.modules)


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()
    return text[0] if text else type(exc).__name__


def _function_name(fn: object) -> str:
    from ._journal import function_name

    return function_name(cast(Callable[..., Any], fn))


def _distribution(module: str) -> str:
    """The distribution that installed ``module`` here, as ``pip install`` names it."""
    with contextlib.suppress(Exception):
        import importlib.metadata

        names = importlib.metadata.packages_distributions().get(module)
        if names:
            return names[0]
    return module


class _Ship:
    """How one function goes to the cluster.

    Not ``packed``: as it is (Dask pickles it, and its units' items, into the task graph).
    ``packed``: pickled here, by value where it must be (``payload``, sent inline or as the
    ``ref`` of the task that holds it), with each unit's items pickled the same way, and the
    results coming back pickled. ``failed``: it cannot reach the cluster; each of its units
    fails with that.
    """

    __slots__ = ("by_value_error", "digest", "failed", "fn", "packed", "payload", "ref", "took")

    def __init__(self, fn: Callable[[], Callable[..., Any] | None]) -> None:
        # The function, not kept alive by this (see _byvalue.refer); and what its copy by
        # value took, once packed (see _byvalue.taken).
        self.fn = fn
        self.took: tuple[object, ...] = ()
        self.packed = False
        self.payload = b""
        self.digest = ""
        self.ref: Any = None  # for a large payload: the future of the task that holds it
        self.failed: BrokenPool | None = None
        self.by_value_error = ""  # why it went by reference although it was to go by value

    def pack(self, fn: Callable[..., Any]) -> None:
        """From now on it goes packed: by value, or by reference where that fails."""
        self.packed = True
        self.took = _byvalue.taken(fn)
        try:
            self.payload = dumps_by_value(fn)
        except BaseException as exc:
            self.by_value_error = _one_line(exc)
            name = _function_name(fn)
            try:
                if name.startswith("__main__:"):
                    raise
                # The cluster may have its module after all (code on a shared file system).
                self.payload = pickle.dumps(fn, _byvalue.PROTOCOL)
            except BaseException:
                self.failed = BrokenPool(
                    f"cannot send {name} to the Dask cluster: it does not pickle by value "
                    f"({self.by_value_error}); let it make what does not pickle (a lock, a "
                    "connection) itself, or pass that as an argument"
                )
                return
        self.digest = hashlib.blake2b(self.payload, digest_size=16).hexdigest()

    def cannot_load(self, fn: Callable[..., Any], part: str, exc: BaseException) -> BrokenPool:
        """The error of a function (or its arguments) that a Dask worker could not load."""
        name = _function_name(fn)
        what = name if part == "function" else f"the arguments of {name}"
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if self.by_value_error and part == "function":
            hint = (
                f"it did not pickle by value either ({self.by_value_error}): let it make what "
                "does not pickle (a lock, a connection) itself, or make its module importable "
                "on every Dask worker"
            )
        elif missing:
            top = missing.partition(".")[0]
            if is_local(top):
                hint = f"make {top} importable on every Dask worker"
            else:
                hint = (
                    f"install {_distribution(top)} on every Dask worker (the same version as "
                    "on this client)"
                )
        else:
            hint = (
                "check that the Dask workers have the same versions as this client of the "
                "packages it uses"
            )
        broken = BrokenPool(f"the Dask cluster cannot load {what} ({_one_line(exc)}): {hint}")
        broken.__cause__ = exc
        return broken


_GONE = ("cancelled", "lost", "error")  # a future's status, once its result will not come


def _payload_of(payload: bytes) -> bytes:
    """The task that holds a large packed function (see ``DaskBackend._payload``)."""
    return payload


def _graph_error(exc: BaseException | None) -> bool:
    """Whether ``exc`` is the scheduler's failure to unpickle a task it was sent."""
    return isinstance(exc, RuntimeError) and "deserialization of the task graph" in str(exc)


# ── on the client ────────────────────────────────────────────────────────────────────────────


class _Flight:
    """A unit submitted to the cluster."""

    __slots__ = ("future", "key", "outcome", "packed", "ref", "ship", "unit")

    def __init__(self, unit: Unit, future: Any, ship: _Ship) -> None:
        self.unit = unit
        self.future = future
        self.key = str(future.key)
        self.ship = ship
        self.packed = ship.packed  # how it was sent: the ship may change while it flies
        self.ref = ship.ref if ship.packed else None  # the task of the function it needs
        self.outcome: tuple[int, Any, dict[int, CapturedError], float, int] = (
            DONE,
            [],
            {},
            0.0,
            0,
        )


class DaskBackend(Intake):
    """Units run as tasks on a ``dask.distributed`` cluster, by one thread of the pool's."""

    SHIPS = 64

    def __init__(self, target: Any) -> None:
        import uuid

        distributed = import_distributed()
        if isinstance(target, str):
            try:
                self._client = distributed.Client(
                    target, set_as_default=False, timeout=CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError, ValueError) as exc:
                raise BrokenPool(
                    f"cannot reach the Dask scheduler at {target} ({type(exc).__name__}: "
                    f"{exc}); start one with `dask scheduler`, or check the address"
                ) from None
            self._own = True
        elif isinstance(target, distributed.Client):
            self._client = target
            self._own = False
        else:
            raise TypeError(
                f"dask= takes a scheduler address or a distributed.Client, not {target!r}"
            )
        self._killed_worker: type[BaseException] = distributed.KilledWorker
        self._cancelled_error: type[BaseException] = distributed.client.FutureCancelledError
        self.size = max(1, sum(self._client.nthreads().values()))
        self.pending: deque[Unit] = deque()
        self._commands: deque[int] = deque()
        self._uids = itertools.count()
        self._token = uuid.uuid4().hex
        self.level = RUNNING
        self._closing = False
        self._cancel_pending = False
        self._accepting = True
        self._lock = threading.RLock()
        self._broken: BaseException | None = None
        self._flights: dict[str, _Flight] = {}
        self._done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sent_level = RUNNING  # the stop level broadcast to the workers
        self._stop_at = 0.0
        self._killed: set[str] = set()
        self._cancelled: set[int] = set()  # units Pool.cancel stopped
        self._resubmits: dict[int, int] = {}  # units run again after their result was lost
        # Items that Dask gave up on (KilledWorker) once, run again each alone (see _fail),
        # and the key of the one that runs now, while nothing else of ours does.
        self._suspects: set[int] = set()
        self._alone: str | None = None
        # How each function goes to the cluster (see _ship), the latest SHIPS of them.
        self._ships: OrderedDict[int, _Ship] = OrderedDict()
        self._refs = _byvalue.Referrer()  # the ships' functions, weakly (see _ship)
        self.finished = threading.Event()
        self.started = threading.Event()
        self.start_error: BaseException | None = None
        # Timed items that ran out, as the workers report them (see _expire).
        self._client.subscribe_topic(_topic(self._token), self._on_timeout)
        start_quiet_thread(self._run, "cleanbreak-dask")

    def _on_timeout(self, event: Any) -> None:
        _when, message = event
        self._done.put(("timeout", message))

    # ── what Pool and MapRun call (the Backend protocol) ──────────────────────────────────

    def wake(self) -> None:
        self._done.put(None)  # SimpleQueue.put is reentrant: safe in a signal handler

    def raise_level(self, level: int) -> None:
        if level > self.level:
            self.level = level
            self.wake()

    @property
    def pids(self) -> list[int]:
        return []

    @property
    def broken(self) -> BaseException | None:
        return self._broken

    # ── the backend's thread ──────────────────────────────────────────────────────────────

    def _run(self) -> None:
        self.started.set()
        try:
            while True:
                self._obey_commands()
                level = self.level
                if level >= DRAINING:
                    self._stop(level)
                    if not self._flights:
                        break
                else:
                    if self._cancel_pending:
                        self._cancel_queue()
                    if self._broken is not None:
                        self._fail_queue(self._broken)
                    self._submit()
                    if self._closing and not self.pending and not self._flights:
                        break
                self._wait()
        except BaseException as exc:  # pragma: no cover - a bug here must not hang the caller
            self._broken = RuntimeError(f"cleanbreak's Dask thread failed: {exc!r}")
            for flight in list(self._flights.values()):
                flight.unit.sink.fail(flight.unit.current, flight.unit.left, self._broken)
            self._flights.clear()
            raise
        finally:
            with self._lock:
                self._accepting = False
            self._cancel_queue()
            if self._flights:
                with contextlib.suppress(Exception):
                    self._client.cancel([f.future for f in self._flights.values()], force=True)
                for flight in self._flights.values():
                    flight.unit.sink.cancel(flight.unit.current, flight.unit.left)
                self._flights.clear()
            self._ships.clear()  # the large functions' tasks are released
            with contextlib.suppress(Exception):
                self._client.unsubscribe_topic(_topic(self._token))
            if self._own:
                with contextlib.suppress(Exception):
                    self._client.close(timeout=2)
            self.finished.set()

    def _wait(self) -> None:
        timeout = 0.05
        try:
            item = self._done.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            if isinstance(item, tuple):
                self._on_expired(item[1])
            elif item is not None:
                self._settle(item)
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                return

    def _on_expired(self, message: dict[str, Any]) -> None:
        """A worker says a timed item ran out: cancel its task, so that Dask does not run it
        again if the worker has to end, and fail it (or retry it)."""
        flight = self._land(str(message.get("key")))
        if flight is None:  # its result came first
            return
        with contextlib.suppress(Exception):
            self._client.cancel([flight.future], force=True)
        self._timed_out(flight, message)

    def _submit(self) -> None:
        import uuid

        while self.pending and len(self._flights) < 2 * self.size and self._alone is None:
            suspect = self.pending[0].uid in self._suspects
            if suspect and self._flights:
                return  # it waits until nothing else of ours runs
            unit = self.pending.popleft()
            if not unit.sink.start(unit):
                continue
            timeout = unit.opts.task_timeout
            if timeout is not None and len(unit.items) > 1:
                # Timed items go one by one, so that each one's time is its own.
                for k in range(len(unit.items) - 1, -1, -1):
                    self.pending.appendleft(unit.part(next(self._uids), k, k + 1))
                continue
            ship = self._ship(unit.fn)
            if ship.failed is not None:
                unit.sink.fail(unit.current, unit.left, ship.failed)
                continue
            key = f"cleanbreak-{self._token[:8]}-{unit.uid}-{uuid.uuid4().hex[:8]}"
            if not ship.packed:
                args: tuple[Any, ...] = (unit.fn, list(unit.items), timeout)
            else:
                try:
                    items = dumps_by_value(list(unit.items))
                except BaseException as exc:
                    if not self._split(unit):
                        reason = f"{type(exc).__name__}: {exc}"
                        unit.sink.fail(
                            unit.current, unit.left, SerializationError("arguments", reason)
                        )
                    continue
                args = (self._payload(ship), items, timeout, ship.digest)
            try:
                future = self._client.submit(
                    run_unit, self._token, unit.kind, *args, key=key, pure=False, retries=0
                )
            except concurrent.futures.CancelledError:
                if ship.ref is None:
                    raise
                # The task that holds the function was cancelled just now: made again.
                ship.ref = None
                self.pending.appendleft(unit)
                continue
            except (TypeError, pickle.PicklingError) as exc:
                # Dask could not pickle the task: an argument does not pickle (the function
                # was pickled in _ship). That item fails alone, and the pool goes on.
                if not self._split(unit):
                    reason = _one_line(exc.__cause__ or exc)
                    unit.sink.fail(unit.current, unit.left, SerializationError("arguments", reason))
                continue
            flight = _Flight(unit, future, ship)
            self._flights[flight.key] = flight
            if suspect:
                self._alone = flight.key
            future.add_done_callback(self._done.put)

    def _ship(self, fn: Callable[..., Any]) -> _Ship:
        """How ``fn`` goes to the cluster: as it is where the cluster has what it needs, else
        packed (see "By value" in the module docstring). Packed anew once what its copy took
        is another object (a notebook cell set a global again: see ``_byvalue.taken``). The
        ship of a function that died goes (with its payload's task) at the next look."""
        self._refs.purge(self._ships, lambda ship: ship.fn)
        key = id(fn)
        ship = self._ships.get(key)
        if ship is not None and ship.fn() is fn:
            if not ship.packed or _byvalue.same(ship.took, _byvalue.taken(fn)):
                self._ships.move_to_end(key)
                return ship
            ref = ship.fn
        else:
            ref = self._refs.refer(key, fn)
        packed = ship is not None and ship.packed and ship.fn is ref
        ship = _Ship(ref)
        if packed or needs_value(fn):
            ship.pack(fn)
        self._ships[key] = ship
        self._ships.move_to_end(key)
        while len(self._ships) > self.SHIPS:
            self._ships.popitem(last=False)
        return ship

    def _payload(self, ship: _Ship) -> Any:
        """What carries a packed function to the workers: its pickle itself, or, for a large
        one, the future of a task whose result it is, made once: Dask copies that result to
        each worker that needs it, once. (Not ``Client.scatter``: scattered data that dies
        with its workers is lost for good, and the tasks that need it with it, while this
        task's result is made again from the copy in the scheduler.)"""
        if len(ship.payload) <= INLINE_LIMIT:
            return ship.payload
        if ship.ref is None or ship.ref.status in _GONE:
            key = f"cleanbreak-{self._token[:8]}-function-{next(self._uids)}"
            ship.ref = self._client.submit(_payload_of, ship.payload, key=key, pure=False)
        return ship.ref

    def _split(self, unit: Unit) -> bool:
        """Requeue each item of the unit alone, so that one bad item fails by itself. False
        if the unit holds one item only."""
        if unit.left <= 1:
            return False
        for k in range(len(unit.items) - 1, unit.received - 1, -1):
            self.pending.appendleft(unit.part(next(self._uids), k, k + 1))
        return True

    def _break(self, exc: BrokenPool) -> None:
        """Nothing can run on the cluster: fail everything, now and from now on."""
        if self._broken is None:
            self._broken = exc
        flights = list(self._flights.values())
        self._flights.clear()
        self._alone = None
        with contextlib.suppress(Exception):
            self._client.cancel([f.future for f in flights], force=True)
        for flight in flights:
            flight.unit.sink.fail(flight.unit.current, flight.unit.left, exc)
        self._fail_queue(exc)

    def _fail_queue(self, exc: BaseException) -> None:
        while self.pending:
            unit = self.pending.popleft()
            unit.sink.fail(unit.current, unit.left, exc)

    def _land(self, key: str) -> _Flight | None:
        """The flight of ``key`` is over (None: it was already)."""
        if key == self._alone:
            self._alone = None
        return self._flights.pop(key, None)

    def _settle(self, future: Any) -> None:
        flight = self._land(str(future.key))
        if flight is None:
            return
        status = future.status
        if status == "finished" and not self._fetch(flight):
            status = "lost"
        self._settle_flight(flight, status)

    def _settle_flight(self, flight: _Flight, status: str) -> None:
        """Hand a landed flight's outcome to its sink; ``status``: its future's, with
        "finished" meaning its outcome was fetched into ``flight.outcome``."""
        future = flight.future
        unit = flight.unit
        ours = self.level >= DRAINING or unit.uid in self._cancelled
        if status in ("cancelled", "lost") and not ours:
            # Not our doing: the worker that held the result died before we fetched it (the
            # scheduler then runs the task again, or gives up on it). Run the unit again.
            if flight.ref is not None and flight.ref.status in _GONE:
                # The task of the function it needs was cancelled (Client.cancel, by
                # someone else): that is made again, and this does not count as a loss.
                self.pending.appendleft(unit.part(next(self._uids), unit.received))
            else:
                self._resubmit(unit)
            return
        if status == "finished":
            outcome, values, errors, seconds, pid = flight.outcome
            if outcome == UNLOADABLE:
                self._unloadable(flight, str(values), errors[0].rebuild())
                return
            if values:
                rebuilt = {k: e.rebuild() for k, e in errors.items()}
                if rebuilt and unit.opts.retries:
                    self._deliver(unit, values, rebuilt, seconds)
                else:
                    unit.sink.deliver(unit.current, values, rebuilt, seconds)
                    unit.received += len(values)
            if unit.left:
                if outcome == TIMED_OUT and self.level < DRAINING:
                    self._timed_out(flight, {"pid": pid})
                else:
                    unit.sink.cancel(unit.current, unit.left)
            return
        if status in ("cancelled", "lost") or self.level >= DRAINING:
            unit.sink.cancel(unit.current, unit.left)
            return
        error: BaseException | None
        try:
            error = future.exception()
        except BaseException as err:
            error = err
        self._fail(flight, error)

    def _fetch(self, flight: _Flight, timeout: float = FETCH_TIMEOUT) -> bool:
        """Fetch a finished unit's outcome into ``flight.outcome``; False if it is gone."""
        try:
            flight.outcome = flight.future.result(timeout=timeout)
        except Exception as exc:
            if isinstance(exc, self._cancelled_error | TimeoutError | OSError):
                return False
            # It does not unpickle here: the unit's items fail with that error.
            flight.outcome = (DONE, [], {}, 0.0, 0)
            self._fail(flight, exc)
            flight.unit.received = len(flight.unit.items)
            return True
        self._unpack(flight)
        return True

    def _unpack(self, flight: _Flight) -> None:
        """A packed unit's outcome, unpickled in ``flight.outcome`` (see "By value"); one that
        does not unpickle fails the unit's items."""
        status, values, _errors, seconds, pid = flight.outcome
        if not flight.packed or status == UNLOADABLE:
            return
        try:
            values, errors = pickle.loads(values)
        except BaseException as exc:
            flight.outcome = (DONE, [], {}, 0.0, 0)
            reason = f"it was pickled on the Dask worker but does not unpickle here: {exc!r}"
            flight.unit.sink.fail(
                flight.unit.current, flight.unit.left, SerializationError("result", reason)
            )
            flight.unit.received = len(flight.unit.items)
            return
        flight.outcome = (status, values, errors, seconds, pid)

    def _resubmit(self, unit: Unit) -> None:
        tries = self._resubmits.get(unit.uid, 0) + 1
        if tries > MAX_RESUBMITS:
            died = WorkerDied(None, 0, unit.current, lost="its result was lost again and again")
            self._fail_items(unit, died)
            return
        again = unit.part(next(self._uids), unit.received)
        self._resubmits[again.uid] = tries
        self.pending.appendleft(again)

    def _fail(self, flight: _Flight, exc: BaseException | None) -> None:
        unit = flight.unit
        if exc is not None and _graph_error(exc):
            self._unschedulable(flight, exc)
            return
        if isinstance(exc, self._killed_worker):
            if unit.uid not in self._suspects:
                # Dask gives up on every task that was on a worker as it died for the n-th
                # time, the one that killed it and those queued beside it. Each item runs
                # again alone: the one at fault kills its worker again and fails alone.
                for k in range(len(unit.items) - 1, unit.received - 1, -1):
                    single = unit.part(next(self._uids), k, k + 1)
                    self._suspects.add(single.uid)
                    self.pending.appendleft(single)
                return
            self._suspects.discard(unit.uid)
            died = WorkerDied(None, 0, unit.current, lost=f"{exc}")
            died.__cause__ = exc
            self._fail_items(unit, died)
            return
        if isinstance(exc, self._cancelled_error) or exc is None:
            unit.sink.cancel(unit.current, unit.left)
            return
        unit.sink.fail(unit.current, unit.left, exc)

    def _unschedulable(self, flight: _Flight, exc: BaseException) -> None:
        """The scheduler could not unpickle the unit's task. Sent as it is, the function or
        its arguments name a module the scheduler lacks: it goes packed from now on, and the
        unit again. Sent packed, the task names nothing but cleanbreak's own ``run_unit``:
        the scheduler lacks cleanbreak, and nothing can run."""
        cause = exc.__cause__ or exc
        missing = cause.name if isinstance(cause, ModuleNotFoundError) else None
        ours = bool(missing) and str(missing).partition(".")[0] in REQUIRED
        if not flight.packed and not ours:
            if not flight.ship.packed:
                flight.ship.pack(flight.unit.fn)
            unit = flight.unit
            self.pending.appendleft(unit.part(next(self._uids), unit.received))
            return
        broken = BrokenPool(
            f"the Dask scheduler cannot load cleanbreak's tasks ({_one_line(cause)}): install "
            "cleanbreak on the scheduler's machine (the same version as on this client)"
        )
        broken.__cause__ = cause
        flight.unit.sink.fail(flight.unit.current, flight.unit.left, broken)
        self._break(broken)

    def _unloadable(self, flight: _Flight, part: str, exc: BaseException) -> None:
        """A Dask worker could not load a packed unit's function or arguments. Where the
        cluster lacks a module (or the function does not load at all), every unit of that
        function fails with one error that says what to install: the first failure ends
        its run. Arguments that fail otherwise fail their own items only."""
        unit = flight.unit
        ship = flight.ship
        environment = isinstance(exc, ImportError) or part == "function"
        if not environment:
            if not self._split(unit):
                reason = f"they do not unpickle on the Dask worker: {_one_line(exc)}"
                unit.sink.fail(unit.current, unit.left, SerializationError("arguments", reason))
            return
        if ship.failed is None:
            ship.failed = ship.cannot_load(unit.fn, part, exc)
        unit.sink.fail(unit.current, unit.left, ship.failed)

    def _timed_out(self, flight: _Flight, message: dict[str, Any]) -> None:
        """The unit's next item ran out of time: it fails (or is retried), and the items
        after it, which did not run, go back to the queue."""
        unit = flight.unit
        timeout = unit.opts.task_timeout or 0.0
        where = str(message.get("worker") or "(address unknown)")
        exc = TaskTimeout(timeout, int(message.get("pid") or 0), unit.current, dask_worker=where)
        if unit.left > 1:
            self.pending.appendleft(unit.part(next(self._uids), unit.received + 1))
        self._fail_items(unit.part(next(self._uids), unit.received, unit.received + 1), exc)

    def _fail_items(self, unit: Unit, exc: BaseException) -> None:
        """Items without an outcome failed with ``exc``: each is retried alone while its
        options allow, else reported."""
        for k in range(unit.received, len(unit.items)):
            if not self._retried(unit, k, exc):
                if unit.history:
                    record_attempts(exc, [*unit.history, exc])
                unit.sink.fail(unit.start + k, 1, exc)

    def _retried(self, unit: Unit, k: int, exc: BaseException) -> bool:
        """Run item ``k`` again, alone, if its options say so after ``exc``."""
        if not unit.opts.retry(unit.history, exc):
            return False
        single = unit.part(next(self._uids), k, k + 1)
        single.history = [*(unit.history or ()), exc]
        self.pending.appendleft(single)
        return True

    def _deliver(
        self, unit: Unit, values: list[Any], errors: dict[int, BaseException], seconds: float
    ) -> None:
        """The unit's next items finished: hand them on, except the failures that its
        options retry (``retry_on``), which run again alone."""
        begin = 0
        first = unit.received
        each = seconds / len(values)
        for k in sorted(errors):
            if not self._retried(unit, first + k, errors[k]):
                if unit.history:
                    record_attempts(errors[k], [*unit.history, errors[k]])
                continue
            part = {j - begin: e for j, e in errors.items() if begin <= j < k}
            if k > begin:
                unit.sink.deliver(
                    unit.start + first + begin, values[begin:k], part, each * (k - begin)
                )
            begin = k + 1
        if begin < len(values):
            part = {j - begin: e for j, e in errors.items() if j >= begin}
            unit.sink.deliver(
                unit.start + first + begin, values[begin:], part, each * (len(values) - begin)
            )
        unit.received += len(values)

    def _obey_commands(self) -> None:
        while self._commands:
            uid = self._commands.popleft()
            self._cancelled.add(uid)
            for flight in list(self._flights.values()):
                if flight.unit.uid == uid:
                    self._client.cancel([flight.future], force=True)
                    self._stop_keys([flight.key])

    def _cancel_queue(self) -> None:
        while self.pending:
            unit = self.pending.popleft()
            unit.sink.cancel(unit.current, unit.left)

    def _stop(self, level: int) -> None:
        """The stop sequence (see the module docstring), step by step as the level rises."""
        self._cancel_queue()
        terminate = level >= STOPPING
        wanted = min(level, STOPPING)  # what the workers must do: drain, or stop their items
        if self._sent_level < wanted:
            self._sent_level = wanted
            self._stop_at = time.monotonic()
            with contextlib.suppress(Exception):
                self._client.run(
                    stop_units, self._token, terminate, wait=False, callback_timeout=SEND_TIMEOUT
                )
        if terminate:
            late = time.monotonic() - self._stop_at >= STOP_GRACE
            if self._flights and (late or level >= KILLING):
                self._kill_holders(list(self._flights.values()))

    def _keep_finished(self, flights: list[_Flight], deadline: float) -> None:
        """Settle the flights whose results the cluster holds (see ``_kill_holders``)."""
        flights = [f for f in flights if f.key in self._flights]
        if not flights:
            return
        client = self._client
        try:
            held = client.sync(
                client.scheduler.who_has,
                keys=[f.future.key for f in flights],
                callback_timeout=max(deadline - time.monotonic(), 0.01),
            )
        except Exception:
            return
        held = {str(k): v for k, v in held.items()}
        for flight in flights:
            if held.get(flight.key) and self._land(flight.key) is not None:
                fetched = self._fetch(flight, max(deadline - time.monotonic(), 0.01))
                self._settle_flight(flight, "finished" if fetched else "lost")

    def _keep_partial(self, keys: set[str], processing: dict[str, Any], deadline: float) -> None:
        """Settle the running units of ``keys`` with the items they finished, as their workers
        tell (``take_finished``), each worker within the time left: one whose event loop does
        not answer (C code that holds the GIL) keeps them."""
        import asyncio

        workers = [addr for addr, tasks in processing.items() if keys & {str(t) for t in tasks}]
        if not workers:
            return
        client = self._client
        left = max(deadline - time.monotonic(), 0.01)

        async def ask(addr: str) -> Any:
            with contextlib.suppress(Exception):
                asked = client.run(
                    take_finished, self._token, workers=[addr], on_error="return", asynchronous=True
                )
                return (await asyncio.wait_for(asked, left)).get(addr)
            return None

        async def ask_all() -> list[Any]:
            return list(await asyncio.gather(*(ask(addr) for addr in workers)))

        try:
            taken = client.sync(ask_all, callback_timeout=left + 1.0)
        except Exception:
            return
        for outcomes in taken:
            if not isinstance(outcomes, dict):  # that worker did not answer, or failed
                continue
            for key, outcome in outcomes.items():
                flight = self._land(str(key)) if str(key) in keys else None
                if flight is not None:
                    flight.outcome = outcome
                    self._unpack(flight)
                    self._settle_flight(flight, "finished")

    def _stop_keys(self, keys: list[str]) -> None:
        with contextlib.suppress(Exception):
            self._client.run(
                stop_units, self._token, True, keys, wait=False, callback_timeout=SEND_TIMEOUT
            )

    def _kill_holders(self, flights: list[_Flight]) -> None:
        """End the worker processes running these units (a nanny restarts each), once."""
        try:
            processing = self._client.processing()
            nannies = {
                addr: bool(info.get("nanny"))
                for addr, info in self._client.scheduler_info(n_workers=-1)["workers"].items()
            }
        except Exception:
            return
        keys = {f.key for f in flights}
        holders = [
            addr
            for addr, tasks in processing.items()
            if keys & {str(t) for t in tasks} and nannies.get(addr) and addr not in self._killed
        ]
        if self.level == STOPPING:
            # Before the workers are ended (or, without a nanny, their units discarded), what
            # they hold is taken, each step within KEEP_SECONDS (a second Ctrl-C skips them):
            # - a unit that finished holds its results in its worker's memory: that worker
            #   may be one about to end (it went on to the next unit), and the news of the
            #   end may not have reached this client yet;
            # - a unit still running holds the values of the items it finished until it
            #   returns;
            # - and, asked again last, a unit that returned meanwhile.
            self._keep_finished(flights, time.monotonic() + KEEP_SECONDS)
            self._keep_partial(keys, processing, time.monotonic() + KEEP_SECONDS)
            self._keep_finished(flights, time.monotonic() + KEEP_SECONDS)
        if holders:
            self._killed.update(holders)
            with contextlib.suppress(Exception):
                self._client.run(end_worker_process, workers=holders, nanny=True, wait=False)
        if self.level >= STOPPING:
            # What still runs is discarded: its results will not be waited for.
            with contextlib.suppress(Exception):
                self._client.cancel([f.future for f in flights], force=True)
            for flight in flights:
                if self._land(flight.key) is not None:
                    flight.unit.sink.cancel(flight.unit.current, flight.unit.left)
