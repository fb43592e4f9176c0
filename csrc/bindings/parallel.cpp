// parallel: the size of the kernels' thread pool, and probes of the pool for tests.
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>

#include "bindings/bindings.h"
#include "common/parallel.h"

namespace mixtape {
namespace {

// parallel_for over [0, n) counting the visits of each item (each must be 1) and the distinct
// threads that ran chunks; the chunk holding item `throw_at` throws (-1: none).
py::tuple parallel_probe(int64_t n, int64_t min_per_thread, int64_t throw_at) {
  Array<int32_t> visits(n);
  int32_t* v = visits.mutable_data();
  std::fill(v, v + n, 0);
  std::set<std::thread::id> ids;
  std::mutex m;
  {
    py::gil_scoped_release nogil;
    parallel_for(n, min_per_thread, [&](int64_t b, int64_t e) {
      {
        std::lock_guard<std::mutex> lk(m);
        ids.insert(std::this_thread::get_id());
      }
      for (int64_t i = b; i < e; ++i) {
        if (i == throw_at) throw std::runtime_error("chunk failed at item " + std::to_string(i));
        ++v[i];
      }
    });
  }
  return py::make_tuple(std::move(visits), static_cast<int>(ids.size()));
}

}  // namespace

void bind_parallel(py::module_& m) {
  m.attr("MAX_THREADS") = kMaxThreads;
  m.def("get_num_threads", &num_threads);
  m.def(
      "set_num_threads",
      [](int n) {
        if (n < 1) throw py::value_error("num_threads must be >= 1, got " + std::to_string(n));
        set_num_threads(n);
      },
      "n"_a, gil_release());
  m.def("_default_num_threads", &default_num_threads);
  m.def("_affinity_cpus", &affinity_cpus);
  m.def("_cgroup_cpu_limit", &cgroup_cpu_limit, "root"_a, "proc_self_cgroup"_a);
  m.def("_pool_workers", &pool_workers);
  m.def("_parallel_probe", &parallel_probe, "n"_a, "min_per_thread"_a, "throw_at"_a = -1);
}
}  // namespace mixtape
