"""Functions and classes that a worker cannot import travel by value.

Plain pickle sends a function or a class *by reference*: its module and its name, which the
receiver imports. That fails for what has no importable home:

- a function or class defined in a notebook cell, the REPL, ``python -c`` or a script read
  from stdin: ``__main__`` there is not a file that a worker started by spawn or a fork server
  can run again, so the name is missing in the worker's ``__main__``;
- a lambda, a closure, a nested function: pickle cannot name them at all;
- on Dask, a function whose module is not installed on the cluster (see ``_dask``).

These go *by value*, as loky, joblib, Dask and Ray send them: cloudpickle pickles the code,
the globals it uses and its closure, and classes with their body. It is used only where plain
pickle will not do, and only for what needs it: an importable function still goes by
reference (the same bytes as plain pickle), so a script pays nothing.

The receiver needs no more than ``pickle.loads``: a stream by cloudpickle names cloudpickle's
own functions by reference, and the receiver imports cloudpickle to call them. A class sent by
value keeps a tracking id, so an instance that comes back in a result is of the sender's own
class (``isinstance`` holds), and a class sent twice is made once in the receiver.

What differs from a function that runs where it was defined: a function sent by value gets a
copy of the globals it uses, taken when it is sent (sent again once one of them is another
object: see ``taken``), and its own namespace for them. So a global
that an ``initializer`` sets in a worker is not seen by a task function sent by value (the same
holds with loky, joblib and Dask). From a script, functions at the top level go by reference and
share the worker's real module.
"""

from __future__ import annotations

import functools
import os
import pickle
import sys
import types
import weakref
from collections import ChainMap
from collections.abc import Callable

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see _notyping)
if TYPE_CHECKING:
    from typing import Any

PROTOCOL = pickle.HIGHEST_PROTOCOL
INSTALL = "pip install cloudpickle"

_picklers: dict[bool, type[pickle.Pickler]] = {}


class CloudpickleMissing(pickle.PicklingError):
    """Something must go by value, and cloudpickle (a dependency) is not installed."""


class NamesMain(pickle.PicklingError):
    """What ``MainlessPickler`` was pickling holds something of ``__main__``."""


class MainlessPickler(pickle.Pickler):
    """Plain pickle that refuses anything of ``__main__`` (``NamesMain``).

    For a process whose main module no worker can import (a notebook, the REPL, ``python -c``):
    what names nothing of it (an importable function, the usual arguments) still goes as plain
    pickle sends it, at its speed and without importing cloudpickle; the rest is sent again by
    value. (A forked worker may hold a name of ``__main__``, but from before the fork: a cell
    run again since would not be the one it runs.) Plain pickle names a function, a class, or
    an instance's class by its ``__module__``, and asks ``reducer_override`` first about every
    object but ``None``, the booleans and exact ``int``, ``float``, ``str``, ``bytes``,
    ``bytearray``, ``list``, ``tuple``, ``dict``, ``set`` and ``frozenset``, none of which
    names a module: so nothing of ``__main__`` gets past it. (An instance's ``__module__`` is
    its class's; a bound method's, its function's.) What it refuses is pickled a second time,
    by value: a ``__reduce__`` with side effects runs twice.
    """

    def reducer_override(self, obj: Any) -> Any:
        module = getattr(obj, "__module__", None)
        if isinstance(module, str) and module == "__main__":
            raise NamesMain  # (not its repr: the user's code, and nobody reads this)
        return NotImplemented


def main_importable() -> bool:
    """Whether a worker that spawn or a fork server starts runs this process's main module
    again, so that its top-level functions and classes can be found there by name.

    True for a script (a file) and for ``python -m module``, which is what multiprocessing
    runs again in each worker. False for a notebook, the REPL, ``python -c``, a script read
    from stdin, IPython, and ``python -m package`` (multiprocessing does not run a package's
    ``__main__`` again).
    """
    main = sys.modules.get("__main__")
    if main is None:
        return False
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None)
    if isinstance(name, str) and name:
        return name != "__main__" and not name.endswith(".__main__")
    path = getattr(main, "__file__", None)
    if not isinstance(path, str):
        return False
    if os.path.splitext(os.path.basename(path))[0] == "ipython":
        return False  # multiprocessing skips IPython's own script
    return os.path.isfile(path)


def _resolves(obj: Any) -> bool:
    """Whether ``obj`` is found under its qualified name in this process's ``__main__``."""
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(qualname, str) or "<" in qualname:  # <lambda>, <locals>
        return False
    found: Any = sys.modules.get("__main__")
    for part in qualname.split("."):
        found = getattr(found, part, None)
        if found is None:
            return False
    return found is obj


def pickler(main_by_value: bool) -> type[pickle.Pickler]:
    """The pickler class that sends by value what has no importable home (cloudpickle's).

    ``main_by_value``: everything of ``__main__`` goes by value (the receiver cannot import
    it). Otherwise a function or class of ``__main__`` goes by reference when it is found under
    its name there, as plain pickle would send it.
    """
    cls = _picklers.get(main_by_value)
    if cls is not None:
        return cls
    try:
        import cloudpickle
    except ImportError:
        raise CloudpickleMissing(
            "sending this by value (it is defined in a notebook cell, the REPL or a lambda, or "
            f"is not importable where it runs) needs cloudpickle, which is missing: {INSTALL}"
        ) from None

    base: Any = cloudpickle.Pickler
    table: Any = getattr(base, "dispatch_table", None)
    reduce_code = None if table is None else table.get(types.CodeType)

    class ByValuePickler(base):  # type: ignore[misc]
        if reduce_code is not None:
            # Code keeps its file name (cloudpickle sends "<dynamic-code>"): a traceback from
            # the worker then names the user's file, or the notebook cell, and its line.
            dispatch_table = ChainMap(
                {types.CodeType: functools.partial(_code_keeping_file, reduce_code)}, table
            )

        def reducer_override(self, obj: Any) -> Any:
            if (
                not main_by_value
                and isinstance(obj, (type, types.FunctionType))
                and getattr(obj, "__module__", None) == "__main__"
                and _resolves(obj)
            ):
                return NotImplemented
            return super().reducer_override(obj)

    ByValuePickler.__qualname__ = ByValuePickler.__name__ = (
        "MainByValuePickler" if main_by_value else "ByValuePickler"
    )
    _picklers[main_by_value] = ByValuePickler
    return ByValuePickler


