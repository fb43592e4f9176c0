# Stubs of the compiled extension (hand-written; checked by mypy.stubtest for missing names).
from typing import Any

import numpy as np
import numpy.typing as npt

cuda_compiled: bool
MAX_THREADS: int

class _Pybind11Type(type):
    """pybind11's metaclass of bound classes (pybind11_builtins.pybind11_type)."""

class DeviceArray(metaclass=_Pybind11Type):
    """A device buffer for a CUDA kernel: address, element count, dtype name, device index."""

    def __init__(self, *, ptr: int, size: int, dtype: str, device: int) -> None: ...
    @property
    def ptr(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> int: ...

def build_info() -> dict[str, Any]: ...
def cuda_device_count() -> int: ...
def cuda_status() -> dict[str, Any]: ...
def _cuda_problem(
    *,
    op: str,
    error_name: str,
    error_string: str,
    runtime: int,
    driver: int,
    archs: str,
    device_cc: int,
) -> str: ...
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
    *,
    values: DeviceArray,
    offsets: DeviceArray,
    label_values: DeviceArray | None = None,
    label_offsets: DeviceArray | None = None,
    out_ids: DeviceArray | None = None,
    out_mask: DeviceArray | None = None,
    out_labels: DeviceArray | None = None,
    errors: DeviceArray | None = None,
    length: int,
    max_tokens: int = -1,
    pad_left: bool = False,
    truncate_left: bool = False,
    pad_value: int = 0,
    label_pad_value: int = -100,
    shift_labels: bool = False,
    check_negative: bool = True,
    stream: int,
) -> None: ...

PAD_ERROR_SLOTS: int

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
def pack_batch(
    carry: npt.NDArray[np.int64],
    doc_source: npt.NDArray[np.int32],
    doc_row: npt.NDArray[np.int64],
    doc_length: npt.NDArray[np.int64],
    *,
    capacity: int,
    batch_size: int,
    strategy: str = "bfd",
) -> tuple[
    npt.NDArray[np.int32],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    int,
    int,
]: ...
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
def pack_rows(
    values: npt.NDArray[np.int32] | npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    row_offsets: npt.NDArray[np.int64],
    piece_tag: npt.NDArray[np.int64] | None = None,
    *,
    capacity: int,
    pad_value: int = 0,
    label_pad_value: int = -100,
    position_start: int = 0,
    tag_pad: int = -1,
    out_ids: npt.NDArray[np.int64] | None = None,
    out_labels: npt.NDArray[np.int64] | None = None,
    out_positions: npt.NDArray[np.int64] | None = None,
    out_seq_idx: npt.NDArray[np.int32] | None = None,
    out_tags: npt.NDArray[np.int64] | None = None,
    out_cu_seqlens: npt.NDArray[np.int32] | None = None,
) -> tuple[int, int, int]: ...
def pack_fill_cuda(
    *,
    values: DeviceArray,
    offsets: DeviceArray,
    row_offsets: DeviceArray,
    doc: DeviceArray,
    start: DeviceArray,
    length: DeviceArray,
    column: DeviceArray,
    flat_offsets: DeviceArray | None = None,
    out_ids: DeviceArray | None = None,
    out_labels: DeviceArray | None = None,
    out_positions: DeviceArray | None = None,
    out_seq_idx: DeviceArray | None = None,
    out_loss_mask: DeviceArray | None = None,
    errors: DeviceArray | None = None,
    capacity: int,
    tokens: int,
    flat: bool = False,
    pad_value: int = 0,
    label_pad_value: int = -100,
    position_start: int = 0,
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

# --- sample ---
def sample_sources(
    weights: npt.NDArray[np.float64],
    counts: npt.NDArray[np.int64],
    segment_counts: npt.NDArray[np.int64],
    *,
    mode: str,
    seed: int,
    block_size: int,
    shuffle: bool,
    segment: int,
    segment_start: int,
    anchor: int,
    start: int,
    count: int,
    out_sources: npt.NDArray[np.int32] | None = None,
    out_ordinals: npt.NDArray[np.int64] | None = None,
    end_counts: npt.NDArray[np.int64] | None = None,
    greedy_path: str = "auto",
) -> int: ...
def sample_weights(weights: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.int64], int]: ...
def block_counts(weights: npt.NDArray[np.float64], block_size: int) -> npt.NDArray[np.int64]: ...
def permute_rows(
    ordinals: npt.NDArray[np.int64],
    length: npt.NDArray[np.int64],
    source: npt.NDArray[np.int64],
    *,
    seed: int,
    shuffle: bool,
    out: npt.NDArray[np.int64],
) -> None: ...

