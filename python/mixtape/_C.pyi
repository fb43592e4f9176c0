# Stubs of the compiled extension (hand-written; checked by mypy.stubtest for missing names).
from typing import Any

import numpy as np
import numpy.typing as npt

cuda_compiled: bool

def build_info() -> dict[str, Any]: ...
def cuda_device_count() -> int: ...
def pad(
    values: npt.NDArray[np.int32] | npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    label_values: npt.NDArray[np.int32] | npt.NDArray[np.int64] | None = None,
    label_offsets: npt.NDArray[np.int64] | None = None,
    *,
    length: int,
    pad_left: bool = False,
    truncate_left: bool = False,
    pad_value: int = 0,
    label_pad_value: int = -100,
    shift_labels: bool = False,
    out_ids: npt.NDArray[np.int32] | npt.NDArray[np.int64] | None = None,
    out_mask: npt.NDArray[np.int32] | npt.NDArray[np.int64] | None = None,
    out_labels: npt.NDArray[np.int32] | npt.NDArray[np.int64] | None = None,
    check_negative: bool = True,
    elementwise: bool = False,
) -> int: ...
def pad_cuda(
    values: int,
    offsets: int,
    n: int,
    label_values: int,
    label_offsets: int,
    in_bits: int,
    out_bits: int,
    length: int,
    pad_left: bool,
    truncate_left: bool,
    pad_value: int,
    label_pad_value: int,
    shift_labels: bool,
    out_ids: int,
    out_mask: int,
    out_labels: int,
    stream: int,
) -> None: ...
