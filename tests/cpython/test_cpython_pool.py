"""CPython's own tests of ``multiprocessing.Pool`` (the processes flavour of the pool classes
of ``Lib/test/_test_multiprocessing.py``), run against ``cleanbreak.multiprocessing.Pool``.

The tests come from the interpreter's ``test`` package (shipped with CPython; some
distributions split it out, and then these are skipped). Every test that fails on purpose is
listed in ``DIFFERENCES`` with the reason, which the README's list of differences explains.
"""

from __future__ import annotations

import unittest
from typing import Any

import pytest

import cleanbreak.multiprocessing

try:
    from test import _test_multiprocessing as cpython  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - a Python without its test package
    pytest.skip("this Python has no test package (Lib/test)", allow_module_level=True)

# test name -> why it fails against the drop-in, on purpose.
DIFFERENCES: dict[str, str] = {}


def _class(base: type, name: str) -> type:
    attrs: dict[str, Any] = {"Pool": staticmethod(cleanbreak.multiprocessing.Pool)}
    for test, why in DIFFERENCES.items():
        owner, _, method = test.partition(".")
        if owner == base.__name__ and hasattr(base, method):
            attrs[method] = unittest.skip(f"deliberate difference: {why}")(getattr(base, method))
    return type(name, (base, cpython.ProcessesMixin, unittest.TestCase), attrs)


TestPool = _class(cpython._TestPool, "TestPool")
TestPoolWorkerErrors = _class(cpython._TestPoolWorkerErrors, "TestPoolWorkerErrors")
TestPoolWorkerLifetime = _class(cpython._TestPoolWorkerLifetime, "TestPoolWorkerLifetime")
