"""cleanbreak on Dask from a notebook: a real IPython kernel (``_kernel``) makes a
``LocalCluster`` and runs functions, a class, a lambda and a closure defined in its cells on it,
through ``Pool(dask=client)``. A cell's function has no importable home (``__main__`` of a
kernel), so it goes by value (issue 18)."""

from __future__ import annotations

import importlib.util

import pytest

from ._kernel import Kernel

pytest.importorskip("ipykernel")
# Only looked for: importing distributed here would install its pickling of exceptions in this
# process for the rest of the session (see the `distributed` fixture in tests/conftest.py).
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("distributed") is None, reason="distributed is not installed"
)

CELLS = [
    """
import cleanbreak, distributed
cluster = distributed.LocalCluster(
    n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
)
client = distributed.Client(cluster)
""",
    """
def sq(x):
    return x * x

class Box:
    def __init__(self, v):
        self.v = v

def grow(b):
    return Box(b.v + 1)

scale = 3
def make():
    def times(x):
        return x * scale
    return times
""",
    """
with cleanbreak.Pool(dask=client) as pool:
    got = (
        list(pool.map(sq, range(20))),
        sorted(pool.imap_unordered(lambda x: -x, range(10))),
        pool.submit(make(), 5).result(),
        [type(b) is Box and b.v for b in pool.map(grow, [Box(i) for i in range(4)])],
    )
got
""",
]


def test_cell_functions_run_on_a_local_cluster(tmp_path_factory: pytest.TempPathFactory) -> None:
    kernel = Kernel(tmp_path_factory.mktemp("kernel"))
    try:
        for cell in CELLS[:-1]:
            kernel.ok(cell)
        result = kernel.ok(CELLS[-1]).value()
        assert result == (
            [x * x for x in range(20)],
            sorted(-x for x in range(10)),
            15,
            [1, 2, 3, 4],
        )
        kernel.ok("client.close(); cluster.close()")
    finally:
        kernel.shutdown()
