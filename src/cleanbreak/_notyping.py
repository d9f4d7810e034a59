"""What cleanbreak's classes take from ``typing`` at runtime, without importing it.

``import typing`` costs about 3 ms (measured on top of the standard library that the pool
imports anyway), paid by every program's first use of a pool and by every worker that spawn
or a fork server starts. Nothing in cleanbreak needs it at runtime: annotations are not
evaluated (``from __future__ import annotations``), and each module imports its ``typing``
names under ``if TYPE_CHECKING:``, with ``TYPE_CHECKING = False`` set in the module itself (the
type checker reads any name ``TYPE_CHECKING`` as true). What a class statement or a runtime
expression still names comes from here instead; the type checker never sees these.
"""

from __future__ import annotations

T = object  # a type variable, where one is subscripted at runtime: ``Future[T]``


class Protocol:
    """``typing.Protocol`` as a base class: at runtime the protocols only document."""

    __slots__ = ()


class Generic:
    """``typing.Generic`` as a base class: ``Generic[T]`` is this class itself."""

    __slots__ = ()

    def __class_getitem__(cls, params: object) -> type[Generic]:
        return cls
