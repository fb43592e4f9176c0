"""The ``Stateful`` contract every resumable stage implements (torchdata's protocol).

``state_dict()`` returns plain Python / numpy values (picklable, so a checkpoint can hold it) that
describe what the *consumer* has received, and ``load_state_dict(state)`` on a fresh object makes
it yield exactly what the uninterrupted one would have yielded next. ``PackingStream`` implements
it; the mixer and the loader build on it. An object whose state cannot be right (e.g. the copy in
the main process of a stream iterated by a DataLoader worker) raises instead of returning a state
that would silently resume from the start: :class:`IterationOwner` records which process
iterates an object so that its ``state_dict()`` can tell.
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.context import get_spawning_popen
from typing import Any, Protocol, runtime_checkable

__all__ = ["IterationOwner", "SharedInt", "Stateful"]


@runtime_checkable
class Stateful(Protocol):
    """Has ``state_dict()`` / ``load_state_dict()`` (the same shape as torchdata's ``Stateful``)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class SharedInt:
    """A 64-bit int shared with DataLoader workers: inherited by fork, passed to spawn while
    spawning (so a change in the main process reaches persistent workers and vice versa).

    A plain pickle or deepcopy is a new, unshared int holding the same value (``copy_value``
    False: 0), since a copy is its own object.
    """

    copy_value = True

    def __init__(self, value: int = 0) -> None:
        self._shared = multiprocessing.RawValue("q", int(value))

    @property
    def value(self) -> int:
        return int(self._shared.value)

    @value.setter
    def value(self, value: int) -> None:
        self._shared.value = int(value)

    def __getstate__(self) -> dict[str, Any]:
        spawning = get_spawning_popen() is not None  # a RawValue pickles only while spawning
        return {"shared": self._shared if spawning else None,
                "value": self.value if self.copy_value else 0}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        shared = state["shared"]
        if shared is None:  # a plain pickle / deepcopy: a new int of its own
            shared = multiprocessing.RawValue("q", state["value"])
        self._shared = shared

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.value})"


class IterationOwner(SharedInt):
    """The pid of the process that last iterated an object (0: none yet), shared with its
    DataLoader workers: a ``state_dict()`` taken in another process describes a copy that never
    advanced. A plain pickle / deepcopy starts unowned (the copy is its own object)."""

    copy_value = False

    def claim(self) -> None:
        """This process iterates the object (or holds its state) from now on."""
        self.value = os.getpid()

    def elsewhere(self) -> int:
        """The pid of another process iterating the object, or 0 when it is this one or none."""
        owner = self.value
        return owner if owner and owner != os.getpid() else 0
