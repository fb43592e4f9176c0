// parallel_for over one persistent pool of threads shared by every kernel of the process.
//
// Contract. parallel_for(n, min_per_thread, fn) calls fn(begin, end) over [0, n) in contiguous
// chunks and returns when all have run; an exception thrown by a chunk is rethrown to the caller
// (the lowest chunk's, after every chunk has finished). Work of fewer than 2 * min_per_thread
// items, a pool of 1 thread, a call made from inside a chunk (nesting) and a call made while another
// caller holds the pool all run inline on the calling thread.
//
// The pool is made on the first call that wants a second thread and grows lazily up to
// num_threads() - 1 workers (the caller is the other one). A worker that cannot start (ulimit -u,
// a container's pids limit, no address space for its stack) is not an error: the chunks run on the
// threads there are. The pool belongs to the process that made it: a forked child (a DataLoader
// worker) never touches the parent's threads or locks, it makes its own pool on first use, also
// when the fork happened while a kernel was running.
//
// Size: set_num_threads(n) if called, else MIXTAPE_NUM_THREADS (read once, when first needed),
// else the CPUs this process may use: its affinity mask, capped by its cgroup CPU quota (cgroup v2
// cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us), so a container limited to 4 CPUs on a
// 128-core node gets 4 threads, not 128.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

namespace mixtape {

// Threads a kernel may use, the calling thread included (>= 1).
int num_threads();
// Sets it (n >= 1, capped at kMaxThreads); a smaller pool stops its surplus workers (after the
// running job). Process state, inherited by a forked child.
void set_num_threads(int n);
constexpr int kMaxThreads = 1024;

// What num_threads() is when nobody set it: MIXTAPE_NUM_THREADS if a positive integer, else
// min(affinity CPUs, cgroup CPU limit).
int default_num_threads();
// CPUs in this thread's affinity mask (sched_getaffinity), or the hardware count where that is
// unavailable.
int affinity_cpus();
// The CPU quota of the process's cgroup rounded up to whole CPUs (>= 1), or 0 when unlimited.
// `root` is where the cgroup filesystem is mounted (/sys/fs/cgroup), `proc_self_cgroup` the text
// of /proc/self/cgroup; both are parameters so tests can give a fake tree. The smallest quota on
// the path from the process's cgroup up to the root applies.
int cgroup_cpu_limit(const std::string& root, const std::string& proc_self_cgroup);

// Workers the pool of this process has started (0 when none): for tests.
int pool_workers();

namespace detail {
using ChunkFn = void (*)(void* ctx, int64_t begin, int64_t end);
// Runs `chunks` contiguous chunks of [0, n) on the pool and the caller.
void run_chunks(int64_t n, int chunks, ChunkFn fn, void* ctx);
}  // namespace detail

template <typename Fn>
void parallel_for(int64_t n, int64_t min_per_thread, Fn&& fn) {
  if (n <= 0) return;
  const int64_t want = std::max<int64_t>(1, n / std::max<int64_t>(1, min_per_thread));
  const int threads = static_cast<int>(std::min<int64_t>(want, num_threads()));
  if (threads <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  using F = std::remove_reference_t<Fn>;
  detail::run_chunks(
      n, threads, [](void* ctx, int64_t b, int64_t e) { (*static_cast<F*>(ctx))(b, e); },
      const_cast<void*>(static_cast<const void*>(&fn)));
}

}  // namespace mixtape
