"""The kernels' thread pool: one per process, sized from the CPUs the process may use, safe across
fork, 1 thread in DataLoader workers, errors in chunks reach the caller."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixtape
from mixtape import ops

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")


def run_script(script: str, **env: str) -> str:
    """Runs `script` in a fresh interpreter (MIXTAPE_NUM_THREADS unset unless given); returns its
    stdout, failing on a non-zero exit or a hang."""
    full = {k: v for k, v in os.environ.items() if k != "MIXTAPE_NUM_THREADS"}
    full.update(env)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=180, env=full)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# A batch big enough that pad and pack_fill want several threads (8 MiB per output).
_BIG = """
import numpy as np
from mixtape import ops
n, L = 64, 16384
values = np.arange(n * 1000, dtype=np.int64)
offsets = np.arange(0, n * 1000 + 1, 1000, dtype=np.int64)
def big_pad():
    got = ops.pad(values, offsets, length=L)
    assert (got["input_ids"][:, :1000] == values.reshape(n, 1000)).all()
    assert (got["input_ids"][:, 1000:] == 0).all() and got["attention_mask"].sum() == n * 1000
lengths = np.full(4096, 200)
plan = ops.pack_plan(lengths, 256)
docs = np.arange(lengths.sum(), dtype=np.int64)
doc_offsets = np.concatenate([[0], np.cumsum(lengths)])
def big_fill():
    got = ops.pack_fill(plan, docs, doc_offsets, fields=["input_ids"])["input_ids"]
    assert got.shape == (plan.num_rows, 256)
def threads():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
"""

_NO_GROWTH = (
    _BIG
    + """
import os, threading
base = threads()
seen, stop = set(), False
def sample():  # every thread id alive while the kernels run (they release the GIL)
    while not stop:
        seen.update(os.listdir("/proc/self/task"))
sampler = threading.Thread(target=sample)
sampler.start()
own = set(os.listdir("/proc/self/task"))  # this thread and the sampler
peak = 0
for _ in range(40):
    big_pad()
    big_fill()
    ops.block_causal_mask(np.zeros((64, 256), np.int64))
    peak = max(peak, threads())
stop = True
sampler.join()
print(len(seen - own), peak - base, threads() - base, ops._C._pool_workers())
"""
)


def test_thread_count_does_not_grow_across_kernel_calls() -> None:
    """Every parallel kernel call used to start (and join) its own threads: 120 calls made ~360
    threads. The pool's 3 workers are the only threads the kernels ever add."""
    out = run_script(_NO_GROWTH, MIXTAPE_NUM_THREADS="4")
    new_tids, peak, after, workers = map(int, out.split())
    assert workers == 3
    assert new_tids <= 3, f"{new_tids} distinct threads ran the kernels"
    assert peak <= 1 + 3 and after <= 1 + 3  # the sampler and the workers


