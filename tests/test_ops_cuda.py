"""The CUDA paths' host side, without a GPU: dispatch on usability (clear errors for a CPU-only
build or a driver too old for the runtime), the keyword-only DeviceArray bindings that check every
buffer before a launch, and the descriptors ops.py builds, checked by the real bindings."""

from __future__ import annotations

import contextlib
import re
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from mixtape import ops
from mixtape.ops import cuda_available

compiled = pytest.mark.skipif(not ops._C.cuda_compiled, reason="built without CUDA kernels")
# Runs the real bindings up to their launch: only where no GPU could take the host pointers.
no_gpu = pytest.mark.skipif(cuda_available(), reason="needs a machine without a usable GPU")


class FakeCudaTensor:
    """What the dispatch looks at: a tensor that says it is on a GPU."""

    is_cuda = True
    device = torch.device("cuda", 0)


# --- dispatch on cuda_usable -------------------------------------------------------------------


@compiled
@no_gpu
@pytest.mark.parametrize("op", ["pad", "pack_fill"])
def test_cuda_tensor_without_a_usable_gpu_says_why(op: str) -> None:
    """A CUDA build on a machine whose driver cannot run its runtime (here: none at all) used to
    reach the launch ('kernel launch failed'); now the error names both versions and the fix."""
    offsets = np.array([0, 2])
    with pytest.raises(RuntimeError) as info:
        if op == "pad":
            ops.pad(FakeCudaTensor(), offsets)
        else:
            ops.pack_fill(ops.pack_plan([2], 4), FakeCudaTensor(), offsets)
    status = ops._C.cuda_status()
    runtime = ops.build_info()["cuda_runtime_version"]
    message = str(info.value)
    assert message.startswith(f"{op}: the inputs are on cuda:0, but ")
    assert status["error"] in message and status["message"] in message
    assert f"CUDA {runtime // 1000}.{runtime % 1000 // 10} runtime" in message
    assert f"cudaDriverGetVersion = {status['driver_version']}" in message
    assert "MIXTAPE_CUDA=OFF" in message and "kernel launch failed" not in message


def test_cuda_tensor_given_to_a_cpu_only_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops._C, "cuda_compiled", False)
    with pytest.raises(RuntimeError, match="pad: the inputs are on cuda:0, but this build of "
                                           "mixtape has no CUDA kernels"):  # fmt: skip
        ops.pad(FakeCudaTensor(), np.array([0, 2]))
    with pytest.raises(RuntimeError, match="MIXTAPE_CUDA=ON"):
        ops.pack_fill(ops.pack_plan([2], 4), FakeCudaTensor(), np.array([0, 2]))


def test_build_info_reports_the_driver_version() -> None:
    info = ops.build_info()
    if info["cuda_compiled"]:
        assert isinstance(info["cuda_driver_version"], int)
        assert info["cuda_driver_version"] == ops._C.cuda_status()["driver_version"]
        assert "virtual" in info["cuda_architectures"]  # PTX for GPUs newer than the cubins


def problem(**kw: Any) -> str:
    args = {"op": "pad_cuda", "error_name": "cudaErrorInsufficientDriver",
            "error_string": "CUDA driver version is insufficient for CUDA runtime version",
            "runtime": 13000, "driver": 12040, "archs": "80-real;90-real;90-virtual",
            "device_cc": 0}  # fmt: skip
    return ops._C._cuda_problem(**{**args, **kw})


def test_cuda_problem_messages() -> None:
    old = problem()
    assert "mixtape was built with the CUDA 13.0 runtime" in old
    assert "the NVIDIA driver supports CUDA 12.4 at most (cudaDriverGetVersion = 12040)" in old
    assert "CUDA 13.x needs driver 580 or newer" in old
    assert "MIXTAPE_CUDA=OFF" in old and "--force-reinstall" in old
    assert "no NVIDIA driver was found" in problem(driver=0)
    assert "needs driver 525 or newer" in problem(runtime=12080, driver=11080)
    image = problem(error_name="cudaErrorNoKernelImageForDevice", error_string="no image",
                    driver=13000, device_cc=120)  # fmt: skip
    assert "compute capability 12.0" in image and "built for CUDA architectures 80-real" in image
    assert "CMAKE_CUDA_ARCHITECTURES=120-real" in image
    other = problem(error_name="cudaErrorIllegalAddress", error_string="illegal", driver=13000)
    assert other == "pad_cuda: cudaErrorIllegalAddress (illegal)"


# --- DeviceArray: keyword-only, every buffer checked -------------------------------------------


def device_array(size: int, dtype: str = "int64", device: int = 0, ptr: int = 4096) -> Any:
    return ops._C.DeviceArray(ptr=ptr, size=size, dtype=dtype, device=device)


