// A small parallel-for. Threads are started per call and joined before returning, so no thread
// outlives a kernel: DataLoader workers fork safely (no pool to inherit in a broken state).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <system_error>
#include <thread>
#include <vector>

namespace mixtape {

// Number of threads kernels may use: MIXTAPE_NUM_THREADS if set, else the hardware count.
inline int max_threads() {
  static const int n = [] {
    if (const char* env = std::getenv("MIXTAPE_NUM_THREADS")) {
      const int v = std::atoi(env);
      if (v > 0) return v;
    }
    const unsigned hw = std::thread::hardware_concurrency();
    return hw == 0 ? 1 : static_cast<int>(hw);
  }();
  return n;
}

// Calls fn(begin, end) over [0, n) in contiguous chunks. Work below `min_per_thread` items per
// thread runs inline: starting a thread costs ~20 us, more than a small batch takes.
template <typename Fn>
void parallel_for(int64_t n, int64_t min_per_thread, Fn&& fn) {
  if (n <= 0) return;
  const int64_t want = std::max<int64_t>(1, n / std::max<int64_t>(1, min_per_thread));
  const int threads = static_cast<int>(std::min<int64_t>(want, max_threads()));
  if (threads <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(threads);
  pool.reserve(threads - 1);
  const int64_t chunk = (n + threads - 1) / threads;
  auto run = [&](int t) {
    const int64_t b = std::min(n, t * chunk), e = std::min(n, b + chunk);
    try {
      fn(b, e);
    } catch (...) {
      errors[t] = std::current_exception();
    }
  };
  // A thread that cannot start (ulimit -u, a container's pids limit, no address space for its
  // stack) is not an error: the caller runs the chunks left. Throwing here instead would destroy
  // the started, joinable threads, which is std::terminate.
  int started = 1;
  for (; started < threads; ++started) {
    try {
      pool.emplace_back(run, started);
    } catch (const std::system_error&) {
      break;
    }
  }
  run(0);
  for (int t = started; t < threads; ++t) run(t);
  for (auto& th : pool) th.join();
  for (auto& err : errors) {
    if (err) std::rethrow_exception(err);
  }
}

}  // namespace mixtape
