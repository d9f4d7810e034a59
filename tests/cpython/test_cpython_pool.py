"""CPython's own tests of ``multiprocessing.Pool`` (the processes flavour of the pool classes
of ``Lib/test/_test_multiprocessing.py``), run against ``cleanbreak.multiprocessing.Pool``.

The tests come from the interpreter's ``test`` package (shipped with CPython; some
distributions split it out, and then these are skipped). Every test that fails on purpose is
listed in ``DIFFERENCES`` with the reason, which the README's list of differences explains.
"""

from __future__ import annotations

import multiprocessing
import unittest
from typing import Any

import pytest

import cleanbreak.multiprocessing

try:
    from test import _test_multiprocessing as cpython  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - a Python without its test package
    pytest.skip("this Python has no test package (Lib/test)", allow_module_level=True)

# test name -> why it fails against the drop-in, on purpose.
DIFFERENCES: dict[str, str] = {
    "_TestPool.test_imap_handle_iterable_exception": (
        "when the input raises, the items read before it still run and are handed over "
        "before the input's exception (the stock pool drops the rest of that chunk)"
    ),
    "_TestPool.test_make_pool": (
        "it reads the private list of worker processes, Pool._pool (here a cleanbreak.Pool)"
    ),
    "_TestPoolWorkerLifetime.test_pool_worker_lifetime": (
        "it reads the private list of worker processes, Pool._pool, and calls the private "
        "Pool._repopulate_pool() (maxtasksperchild itself is tested in tests/test_mp_pool.py)"
    ),
    "_TestPoolWorkerErrors.test_unpickleable_result": (
        "its result, a lambda, comes back by value (cloudpickle), where the stock pool raises "
        "MaybeEncodingError; a result that cannot be pickled at all still raises it"
    ),
    "_TestPool.test_map_unplicklable": (
        "an argument that does not pickle fails with cleanbreak.SerializationError (a "
        "pickle.PicklingError) naming the pickler's error, not with that error itself"
    ),
}


def _put_in_place(test: unittest.TestCase) -> None:
    """Some classes call ``multiprocessing.Pool`` itself: the drop-in goes in its place, as in
    a program one does not own, for the length of each test."""
    stock = multiprocessing.Pool
    multiprocessing.Pool = cleanbreak.multiprocessing.Pool  # type: ignore[assignment]
    test.addCleanup(setattr, multiprocessing, "Pool", stock)


def _class(base: type, name: str) -> type:
    attrs: dict[str, Any] = {"Pool": staticmethod(cleanbreak.multiprocessing.Pool)}

    def set_up(self: unittest.TestCase) -> None:
        _put_in_place(self)
        unittest.TestCase.setUp(self)

    attrs["setUp"] = set_up
    for test, why in DIFFERENCES.items():
        owner, _, method = test.partition(".")
        if owner == base.__name__ and hasattr(base, method):
            attrs[method] = unittest.skip(f"deliberate difference: {why}")(getattr(base, method))
    return type(name, (base, cpython.ProcessesMixin, unittest.TestCase), attrs)


TestPool = _class(cpython._TestPool, "TestPool")
TestPoolWorkerErrors = _class(cpython._TestPoolWorkerErrors, "TestPoolWorkerErrors")
TestPoolWorkerLifetime = _class(cpython._TestPoolWorkerLifetime, "TestPoolWorkerLifetime")