@compiled
def test_cuda_bindings_take_no_positional_arguments() -> None:
    """18-25 positional integers: a swapped pair of pointers or sizes was silently accepted."""
    with pytest.raises(TypeError, match="incompatible function arguments"):
        ops._C.pad_cuda(device_array(5), device_array(3), 2, 0, 0)  # type: ignore[misc]
    with pytest.raises(TypeError, match="incompatible function arguments"):
        ops._C.pack_fill_cuda(*(device_array(1) for _ in range(7)))  # type: ignore[misc]


@compiled
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"offsets": device_array(3, "int32")}, "offsets must be int64, got int32"),
        ({"values": device_array(5, "float32")}, "values must be int32 or int64, got float32"),
        ({"out_ids": device_array(7)}, "out_ids must have 8 elements, got 7"),
        ({"out_mask": device_array(8, "int32")}, "out_mask must be int64, got int32"),
        ({"out_labels": device_array(8, device=1)}, "out_labels is on cuda:1, the kernel runs"),
        ({"label_values": device_array(5)}, "label_values and label_offsets go together"),
        ({"label_values": device_array(5), "label_offsets": device_array(2)},
         "label_offsets must have 3 elements, got 2"),
        ({"errors": device_array(3)}, "errors must have 6 elements, got 3"),
        ({"out_ids": device_array(8, ptr=0)}, "out_ids has a null address"),
        # values and offsets swapped: 5 offsets make 4 rows, whose outputs would need 16.
        ({"values": device_array(3), "offsets": device_array(5)}, "must have 16 elements, got 8"),
        ({"length": 2**62 + 1}, "2 rows of length 4611686018427387905 do not fit"),
    ],
)  # fmt: skip
def test_pad_cuda_checks_every_buffer_before_the_launch(change: dict[str, Any],
                                                        message: str) -> None:  # fmt: skip
    kw: dict[str, Any] = {"values": device_array(5), "offsets": device_array(3),
                          "out_ids": device_array(8), "out_mask": device_array(8),
                          "out_labels": device_array(8), "errors": device_array(6), "length": 4,
                          "stream": 0}  # fmt: skip
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        ops._C.pad_cuda(**{**kw, **change})


@compiled
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"doc": device_array(3)}, "start must have 3 elements, got 2"),
        ({"row_offsets": device_array(3, "int32")}, "row_offsets must be int64"),
        ({"out_seq_idx": device_array(16)}, "out_seq_idx must be int32, got int64"),
        ({"out_loss_mask": device_array(15, "bool")}, "out_loss_mask must have 16 elements"),
        ({"flat": True}, "the flat layout needs flat_offsets"),
        ({"flat": True, "flat_offsets": device_array(3)}, "must have 5 elements, got 16"),
        ({"errors": device_array(6)}, "errors must have 2 elements, got 6"),
        ({"capacity": 2**62 + 1}, "2 rows of capacity 4611686018427387905 do not fit"),
    ],
)  # fmt: skip
def test_pack_fill_cuda_checks_every_buffer_before_the_launch(change: dict[str, Any],
                                                              message: str) -> None:  # fmt: skip
    kw: dict[str, Any] = {
        "values": device_array(5), "offsets": device_array(3), "row_offsets": device_array(3),
        "doc": device_array(2), "start": device_array(2), "length": device_array(2),
        "column": device_array(2), "out_ids": device_array(16), "out_seq_idx":
        device_array(16, "int32"), "errors": device_array(2), "capacity": 8, "tokens": 5,
        "stream": 0,
    }  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(message)):
        ops._C.pack_fill_cuda(**{**kw, **change})


def test_device_array_checks_the_tensor() -> None:
    dev = torch.device("cpu")
    t = torch.zeros(4, 3, dtype=torch.int64)
    a = ops._device_array(t, "x", dev, (torch.int64,), size=12)
    assert (a.ptr, a.size, a.dtype, a.device) == (t.data_ptr(), 12, "int64", -1)
    assert ops._device_array(None, "x", dev, (torch.int64,)) is None
    for bad, why in ((t.t(), "contiguous"), (t.int(), "int32"), (t, "12 elements")):
        with pytest.raises(ValueError, match=r"x must be a contiguous int64 tensor"):
            ops._device_array(bad, "x", dev, (torch.int64,), size=12 if why != "12 elements"
                              else 11)  # fmt: skip
    with pytest.raises(ValueError, match="on meta"):
        ops._device_array(t, "x", torch.device("meta"), (torch.int64,))


# --- the descriptors ops.py builds, checked by the real bindings ------------------------------


