"""The ``Stateful`` contract every resumable stage implements (torchdata's protocol).

``state_dict()`` returns plain Python / numpy values (picklable, so a checkpoint can hold it) that
describe what the *consumer* has received, and ``load_state_dict(state)`` on a fresh object makes
it yield exactly what the uninterrupted one would have yielded next. ``PackingStream`` implements
it; the mixer and the loader build on it. An object whose state cannot be right (e.g. the copy in
the main process of a stream iterated by a DataLoader worker) raises instead of returning a state
that would silently resume from the start.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["Stateful"]


@runtime_checkable
class Stateful(Protocol):
    """Has ``state_dict()`` / ``load_state_dict()`` (the same shape as torchdata's ``Stateful``)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...
