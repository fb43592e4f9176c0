"""Image batches: stacked float32 ``pixel_values``, normalised per channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from mixtape.collate.output import LABEL_ALIASES, Output, ReturnTensors, stack_labels, stack_other
from mixtape.collate.sources import SOURCE_IDS, SourceNames
from mixtape.ragged import batch_columns, field_of, is_arrow

# --------------------------------------------------------------------------------------------
# Vision
# --------------------------------------------------------------------------------------------

#: Per-channel (mean, std) presets, for images scaled to [0, 1].
IMAGE_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "mnist": ((0.1307,), (0.3081,)),
}


class VisionCollator:
    """Stacks images into float32 ``pixel_values`` [B, C, H, W], normalised per channel.

    Images: HWC or HW numpy arrays (uint8 0..255 or float 0..1; PIL images via ``np.asarray``),
    or CHW tensors (``layout="auto"``: numpy is HWC, tensors CHW; or force "HWC" / "CHW").
    uint8 images are scaled by 1/255. ``normalization``: a preset name ("imagenet", "cifar10",
    "mnist"), a ``(mean, std)`` pair of per-channel tuples, or None (no normalisation).
    Grayscale images with RGB statistics are an error unless ``num_channels=3`` (the gray channel
    is repeated). ``labels`` / ``label`` become an int64 ``labels`` tensor; other fields are stacked
    or passed through. With ``source_names`` (the mixture's names, in order), ``__source__``
    becomes ``source_ids`` int64 [B] (the name's index); without it, passed through as a list.
    """

    def __init__(
        self,
        normalization: str | tuple[Sequence[float], Sequence[float]] | None = "imagenet",
        *,
        image_key: str = "pixel_values",
        num_channels: int | None = None,
        layout: Literal["auto", "HWC", "CHW"] = "auto",
        return_tensors: ReturnTensors = True,
        pin_memory: bool = False,
        source_names: Sequence[str] | None = None,
    ) -> None:
        if isinstance(normalization, str):
            if normalization not in IMAGE_NORMALIZATION:
                raise ValueError(
                    f"unknown normalization preset {normalization!r}; "
                    f"presets: {sorted(IMAGE_NORMALIZATION)} or a (mean, std) pair"
                )
            mean, std = IMAGE_NORMALIZATION[normalization]
        elif normalization is None:
            mean, std = (0.0,), (1.0,)
        else:
            mean, std = (tuple(float(v) for v in x) for x in normalization)
        if len(mean) != len(std) or not mean:
            raise ValueError(f"mean {mean} and std {std} must have the same, non-zero length")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be > 0, got {std}")
        if num_channels not in (None, 1, 3, 4):
            raise ValueError(f"num_channels must be 1, 3 or 4, got {num_channels}")
        if layout not in ("auto", "HWC", "CHW"):
            raise ValueError(f"layout must be 'auto', 'HWC' or 'CHW', got {layout!r}")
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.normalize = normalization is not None
        self.image_key = image_key
        self.num_channels = num_channels
        self.layout = layout
        self._sources = SourceNames(source_names)
        self.source_names = self._sources.names
        self._out = Output(return_tensors, pin_memory)

    def _chw(self, img: Any, i: int) -> npt.NDArray[Any]:
        """One image as a CHW numpy array (a view when possible)."""
        is_tensor = hasattr(img, "detach") and hasattr(img, "numpy")
        arr = img.detach().cpu().numpy() if is_tensor else np.asarray(img)
        if arr.dtype.kind not in "uif" and arr.dtype.kind != "b":
            raise TypeError(f"{self.image_key}: example {i} has dtype {arr.dtype}, not numeric")
        if arr.ndim == 2:
            return arr[None]
        if arr.ndim != 3:
            raise ValueError(f"{self.image_key}: example {i} must be HW, HWC or CHW, got shape "
                             f"{arr.shape}")  # fmt: skip
        layout = self.layout
        if layout == "auto":
            chans = (1, 3, 4)
            if arr.shape[0] in chans and arr.shape[2] not in chans:
                layout = "CHW"
            elif arr.shape[2] in chans and arr.shape[0] not in chans:
                layout = "HWC"
            else:
                layout = "CHW" if is_tensor else "HWC"
        return arr.transpose(2, 0, 1) if layout == "HWC" else arr

    def __call__(self, batch: Any) -> dict[str, Any]:
        c = batch_columns(batch)
        sources = self._sources.take(c)
        col = field_of(c, self.image_key)
        if is_arrow(col):
            col = col.to_pylist()
        images = list(col)  # a list, or the rows of a stacked array / tensor
        chw = [self._chw(img, i) for i, img in enumerate(images)]
        shape = chw[0].shape
        for i, a in enumerate(chw):
            if a.shape != shape:
                raise ValueError(f"{self.image_key}: example {i} has shape {a.shape} (as CHW) but "
                                 f"example 0 has {shape}")  # fmt: skip
        kinds = {a.dtype for a in chw}
        if len(kinds) > 1:
            raise TypeError(f"{self.image_key}: images mix dtypes {sorted(map(str, kinds))}")
        chans, height, width = shape
        target = self.num_channels or chans
        if chans != target:
            if chans == 1:
                chw = [np.broadcast_to(a, (target, height, width)) for a in chw]
            else:
                raise ValueError(f"{self.image_key}: images have {chans} channels, num_channels "
                                 f"is {target}")  # fmt: skip
        nstats = self.mean.size
        if self.normalize and nstats not in (1, target):
            raise ValueError(
                f"{self.image_key}: normalization has {nstats} channels but images have {target}"
                + (" (pass num_channels=3 to repeat the gray channel)" if target == 1 else "")
            )
        scale = np.float32(1 / 255) if chw[0].dtype == np.uint8 else np.float32(1)
        mul = np.broadcast_to((scale / self.std)[:, None, None], (target, 1, 1)).astype(np.float32)
        sub = np.broadcast_to((self.mean / self.std)[:, None, None], (target, 1, 1))
        out = self._out.empty((len(chw), target, height, width), np.float32)
        for i, a in enumerate(chw):  # one vectorised op per image, writing its slot
            np.multiply(a, mul, out=out[i], casting="unsafe")
        if self.normalize:
            out -= sub.astype(np.float32)
        result = {self.image_key: self._out.wrap(out)}
        if sources is not None:
            result[SOURCE_IDS] = self._out.wrap(sources)
        present = [k for k in LABEL_ALIASES if k in c.cols]
        if len(present) > 1:
            raise ValueError(f"batch has several label fields {present}: keep one")
        for key, value in c.cols.items():
            if key == self.image_key:
                continue
            if key in present:
                labels = stack_labels(value, key, False)  # errors name the example
                if labels is None:  # an unlabelled split
                    result["labels"] = None
                    continue
                arr = np.asarray(labels)
                if arr.dtype.kind not in "iu" or arr.ndim != 1:
                    raise TypeError(f"{key}: expected one integer label per example, got "
                                    f"dtype {arr.dtype} shape {arr.shape}")  # fmt: skip
                result["labels"] = self._out.wrap(arr.astype(np.int64))
            else:
                result[key] = stack_other(value, key, self._out.tensors)
        return result