def _code_keeping_file(reduce_code: Any, code: types.CodeType) -> Any:
    made = reduce_code(code)
    if isinstance(made, tuple) and len(made) == 2 and made[0] is types.CodeType:
        return _code_in, (made[1], code.co_filename)
    return made


def _code_in(args: tuple[Any, ...], filename: str) -> types.CodeType:
    """A code object sent by value, with its file name back (see ``pickler``)."""
    return types.CodeType(*args).replace(co_filename=filename)


_UNSET = object()  # a name the function's globals do not hold (a builtin), an empty cell
_ITSELF = object()  # in ``taken``: the function itself


def taken(fn: object) -> tuple[object, ...]:
    """What a copy of ``fn`` by value takes of the sender's state, object by object: the globals
    its code names (nested code too), its closure's contents, its defaults, its code. Sent
    again only once one of them is another object (a cell that sets ``k = 3`` again, a
    function defined again); a change inside an object (a list appended to) is not seen.
    Empty for what is not a plain function."""
    if not isinstance(fn, types.FunctionType):
        return ()
    names = fn.__globals__
    found: list[object] = [fn.__code__, fn.__defaults__, fn.__kwdefaults__]
    codes = [fn.__code__]
    while codes:
        code = codes.pop()
        found.extend(names.get(name, _UNSET) for name in code.co_names)
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    for cell in fn.__closure__ or ():
        try:
            found.append(cell.cell_contents)
        except ValueError:  # not yet set
            found.append(_UNSET)
    # A function that calls itself names itself: not held here, where it would keep itself
    # alive (see ``refer``).
    return tuple(_ITSELF if x is fn else x for x in found)


def same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    """Whether two ``taken`` tuples name the same objects."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


class Strong:
    """A function held, with a weak reference's call: it gives the function (see ``refer``)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self) -> Callable[..., Any]:
        return self.fn


def refer(
    fn: Callable[..., Any], died: Callable[[Any], object]
) -> Callable[[], Callable[..., Any] | None]:
    """How a pool knows a function it sent, without keeping it alive: a bound method or a
    ``partial`` holds its object, which may be large, and must go once the user lets it go.
    A weak reference (``died`` is called with it, in whatever thread let the function go),
    or, for what cannot be referred to weakly (a builtin, an instance of a class with
    ``__slots__`` and no ``__weakref__``), the function held (``Strong``).
    A weak reference is dead once the function's ``id`` could be another object's."""
    try:
        return weakref.ref(fn, died)
    except TypeError:
        return Strong(fn)


class Referrer:
    """The weak references (``refer``) of one list of functions keyed by ``id``, and those that
    died since the list was last looked at (appended by the weakrefs' callbacks, in whatever
    thread let the function go; dropped by ``purge``, in the list's own thread)."""

    __slots__ = ("_dead",)

    def __init__(self) -> None:
        self._dead: list[tuple[int, object]] = []

    def refer(self, key: int, fn: Callable[..., Any]) -> Callable[[], Callable[..., Any] | None]:
        dead = self._dead
        return refer(fn, lambda ref: dead.append((key, ref)))

    def purge(self, entries: Any, ref_of: Callable[[Any], object]) -> list[Any]:
        """Remove from ``entries`` (id -> entry) the entries of the functions that died, and
        return them (an entry whose reference is another's, a later function's, stays)."""
        removed = []
        while self._dead:
            key, ref = self._dead.pop()
            entry = entries.get(key)
            if entry is not None and ref_of(entry) is ref:
                del entries[key]
                removed.append(entry)
        return removed


def dumps(obj: object, main_by_value: bool = False) -> bytes:
    """``obj`` pickled with what has no importable home sent by value."""
    import io

    buffer = io.BytesIO()
    pickler(main_by_value)(buffer, PROTOCOL).dump(obj)
    return buffer.getvalue()


class Shipped:
    """An object that travels pickled in advance: unpickled, it is the object itself.

    For what multiprocessing pickles on its own, with plain pickle, when it starts a worker
    (the pool's initializer and its arguments)."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __reduce__(self) -> tuple[Any, ...]:
        return (pickle.loads, (self.payload,))


def ship(obj: object, main_by_value: bool) -> object:
    """``obj``, ready for multiprocessing's plain pickle: itself if that pickles it so that a
    new worker can load it, else a ``Shipped`` copy by value."""
    try:
        if main_by_value:
            return Shipped(dumps(obj, main_by_value))
        try:
            pickle.dumps(obj, PROTOCOL)
        except Exception:
            return Shipped(dumps(obj, main_by_value))
    except CloudpickleMissing:
        pass  # as it is: multiprocessing says what fails
    return obj
