# Stubs of the compiled extension (hand-written; checked by mypy.stubtest for missing names).
from typing import Any

import numpy as np
import numpy.typing as npt

cuda_compiled: bool
MAX_THREADS: int

def build_info() -> dict[str, Any]: ...
def cuda_device_count() -> int: ...
def pad(
    values: npt.NDArray[np.int32] | npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    label_values: npt.NDArray[np.int32] | npt.NDArray[np.int64] | None = None,
    label_offsets: npt.NDArray[np.int64] | None = None,
    *,
    length: int,
    max_tokens: int = -1,
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
    max_tokens: int,
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
def pack_plan(
    lengths: npt.NDArray[np.int32] | npt.NDArray[np.int64],
    *,
    capacity: int,
    strategy: str = "bfd",
    overflow: str = "split",
    max_docs_per_row: int = 0,
    align: int = 1,
    rows_multiple_of: int = 1,
    shuffle_seed: int | None = None,
) -> dict[str, Any]: ...
def pack_check(
    offsets: npt.NDArray[np.int64],
    row_offsets: npt.NDArray[np.int64],
    doc: npt.NDArray[np.int64],
    start: npt.NDArray[np.int64],
    length: npt.NDArray[np.int64],
    column: npt.NDArray[np.int64],
    *,
    capacity: int,
) -> int: ...
def pack_fill(
    values: npt.NDArray[np.int32] | npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    row_offsets: npt.NDArray[np.int64],
    doc: npt.NDArray[np.int64],
    start: npt.NDArray[np.int64],
    length: npt.NDArray[np.int64],
    column: npt.NDArray[np.int64],
    *,
    capacity: int,
    flat: bool = False,
    pad_value: int = 0,
    label_pad_value: int = -100,
    position_start: int = 0,
    out_ids: npt.NDArray[np.int32] | npt.NDArray[np.int64] | None = None,
    out_labels: npt.NDArray[np.int32] | npt.NDArray[np.int64] | None = None,
    out_positions: npt.NDArray[np.int64] | None = None,
    out_seq_idx: npt.NDArray[np.int32] | None = None,
    out_loss_mask: npt.NDArray[np.bool_] | None = None,
    elementwise: bool = False,
) -> int: ...
def pack_fill_cuda(
    values: int,
    offsets: int,
    num_docs: int,
    row_offsets: int,
    doc: int,
    start: int,
    length: int,
    column: int,
    flat_offsets: int,
    rows: int,
    pieces: int,
    total: int,
    in_bits: int,
    out_bits: int,
    capacity: int,
    flat: bool,
    pad_value: int,
    label_pad_value: int,
    position_start: int,
    out_ids: int,
    out_labels: int,
    out_positions: int,
    out_seq_idx: int,
    out_loss_mask: int,
    stream: int,
) -> None: ...
def block_causal_mask(
    seq_idx: npt.NDArray[np.int32] | npt.NDArray[np.int64],
    out: npt.NDArray[Any],
    allowed: int,
    blocked: int,
) -> int: ...
def ints_from_lists(
    rows: list[list[int]], name: str = "input_ids", first: int = 0
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def _default_num_threads() -> int: ...
def _affinity_cpus() -> int: ...
def _cgroup_cpu_limit(root: str, proc_self_cgroup: str) -> int: ...
def _pool_workers() -> int: ...
def _parallel_probe(
    n: int, min_per_thread: int, throw_at: int = -1
) -> tuple[npt.NDArray[np.int32], int]: ...