@pytest.fixture
def host_as_device(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Runs the CUDA paths on CPU tensors up to the binding: uploads are host copies, no device
    context, the watched error flags are collected."""
    watched: list[Any] = []
    monkeypatch.setattr(ops, "_require_cuda", lambda op, device: None)
    monkeypatch.setattr(ops, "_on_device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(ops, "_launch_stream", lambda device: SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(ops, "_upload", lambda arrays, device: [
        torch.from_numpy(np.ascontiguousarray(a).copy()) for a in arrays])  # fmt: skip
    monkeypatch.setattr(ops, "_watch", lambda errors, stream, report: watched.append(report))
    return watched


# Tensor methods that wait for the device when the tensor is on a GPU.
SYNCING = {"nonzero", "any", "all", "cpu", "item", "tolist", "numpy", "__bool__", "__int__",
           "__index__", "__float__", "equal", "unique"}  # fmt: skip
CALLS: list[str] = []


class HostTensor(torch.Tensor):
    """A CPU tensor the dispatch takes for a CUDA one; records the torch functions called on it
    (and on tensors computed from it)."""

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        CALLS.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def as_cuda(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).as_subclass(HostTensor)


def launch_reached(excinfo: pytest.ExceptionInfo[BaseException]) -> bool:
    """The binding accepted every descriptor and went on to the CUDA runtime (which, with no
    driver here, fails with the driver message)."""
    message = str(excinfo.value)
    return isinstance(excinfo.value, RuntimeError) and message.startswith(
        ("pad_cuda: cudaError", "pack_fill_cuda: cudaError")
    )


@compiled
@no_gpu
@pytest.mark.parametrize("in_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("out_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("check_ids", [False, True])
def test_pad_descriptors_pass_the_binding_checks(
    host_as_device: list[Any], in_dtype: Any, out_dtype: Any, labels: bool, check_ids: bool
) -> None:
    values = np.arange(7, dtype=in_dtype)
    offsets = np.array([0, 3, 3, 7])
    kw: dict[str, Any] = {"dtype": out_dtype, "check_ids": check_ids, "max_length": 3,
                          "return_labels": True}  # fmt: skip
    if labels:
        kw.update(labels=as_cuda(values[::-1].copy()), label_offsets=offsets)
    CALLS.clear()
    with pytest.raises(RuntimeError) as info:
        ops.pad(as_cuda(values), offsets, **kw)
    assert launch_reached(info), info.value
    # The ids were checked without reading them back (.nonzero().cpu() / .any() did, each a sync).
    assert CALLS and not SYNCING & set(CALLS), sorted(set(CALLS))


@compiled
@no_gpu
@pytest.mark.parametrize("layout", ["padded", "flat"])
@pytest.mark.parametrize("out_dtype", [np.int32, np.int64])
def test_pack_fill_descriptors_pass_the_binding_checks(
    host_as_device: list[Any], layout: str, out_dtype: Any
) -> None:
    lengths = np.array([3, 9, 2, 5])
    values = np.arange(int(lengths.sum()), dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    plan = ops.pack_plan(lengths, 8)
    CALLS.clear()
    with pytest.raises(RuntimeError) as info:
        ops.pack_fill(plan, as_cuda(values), offsets, layout=layout, dtype=out_dtype,
                      fields=ops.PACK_FIELDS, cu_seqlens_size=20)  # fmt: skip
    assert launch_reached(info), info.value
    assert CALLS and not SYNCING & set(CALLS), sorted(set(CALLS))


def test_pad_error_slots_match_the_kernel() -> None:
    if ops._C.cuda_compiled:
        assert ops._PAD_ERROR_SLOTS == ops._C.PAD_ERROR_SLOTS


def test_check_cuda_errors_reports_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pending kernel verdicts are read in launch order; wait=False stops at one not finished."""

    class Event:
        def __init__(self, done: bool) -> None:
            self.done = done

        def query(self) -> bool:
            return self.done

        def synchronize(self) -> None:
            self.done = True

    def check(done: bool, message: str | None) -> Any:
        flags = torch.zeros(1, dtype=torch.int64)
        return ops._DeviceCheck(Event(done), flags, lambda f: message)

    pending = ops._pending_checks
    monkeypatch.setattr(ops, "_pending_checks", type(pending)())
    ops._pending_checks.extend([check(True, None), check(False, "second"), check(True, "third")])
    ops.check_cuda_errors(wait=False)  # the first is fine, the second not finished
    assert len(ops._pending_checks) == 2
    with pytest.raises(ValueError, match="second"):
        ops.check_cuda_errors()
    with pytest.raises(ValueError, match="third"):
        ops.check_cuda_errors(wait=False)
    ops.check_cuda_errors()
    assert not ops._pending_checks


def test_unread_verdicts_are_printed_at_exit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The last batch's verdict would be lost when nothing calls mixtape again."""

    class Done:
        def query(self) -> bool:
            return True

        def synchronize(self) -> None:
            pass

    flags = torch.zeros(1, dtype=torch.int64)
    monkeypatch.setattr(ops, "_pending_checks", type(ops._pending_checks)())
    ops._pending_checks.extend([ops._DeviceCheck(Done(), flags, lambda f, m=m: m)
                                for m in ("first", None, "last")])  # fmt: skip
    ops._check_at_exit()
    assert capsys.readouterr().err == "mixtape: first\nmixtape: last\n"
    assert not ops._pending_checks
