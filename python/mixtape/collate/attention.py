"""What keeps packed documents apart in a model: the attention setting of a packed batch, read
from the model, and the block-diagonal mask built on the model's device from ``seq_idx``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mixtape.ops import block_causal_mask

if TYPE_CHECKING:
    import torch

#: ``attention`` choices of :class:`~mixtape.PackedCollator`; transformers' ``attn_implementation``
#: names of flash attention are accepted as aliases of ``"flash"``.
PACKED_ATTENTION = ("flash", "sdpa", "eager", "none")
ATTENTION_ALIASES = {"flash_attention_2": "flash", "flash_attention_3": "flash"}
# transformers' attn_implementation -> what a packed batch must carry for it.
_FROM_IMPLEMENTATION = {"flash_attention_2": "flash", "flash_attention_3": "flash",
                        "sdpa": "sdpa", "eager": "eager"}  # fmt: skip


def model_attention(model: Any = None, config: Any = None) -> str:
    """``"flash"``, ``"sdpa"`` or ``"eager"`` from a transformers model or config.

    Reads ``config._attn_implementation`` (what the model runs; set when the model is built) or
    ``attn_implementation``. Anything else (``flex_attention``, a hub kernel, or None on a config
    no model was built from) is a ValueError saying what to pass instead, never a guess.
    """
    if config is None:
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError(
                f"model {type(model).__name__} has no .config to read its attention "
                "implementation from: pass attention='flash', 'sdpa' or 'eager'"
            )
    if isinstance(config, Mapping):
        impl = config.get("_attn_implementation") or config.get("attn_implementation")
    else:
        impl = getattr(config, "_attn_implementation", None) or getattr(
            config, "attn_implementation", None)  # fmt: skip
    if isinstance(impl, str) and impl in _FROM_IMPLEMENTATION:
        return _FROM_IMPLEMENTATION[impl]
    raise ValueError(
        f"the model's attention implementation is {impl!r}, which a packed batch cannot be made "
        "for automatically: pass attention='flash' (flash_attention_2/3: cu_seq_lens), 'sdpa' "
        "(bool block-diagonal mask) or 'eager' (additive mask) matching how the model runs, or "
        "load the model with attn_implementation= one of flash_attention_2, sdpa, eager"
    )


def sliding_window(model: Any = None, config: Any = None) -> int | None:
    """The sliding-window size of a transformers model or config when some layer uses one
    (``sliding_window`` with ``layer_types`` naming ``sliding_attention``, or without
    ``layer_types`` unless ``use_sliding_window`` is false), else None."""
    if config is None:
        config = getattr(model, "config", None)
    if config is None:
        return None

    def get(key: str, default: Any = None) -> Any:
        if isinstance(config, Mapping):
            return config.get(key, default)
        return getattr(config, key, default)

    window = get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    types = get("layer_types")
    if types is not None:
        return window if "sliding_attention" in list(types) else None
    return None if get("use_sliding_window", True) is False else window


def resolve_attention(attention: str | None, model: Any = None, config: Any = None) -> str:
    """The collator's ``attention``: given, or read from ``model``/``config``; never a default.

    Given both, they must agree (a batch made for another implementation attends across
    documents without any error).
    """
    if attention is not None and not isinstance(attention, str):
        raise TypeError(f"attention must be a string, got {attention!r}")
    if attention is not None:
        attention = ATTENTION_ALIASES.get(attention, attention)
        if attention not in PACKED_ATTENTION:
            raise ValueError(f"attention must be one of {PACKED_ATTENTION}, got {attention!r}")
    if model is None and config is None:
        if attention is None:
            raise ValueError(
                "PackedCollator needs to know how the model attends, since a batch made for "
                "another implementation silently attends across documents: pass model= or "
                "config= (read from its attn_implementation), or attention= one of "
                f"{PACKED_ATTENTION} ('flash' for flash_attention_2/3)"
            )
        return attention
    inferred = model_attention(model, config)
    if attention is not None and attention not in (inferred, "none"):
        raise ValueError(
            f"attention={attention!r} but the model runs {inferred!r} attention: documents "
            "would attend to each other; drop attention= or fix it"
        )
    return attention if attention is not None else inferred


def packed_attention_mask(
    seq_idx: torch.Tensor, attention: str = "sdpa", dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The block-diagonal causal mask ``[B, 1, L, L]`` for ``seq_idx`` ``[B, L]``, on its device.

    ``attention="sdpa"`` gives a bool mask (True = attend), ``"eager"`` an additive one of
    ``dtype`` (default float32). ``seq_idx`` is what ``PackedCollator(mask="device")`` returns
    (-1 on padding); move it to the GPU first and the mask is built there, never copied.
    """
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention must be 'sdpa' or 'eager' for a mask, got {attention!r}")
    return block_causal_mask(seq_idx, additive=attention == "eager", dtype=dtype)


def attach_packed_mask(model: Any) -> Any:
    """Make ``model`` accept batches of ``PackedCollator(mask="device")``; returns the hook handle.

    A forward pre-hook pops ``seq_idx`` from the call's kwargs and passes instead the
    ``attention_mask`` built on the model's device for the model's attention implementation
    (read at every call: bool for sdpa, additive in the model's float dtype for eager). Calls
    without ``seq_idx`` are untouched. transformers models silently ignore an unknown
    ``seq_idx`` kwarg, so a device-mask batch given to a model without this hook would attend
    across documents: that is why ``mask="device"`` is never a default.
    """
    import torch

    model_attention(model)  # fails now, not at the first batch, for an unsupported model

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        seq_idx = kwargs.pop("seq_idx", None)
        if seq_idx is None:
            return None
        if kwargs.get("attention_mask") is not None:
            raise ValueError(
                "the batch has both seq_idx and attention_mask: a packed batch carries one of "
                "them (PackedCollator mask='device' or 'host')"
            )
        attention = model_attention(module)
        if attention == "flash":
            raise ValueError(
                "the model runs flash attention, which reads cu_seq_lens, not a mask: collate "
                "with PackedCollator(attention='flash')"
            )
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.dtype.is_floating_point else None
        seq = torch.as_tensor(seq_idx).to(device, non_blocking=True)
        kwargs["attention_mask"] = packed_attention_mask(
            seq, attention, dtype if attention == "eager" else None)  # fmt: skip
        return args, kwargs

    return model.register_forward_pre_hook(hook, with_kwargs=True)
