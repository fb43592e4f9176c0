"""A process-wide registry of collator factories, selectable by name or by modality.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from mixtape.collate.flattening import create_flattening_collate
from mixtape.collate.packed import create_packed_collate
from mixtape.collate.padding import (
    create_causal_lm_collate,
    create_collate_fn,
    create_seq2seq_collate,
)
from mixtape.collate.vision import VisionCollator

# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class CollatorInfo:
    """A registered collator factory."""

    name: str
    modality: str
    description: str
    factory: Callable[..., Any]


class CollatorRegistry:
    """Process-wide registry of collator factories, selectable by name or by modality.

    ``CollatorRegistry()`` is always the same object. Register with the decorator
    ``@CollatorRegistry.register(name, modality=..., description=...)`` on a class or factory
    function; ``get_collator(name=...)`` or ``get_collator(modality=...)`` (the first registered
    for that modality, or the one registered with ``default=True``) builds one with ``**kwargs``.
    """

    _instance: ClassVar[CollatorRegistry | None] = None
    _entries: ClassVar[dict[str, CollatorInfo]] = {}
    _defaults: ClassVar[dict[str, str]] = {}

    def __new__(cls) -> CollatorRegistry:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    @classmethod
    def register(
        cls,
        name: str,
        *,
        modality: str = "text",
        description: str = "",
        default: bool = False,
        overwrite: bool = False,
    ) -> Callable[[F], F]:
        """Decorator registering a collator class or factory under ``name``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"collator name must be a non-empty string, got {name!r}")

        def deco(factory: F) -> F:
            if not callable(factory):
                raise TypeError(f"collator {name!r}: {factory!r} is not callable")
            if name in cls._entries and not overwrite:
                raise ValueError(f"a collator named {name!r} is already registered")
            cls._entries[name] = CollatorInfo(name, modality, description, factory)
            if default or modality not in cls._defaults:
                cls._defaults[modality] = name
            return factory

        return deco

    @classmethod
    def unregister(cls, name: str) -> None:
        """Remove a registered collator (and its modality default)."""
        info = cls._entries.pop(name, None)
        if info is None:
            raise KeyError(f"no collator named {name!r}")
        if cls._defaults.get(info.modality) == name:
            rest = [e.name for e in cls._entries.values() if e.modality == info.modality]
            if rest:
                cls._defaults[info.modality] = rest[0]
            else:
                del cls._defaults[info.modality]

    @classmethod
    def get_collator(
        cls, name: str | None = None, *, modality: str | None = None, **kwargs: Any
    ) -> Any:
        """Build the collator registered as ``name``, or the default one for ``modality``."""
        if name is None and modality is None:
            raise ValueError("get_collator needs name=... or modality=...")
        if name is None:
            assert modality is not None
            name = cls.default_name(modality)
        info = cls._entries.get(name)
        if info is None:
            raise ValueError(f"no collator named {name!r}; registered: {sorted(cls._entries)}")
        if modality is not None and info.modality != modality:
            raise ValueError(
                f"collator {name!r} is for modality {info.modality!r}, not {modality!r}"
            )
        return info.factory(**kwargs)

    @classmethod
    def default_name(cls, modality: str) -> str:
        """The name of the collator ``get_collator(modality=...)`` builds for ``modality``."""
        if modality not in cls._defaults:
            raise ValueError(
                f"no collator for modality {modality!r}; modalities: {sorted(cls._defaults)}"
            )
        return cls._defaults[modality]

    @classmethod
    def list_collators(cls, modality: str | None = None) -> list[CollatorInfo]:
        """Registered collators (of one modality, if given), in registration order."""
        return [e for e in cls._entries.values() if modality is None or e.modality == modality]


def get_collator(name: str | None = None, *, modality: str | None = None, **kwargs: Any) -> Any:
    """Build a registered collator by name or modality (see CollatorRegistry.get_collator)."""
    return CollatorRegistry.get_collator(name, modality=modality, **kwargs)


def list_collators(modality: str | None = None) -> list[CollatorInfo]:
    """The registered collators (see CollatorRegistry.list_collators)."""
    return CollatorRegistry.list_collators(modality)




# The built-in collators.
CollatorRegistry.register(
    "padding", modality="text", description="pad ids, mask and labels (DataCollatorWithPadding)"
)(create_collate_fn)
CollatorRegistry.register(
    "causal_lm", modality="text", description="causal LM: labels = ids, -100 on padding by length"
)(create_causal_lm_collate)
CollatorRegistry.register(
    "seq2seq", modality="text", description="encoder ids/mask, labels, decoder_input_ids"
)(create_seq2seq_collate)
CollatorRegistry.register(
    "flattening", modality="text",
    description="padding-free [1, T] batches (DataCollatorWithFlattening format)",
)(create_flattening_collate)  # fmt: skip
CollatorRegistry.register(
    "vision", modality="vision", description="stack and normalise images, int64 labels"
)(VisionCollator)
CollatorRegistry.register(
    "packed", modality="text",
    description="packed rows (pack_sequences / TRL pack_dataset): labels and position_ids per "
    "document, flash-attention kwargs or a block-diagonal causal mask",
)(create_packed_collate)  # fmt: skip
