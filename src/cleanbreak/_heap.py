"""Workers that move large payloads reuse the memory their tasks free (Linux with glibc).

glibc's ``malloc`` gives every block of 32 MiB or more a mapping of its own and unmaps it on
``free``. The next such block is fresh memory from the kernel, which costs a page fault for each
4 KiB page it touches: building a 50 MB ``bytes`` took 21 ms that way on the development
machine, against 1.3 ms in memory already at hand. A worker that returns or receives large
payloads needs a block like that for each task, and a peer library's worker pays the faults
every time. So once a worker has moved a payload of ``LARGE`` bytes or more through shared
memory, it asks glibc to take every block from its heap (``M_MMAP_MAX`` 0) and to keep up to
``KEEP`` bytes free at the top of it (``M_TRIM_THRESHOLD``), where the next task finds them.
A worker that never moves such a payload keeps glibc's defaults.

What that costs is memory:

- Up to ``KEEP`` at the top of its heap. glibc keeps that much by itself once blocks of 32
  MiB have come and gone. (A larger free block there goes back at once, so blocks of up to
  about ``KEEP`` gain.)
- A block freed below one still in use stays inside the heap. So after a unit whose heap grew
  or shrank by ``KEEP`` or more, and otherwise at most once a second (a worker that idles
  until then does it then), the worker counts the heap's free bytes (``mallinfo2``), and above
  ``2 * KEEP`` it hands their pages back to the kernel (``malloc_trim``), all but ``KEEP`` at
  the top. So an idle worker holds at most ``2 * KEEP``.
- Within one task, such a block is not handed back: a task that frees a large block while a
  later small one lives, then asks for a larger block, holds both. Measured on the development
  machine: a numpy pipeline over arrays of 40 to 240 MB peaked 8% higher (1,026 MB against
  952); the worst case, 1 GB freed below a live block then 1.5 GB asked for, 65% higher.

``Pool(reuse_memory=False)`` leaves the allocator as it is. Elsewhere (musl, macOS, glibc before
2.33) nothing is changed.
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (see _notyping)
if TYPE_CHECKING:
    from typing import Any, Final

KEEP: Final = 64 << 20
# A worker reuses freed memory once it has moved a payload this large: glibc maps blocks of this
# size or more on their own, whatever it saw before (below it, it comes to keep them by itself).
LARGE: Final = 32 << 20
CHECK_EVERY: Final = 1.0  # seconds: the most a worker waits to count its free heap bytes
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_MAX: Final = -4
_MALLINFO2: Final = (  # struct mallinfo2, all size_t
    [
        "arena",
        "ordblks",
        "smblks",
        "hblks",
        "hblkhd",
        "usmblks",
        "fsmblks",
        "uordblks",
        "fordblks",
        "keepcost",
    ]
)


def _glibc_at_least(major: int, minor: int) -> bool:
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not a glibc system
        return False
    try:
        have = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:  # pragma: no cover - a version glibc never printed
        return False
    return name == "glibc" and have >= (major, minor)


class Heap:
    """This process's glibc heap, set to keep freed memory for reuse; ``tidy()`` after each
    unit hands back what piles up below blocks still in use."""

    __slots__ = ("_checked", "_info", "_keep", "_sbrk", "_skipped", "_top", "_trim")

    def __init__(self, libc: Any, ctypes: Any, keep: int) -> None:
        fields = [(name, ctypes.c_size_t) for name in _MALLINFO2]
        mallinfo2 = type("mallinfo2", (ctypes.Structure,), {"_fields_": fields})
        libc.mallinfo2.restype = mallinfo2
        libc.mallinfo2.argtypes = []
        libc.sbrk.restype = ctypes.c_void_p
        libc.sbrk.argtypes = [ctypes.c_ssize_t]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        self._info = libc.mallinfo2
        self._sbrk = libc.sbrk
        self._trim = libc.malloc_trim
        self._keep = keep
        self._top: int = self._sbrk(0) or 0
        self._checked = time.monotonic()
        self._skipped = False

    @classmethod
    def reuse(cls, keep: int = KEEP) -> Heap | None:
        """Set this process's heap to keep freed memory; ``None`` where that cannot be done."""
        if not _glibc_at_least(2, 33):  # mallinfo2 came with glibc 2.33
            return None
        try:
            import ctypes

            libc = ctypes.CDLL(None)
            heap = cls(libc, ctypes, keep)
            if not (libc.mallopt(_M_TRIM_THRESHOLD, keep) and libc.mallopt(_M_MMAP_MAX, 0)):
                return None  # pragma: no cover - glibc accepts both
        except (ImportError, AttributeError, OSError):  # pragma: no cover - no usable libc
            return None
        return heap

    def free_bytes(self) -> int:
        """Bytes free inside the heap, its top included (``mallinfo2().fordblks``)."""
        return int(self._info().fordblks)

    def tidy(self, now: bool = False) -> None:
        """After a unit: hand back the free memory above ``2 * keep``, if there may be some.
        Unless ``now``, that is counted only if the heap moved by ``keep`` since the last count,
        or a second passed; else ``due()`` says when."""
        clock = time.monotonic()
        top = self._sbrk(0) or 0
        self._skipped = (
            not now and abs(top - self._top) < self._keep and clock - self._checked < CHECK_EVERY
        )
        if self._skipped:
            return
        self._checked = clock
        if self.free_bytes() > 2 * self._keep:
            self._trim(self._keep)
        self._top = self._sbrk(0) or 0

    def due(self) -> float | None:
        """Seconds until the count that the last ``tidy()`` put off is due; ``None`` if it put
        off none. A worker that idles that long tidies ``now``, so that an idle worker does not
        hold memory for long."""
        if not self._skipped:
            return None
        return max(0.0, self._checked + CHECK_EVERY - time.monotonic())
