"""A pool whose worker has a large argument waiting in its pipe, for ``test_shm_cleanup``.

Prints one JSON line once the pool is up: the pool's segment prefix and its worker pids. Then
the worker runs ``("hold", started)``, which creates ``started`` and waits, while the large item,
sent ahead to the same worker, waits in a segment. The test then stops or kills this process.
Exit status: 130 after ``cleanbreak.Interrupted``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import cleanbreak
from cleanbreak import _shm
from cleanbreak._manager import LocalBackend
from tests import tasks


def main() -> int:
    method, started = sys.argv[1], sys.argv[2]
    big = tasks.make_blob(2 * _shm.THRESHOLD, 1)
    try:
        with cleanbreak.Pool(1, mp_context=method) as pool:
            info = {
                "prefix": cast(LocalBackend, pool._backend)._segments.prefix,
                "pids": pool._backend.pids,
            }
            print(json.dumps(info), flush=True)
            list(pool.imap_unordered(tasks.hold_or_len, [("hold", started), big], chunksize=1))
    except cleanbreak.Interrupted:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