# --- gather ---
def gather_rows(
    values: npt.NDArray[Any],
    starts: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    out_offsets: npt.NDArray[np.int64],
    out: npt.NDArray[Any],
) -> None: ...

class PieceReader(metaclass=_Pybind11Type):
    """A chunked ragged column's buffers from which pieces of rows are copied (pieces.h)."""

    def __init__(
        self,
        values: list[npt.NDArray[Any]],
        offsets: list[npt.NDArray[Any]],
        mapping: npt.NDArray[np.int64] | None = None,
    ) -> None: ...
    def gather(
        self,
        sources: npt.NDArray[np.int32] | None,
        source: int,
        rows: npt.NDArray[np.int64],
        starts: npt.NDArray[np.int64],
        lengths: npt.NDArray[np.int64],
        out_offsets: npt.NDArray[np.int64],
        out: npt.NDArray[Any],
    ) -> int: ...
    @property
    def dtype(self) -> np.dtype[Any]: ...
    @property
    def num_rows(self) -> int: ...
    @property
    def num_chunks(self) -> int: ...

# --- datainf ---

def datainf(
    grads: list[npt.NDArray[np.float32] | npt.NDArray[np.uint16]],
    probes: list[npt.NDArray[np.float32]],
    keys: npt.NDArray[np.uint64],
    lambdas: npt.NDArray[np.float64],
    *,
    damping: float = 0.1,
    projection_dim: int = 0,
    seed: int = 0,
    stats_only: bool = False,
    out_influence: npt.NDArray[np.float32] | None = None,
    out_per_layer: npt.NDArray[np.float32] | None = None,
    out_a: npt.NDArray[np.float32] | None = None,
    out_q: npt.NDArray[np.float32] | None = None,
    out_lambdas: npt.NDArray[np.float64] | None = None,
    out_probe_sq: npt.NDArray[np.float64] | None = None,
    cpu_isa: int = -1,
    elementwise: bool = False,
) -> tuple[int, int]: ...
def projection_matrix(
    seed: int, layer_key: int, k: int, d: int, col_begin: int = 0, cols: int = -1
) -> npt.NDArray[np.float32]: ...
def datainf_cuda(
    grads: list[int],
    dtypes: list[int],
    dims: list[int],
    strides: list[int],
    probes: list[int],
    lambdas: list[float],
    *,
    n: int,
    damping: float,
    stats_only: bool,
    influence: int,
    per_layer: int,
    a: int,
    q: int,
    lambdas_out: int,
    b: int,
    u: int,
    u_partial: int,
    bad: int,
    stream: int,
) -> None: ...
def projection_matrix_cuda(
    out: int, seed: int, layer_key: int, k: int, d: int, col_begin: int, cols: int, stream: int
) -> None: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def _default_num_threads() -> int: ...
def _affinity_cpus() -> int: ...
def _cgroup_cpu_limit(root: str, proc_self_cgroup: str) -> int: ...
def _pool_workers() -> int: ...
def _parallel_probe(
    n: int, min_per_thread: int, throw_at: int = -1
) -> tuple[npt.NDArray[np.int32], int]: ...