def test_set_and_get_num_threads_round_trip() -> None:
    assert mixtape.get_num_threads is ops.get_num_threads  # the public names
    old = mixtape.get_num_threads()
    try:
        mixtape.set_num_threads(3)
        assert mixtape.get_num_threads() == 3
        visits, used = ops._C._parallel_probe(1 << 16, 1)
        assert (visits == 1).all() and 1 <= used <= 3
        ops.set_num_threads(1)
        assert ops.get_num_threads() == 1 and ops._C._pool_workers() == 0  # surplus stopped
        visits, used = ops._C._parallel_probe(1 << 16, 1)
        assert (visits == 1).all() and used == 1
    finally:
        ops.set_num_threads(old)
    with pytest.raises(ValueError, match="set_num_threads: n must be in \\[1, 1024\\], got 0"):
        ops.set_num_threads(0)
    with pytest.raises(TypeError):
        ops.set_num_threads(2.5)  # type: ignore[arg-type]
    assert ops.get_num_threads() == old


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 5000), grain=st.integers(1, 700), threads=st.integers(1, 6))
def test_every_item_runs_once(n: int, grain: int, threads: int) -> None:
    old = ops.get_num_threads()
    try:
        ops.set_num_threads(threads)
        visits, used = ops._C._parallel_probe(n, grain)
    finally:
        ops.set_num_threads(old)
    np.testing.assert_array_equal(visits, np.ones(n, np.int32))
    assert used <= max(1, min(threads, n // grain))


@pytest.mark.parametrize("throw_at", [0, 1234, 99_999])
def test_exception_in_a_chunk_reaches_the_caller(throw_at: int) -> None:
    old = ops.get_num_threads()
    try:
        ops.set_num_threads(4)
        with pytest.raises(RuntimeError, match=f"chunk failed at item {throw_at}"):
            ops._C._parallel_probe(100_000, 1000, throw_at)
        visits, _ = ops._C._parallel_probe(100_000, 1000)  # the pool still works
        assert (visits == 1).all()
    finally:
        ops.set_num_threads(old)


def test_concurrent_callers_share_the_pool() -> None:
    """Python threads calling kernels at once (the GIL released): one gets the pool, the others
    run inline; every result is right."""
    import threading

    values = np.arange(64 * 1000, dtype=np.int64)
    offsets = np.arange(0, 64 * 1000 + 1, 1000, dtype=np.int64)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                got = ops.pad(values, offsets, length=16384)["input_ids"]
                assert (got[:, :1000] == values.reshape(64, 1000)).all() and not got[:, 1000:].any()
                visits, _ = ops._C._parallel_probe(50_000, 100)
                assert (visits == 1).all()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# --- size --------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_default_follows_the_affinity_mask() -> None:
    """hardware_concurrency() counted every CPU of the node, not the ones the process may run on
    (taskset, a container's cpuset): here one CPU."""
    script = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "from mixtape import ops\nprint(ops.get_num_threads(), ops._C._affinity_cpus())"
    )
    assert run_script(script).split() == ["1", "1"]


def test_environment_variable_sets_the_count() -> None:
    assert run_script("from mixtape import ops; print(ops.get_num_threads())",
                      MIXTAPE_NUM_THREADS="3").strip() == "3"  # fmt: skip
    script = (
        "from mixtape import ops\n"
        "try:\n    ops.get_num_threads()\nexcept ValueError as e:\n    print(e)"
    )
    out = run_script(script, MIXTAPE_NUM_THREADS="many")
    assert "MIXTAPE_NUM_THREADS must be an integer >= 1, got 'many'" in out


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    assert ops._C._cgroup_cpu_limit(str(tmp_path), "0::/\n") == 0  # no cpu.max: no limit
    _write(tmp_path / "cpu.max", "max 100000\n")
    assert ops._C._cgroup_cpu_limit(str(tmp_path), "0::/\n") == 0
    _write(tmp_path / "cpu.max", "250000 100000\n")
    assert ops._C._cgroup_cpu_limit(str(tmp_path), "0::/\n") == 3  # 2.5 CPUs, rounded up
    # The smallest quota on the way up to the root applies.
    _write(tmp_path / "kube" / "pod" / "cpu.max", "max 100000\n")
    _write(tmp_path / "kube" / "cpu.max", "50000 100000\n")
    assert ops._C._cgroup_cpu_limit(str(tmp_path), "0::/kube/pod\n") == 1
    _write(tmp_path / "kube" / "cpu.max", "800000 100000\n")
    assert ops._C._cgroup_cpu_limit(str(tmp_path), "0::/kube/pod\n") == 3


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    text = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n"
    assert ops._C._cgroup_cpu_limit(str(tmp_path), text) == 0
    d = tmp_path / "cpu,cpuacct" / "docker" / "abc"
    _write(d / "cpu.cfs_quota_us", "-1\n")
    _write(d / "cpu.cfs_period_us", "100000\n")
    assert ops._C._cgroup_cpu_limit(str(tmp_path), text) == 0
    _write(d / "cpu.cfs_quota_us", "400000\n")
    assert ops._C._cgroup_cpu_limit(str(tmp_path), text) == 4
    # Inside a container without a cgroup namespace the path is the host's; its own limit is at
    # the mount's root.
    _write(tmp_path / "cpu" / "cpu.cfs_quota_us", "150000\n")
    _write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert ops._C._cgroup_cpu_limit(str(tmp_path), "3:cpu:/docker/other\n") == 2
    assert ops._C._cgroup_cpu_limit(str(tmp_path), "garbage\n\n1:cpuset:/x\n") == 0


# --- fork --------------------------------------------------------------------------------------

_FORK = (
    _BIG
    + """
import os, threading
big_pad()
assert ops._C._pool_workers() == 3
pid = os.fork()
if pid == 0:  # the parent's workers do not exist here: a pool of its own
    try:
        assert ops._C._pool_workers() == 0 and ops.get_num_threads() == 4
        big_pad(); big_fill()
        assert ops._C._pool_workers() == 3
    except BaseException as e:
        print("child failed:", repr(e), flush=True)
        os._exit(1)
    os._exit(0)
assert os.waitpid(pid, 0)[1] == 0
# Forks made while another thread runs kernels (the pool's lock may be held at the fork).
stop = False
def busy():
    while not stop:
        big_pad()
thread = threading.Thread(target=busy)
thread.start()
for _ in range(8):
    pid = os.fork()
    if pid == 0:
        try:
            big_pad(); big_fill()
        except BaseException as e:
            print("child failed:", repr(e), flush=True)
            os._exit(1)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
stop = True
thread.join()
print("ok")
"""
)


def test_fork_child_makes_its_own_pool() -> None:
    """A child forked after the parent used the pool (or while a kernel ran in another thread)
    runs kernels on a pool of its own, never waiting on the parent's threads or locks."""
    assert run_script(_FORK, MIXTAPE_NUM_THREADS="4").strip().endswith("ok")


# --- DataLoader workers ------------------------------------------------------------------------


class _PadDataset(torch.utils.data.Dataset[Any]):
    """Each item pads a batch big enough to want several threads, in the worker."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = 64
        values = np.arange(n * 1000, dtype=np.int64) + i
        offsets = np.arange(0, n * 1000 + 1, 1000, dtype=np.int64)
        got = ops.pad(values, offsets, length=16384)
        ok = bool((got["input_ids"][:, :1000] == values.reshape(n, 1000)).all())
        ok &= not got["input_ids"][:, 1000:].any() and int(got["attention_mask"].sum()) == n * 1000
        return {"ok": ok, "threads": ops.get_num_threads(), "workers": ops._C._pool_workers()}


def _two_threads(worker_id: int) -> None:
    ops.set_num_threads(2)


@pytest.mark.parametrize("init", [None, _two_threads])
def test_dataloader_workers_use_one_thread(init: Any) -> None:
    """Each DataLoader worker runs the kernels on 1 thread (N workers x all cores oversubscribed
    the node), unless worker_init_fn asks for more; the results are right either way."""
    old = ops.get_num_threads()
    mixtape.set_num_threads(4)  # the parent's explicit choice is not the workers'
    try:
        loader = torch.utils.data.DataLoader(
            _PadDataset(), batch_size=None, num_workers=2, worker_init_fn=init,
            multiprocessing_context="fork",
        )  # fmt: skip
        items = list(loader)
    finally:
        ops.set_num_threads(old)
    assert len(items) == 4 and all(item["ok"] for item in items)
    if init is None:
        assert all(item["threads"] == 1 and item["workers"] == 0 for item in items)
    else:
        assert all(item["threads"] == 2 and item["workers"] <= 1 for item in items)


class _KernelDataset(torch.utils.data.Dataset[Any]):
    """Item i runs one kernel wrapper first thing in the worker, then reads the pool's count."""

    def __init__(self) -> None:
        values = np.arange(1, 200_001, dtype=np.int64)
        starts = np.arange(0, 200_000, 1000, dtype=np.int64)
        lengths = np.full(200, 1000, dtype=np.int64)
        self.calls = [
            lambda: ops.gather_rows(values, starts, lengths, starts,
                                    np.empty(200_000, np.int64)),
            lambda: ops.pack_rows(values[:64], np.array([32, 32]), np.array([0, 2]),
                                  capacity=64),
            lambda: ops.pack_plan(np.full(1000, 7), capacity=64),
        ]

    def __len__(self) -> int:
        return len(self.calls)

    def __getitem__(self, i: int) -> int:
        self.calls[i]()
        return int(ops._C.get_num_threads())  # the count the kernel ran with


def test_every_kernel_wrapper_takes_one_thread_in_a_worker() -> None:
    # Only some wrappers applied the worker default: gather_rows ran on every core in a worker.
    old = ops.get_num_threads()
    mixtape.set_num_threads(4)
    try:
        for i in range(len(_KernelDataset())):
            loader = torch.utils.data.DataLoader(
                torch.utils.data.Subset(_KernelDataset(), [i]), batch_size=None, num_workers=1,
                multiprocessing_context="fork")  # fmt: skip
            assert list(loader) == [1], i
    finally:
        ops.set_num_threads(old)
