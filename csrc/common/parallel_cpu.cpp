// The process's thread pool behind parallel_for (contract in parallel.h).
//
// One job at a time: the caller that takes `submit_` posts its job and runs chunks itself, idle
// workers claim the rest from an atomic counter. The job lives on the caller's stack; the caller
// returns only when no worker is inside it. The pool object is never destroyed: at exit its workers
// sleep on a condition variable, and after a fork the parent's pool (whose threads do not exist in
// the child and whose mutexes may be held forever) is abandoned, not touched.
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/parallel.h"

namespace mixtape {
namespace {

// This thread is running a chunk: a nested parallel_for runs inline.
thread_local bool t_in_job = false;

struct Job {
  detail::ChunkFn fn;
  void* ctx;
  int64_t n;
  int64_t chunk;  // items per chunk
  int chunks;
  std::atomic<int> next{0};
  // Guarded by Pool::m_.
  int active = 0;  // workers inside the job
  int error_chunk = INT_MAX;
  std::exception_ptr error;
};

class Pool {
 public:
  Pool() : pid_(getpid()) {}
  pid_t pid() const { return pid_; }
  int workers() const { return started_.load(std::memory_order_relaxed); }

  // Runs every chunk of `job` on the pool and this thread; false (nothing run) when another
  // caller holds the pool.
  bool try_run(Job& job) {
    std::unique_lock<std::mutex> submit(submit_, std::try_to_lock);
    if (!submit.owns_lock()) return false;
    start_workers(job.chunks - 1);
    int helpers;
    {
      std::lock_guard<std::mutex> lk(m_);
      helpers = std::min(live_, job.chunks - 1);
      job_ = &job;
      ++generation_;
    }
    if (helpers >= live_) {
      work_cv_.notify_all();
    } else {
      for (int i = 0; i < helpers; ++i) work_cv_.notify_one();
    }
    t_in_job = true;
    run_available(job);
    t_in_job = false;
    std::unique_lock<std::mutex> lk(m_);
    job_ = nullptr;  // a worker waking from now on finds nothing to join
    done_cv_.wait(lk, [&] { return job.active == 0; });
    return true;
  }

  // Stops the workers above `workers`, after the running job.
  void shrink(int workers) {
    std::lock_guard<std::mutex> submit(submit_);
    if (static_cast<int>(threads_.size()) <= workers) return;
    {
      std::lock_guard<std::mutex> lk(m_);
      live_ = workers;
    }
    work_cv_.notify_all();
    for (size_t i = static_cast<size_t>(workers); i < threads_.size(); ++i) threads_[i].join();
    threads_.erase(threads_.begin() + workers, threads_.end());
    started_.store(workers, std::memory_order_relaxed);
  }

 private:
  // Starts workers up to `want` (capped by num_threads() - 1); one that cannot start ends the
  // attempt, and the job runs on the threads there are. Called with submit_ held.
  void start_workers(int want) {
    want = std::min(want, num_threads() - 1);
    while (static_cast<int>(threads_.size()) < want) {
      const int index = static_cast<int>(threads_.size());
      uint64_t generation;
      {
        std::lock_guard<std::mutex> lk(m_);
        live_ = index + 1;
        generation = generation_;
      }
      try {
        threads_.emplace_back(&Pool::worker, this, index, generation);
      } catch (const std::exception&) {  // std::system_error (EAGAIN), std::bad_alloc
        std::lock_guard<std::mutex> lk(m_);
        live_ = index;
        break;
      }
      started_.store(static_cast<int>(threads_.size()), std::memory_order_relaxed);
    }
  }

  // `seen`: the job generation when the worker was started, so it joins the job being posted.
  void worker(int index, uint64_t seen) {
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      work_cv_.wait(lk, [&] { return index >= live_ || generation_ != seen; });
      if (index >= live_) return;
      seen = generation_;
      Job* job = job_;
      if (job == nullptr) continue;
      ++job->active;
      lk.unlock();
      t_in_job = true;
      run_available(*job);
      t_in_job = false;
      lk.lock();
      if (--job->active == 0) done_cv_.notify_all();
    }
  }

  void run_available(Job& job) {
    for (;;) {
      const int c = job.next.fetch_add(1, std::memory_order_relaxed);
      if (c >= job.chunks) return;
      const int64_t b = std::min(job.n, static_cast<int64_t>(c) * job.chunk);
      const int64_t e = std::min(job.n, b + job.chunk);
      if (b >= e) continue;
      try {
        job.fn(job.ctx, b, e);
      } catch (...) {
        std::lock_guard<std::mutex> lk(m_);
        if (c < job.error_chunk) {
          job.error_chunk = c;
          job.error = std::current_exception();
        }
      }
    }
  }

  const pid_t pid_;
  std::mutex submit_;                 // held by the caller whose job the pool runs
  std::vector<std::thread> threads_;  // changed only with submit_ held
  std::atomic<int> started_{0};
  std::mutex m_;
  std::condition_variable work_cv_, done_cv_;
  // Guarded by m_.
  int live_ = 0;  // workers with an index >= live_ exit
  Job* job_ = nullptr;
  uint64_t generation_ = 0;
};

std::atomic<Pool*> g_pool{nullptr};
std::atomic<int> g_threads{0};  // 0: not decided yet

// In the child of a fork: the parent's pool is abandoned (leaked), a new one is made on first use.
void forget_pool_in_child() {
  g_pool.store(nullptr, std::memory_order_relaxed);
  t_in_job = false;
}

Pool* this_process_pool() {
  static const bool registered = pthread_atfork(nullptr, nullptr, &forget_pool_in_child) == 0;
  (void)registered;
  Pool* p = g_pool.load(std::memory_order_acquire);
  // The pid check also covers a child made without the atfork handlers (a raw clone).
  if (p != nullptr && p->pid() == getpid()) return p;
  Pool* fresh = new Pool();
  if (g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return fresh;
  delete fresh;  // another thread made one first; `p` is it
  return p;
}

// The pool of this process if it has one (never makes one).
Pool* existing_pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  return p != nullptr && p->pid() == getpid() ? p : nullptr;
}

bool read_two(const std::string& path, std::string* a, std::string* b) {
  std::ifstream f(path);
  return static_cast<bool>(f >> *a >> *b);
}

bool parse_int64(const std::string& s, int64_t* v) {
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(s.c_str(), &end, 10);
  if (end == s.c_str() || *end != '\0' || errno != 0) return false;
  *v = x;
  return true;
}

}  // namespace

int affinity_cpus() {
#if defined(__linux__)
  for (int cpus = 1024; cpus <= (1 << 20); cpus *= 2) {
    cpu_set_t* set = CPU_ALLOC(cpus);
    if (set == nullptr) break;
    const size_t size = CPU_ALLOC_SIZE(cpus);
    CPU_ZERO_S(size, set);
    const int rc = sched_getaffinity(0, size, set);
    const int err = errno;
    const int n = rc == 0 ? CPU_COUNT_S(size, set) : 0;
    CPU_FREE(set);
    if (rc == 0) return std::max(1, n);
    if (err != EINVAL) break;  // EINVAL: the kernel's mask is larger than `cpus`
  }
#endif
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(std::min<unsigned>(hw, kMaxThreads));
}

int cgroup_cpu_limit(const std::string& root, const std::string& proc_self_cgroup) {
  int best = 0;
  const auto consider = [&](int64_t quota, int64_t period) {
    if (quota <= 0 || period <= 0) return;  // "max" / -1: no limit at this level
    const int64_t cpus = std::min<int64_t>(kMaxThreads, std::max<int64_t>(1, (quota + period - 1) / period));
    best = best == 0 ? static_cast<int>(cpus) : std::min(best, static_cast<int>(cpus));
  };
  // Calls check(dir) for base + path and each ancestor up to base.
  const auto walk_up = [](const std::string& base, std::string path, const auto& check) {
    if (path == "/") path.clear();
    for (;;) {
      check(base + path);
      if (path.empty()) return;
      path.erase(path.rfind('/'));
    }
  };
  std::istringstream lines(proc_self_cgroup);
  std::string line;
  while (std::getline(lines, line)) {
    const size_t a = line.find(':');
    const size_t b = a == std::string::npos ? a : line.find(':', a + 1);
    if (b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1);
    const std::string path = line.substr(b + 1);
    if (path.empty() || path[0] != '/') continue;
    if (controllers.empty()) {  // v2, the unified hierarchy: "0::/path"
      walk_up(root, path, [&](const std::string& dir) {
        std::string q, p;
        int64_t quota, period;
        if (read_two(dir + "/cpu.max", &q, &p) && q != "max" && parse_int64(q, &quota) &&
            parse_int64(p, &period)) {
          consider(quota, period);
        }
      });
      continue;
    }
    bool has_cpu = false;  // v1: "4:cpu,cpuacct:/path"
    std::istringstream names(controllers);
    for (std::string c; std::getline(names, c, ',');) has_cpu |= c == "cpu";
    if (!has_cpu) continue;
    for (const std::string& base : {root + "/" + controllers, root + "/cpu"}) {
      walk_up(base, path, [&](const std::string& dir) {
        std::string q, p;
        int64_t quota, period;
        std::ifstream fq(dir + "/cpu.cfs_quota_us"), fp(dir + "/cpu.cfs_period_us");
        if ((fq >> q) && (fp >> p) && parse_int64(q, &quota) && parse_int64(p, &period)) {
          consider(quota, period);
        }
      });
    }
  }
  return best;
}

int default_num_threads() {
  if (const char* env = std::getenv("MIXTAPE_NUM_THREADS")) {
    int64_t v;
    if (parse_int64(env, &v) && v > 0) return static_cast<int>(std::min<int64_t>(v, kMaxThreads));
  }
  int n = affinity_cpus();
  std::ifstream f("/proc/self/cgroup");
  std::stringstream text;
  text << f.rdbuf();
  const int quota = cgroup_cpu_limit("/sys/fs/cgroup", text.str());
  if (quota > 0) n = std::min(n, quota);
  return std::max(1, std::min(n, kMaxThreads));
}

int num_threads() {
  const int n = g_threads.load(std::memory_order_relaxed);
  if (n > 0) return n;
  int expected = 0;
  g_threads.compare_exchange_strong(expected, default_num_threads(), std::memory_order_relaxed);
  return g_threads.load(std::memory_order_relaxed);
}

void set_num_threads(int n) {
  n = std::max(1, std::min(n, kMaxThreads));
  g_threads.store(n, std::memory_order_relaxed);
  if (Pool* p = existing_pool()) p->shrink(n - 1);
}

int pool_workers() {
  const Pool* p = existing_pool();
  return p == nullptr ? 0 : p->workers();
}

namespace detail {

void run_chunks(int64_t n, int chunks, ChunkFn fn, void* ctx) {
  if (t_in_job) {  // nested inside a chunk: its thread is the only one free to run it
    fn(ctx, 0, n);
    return;
  }
  Job job;
  job.fn = fn;
  job.ctx = ctx;
  job.n = n;
  job.chunks = chunks;
  job.chunk = (n + chunks - 1) / chunks;
  if (!this_process_pool()->try_run(job)) {  // another caller holds the pool
    fn(ctx, 0, n);
    return;
  }
  if (job.error) std::rethrow_exception(job.error);
}

}  // namespace detail
}  // namespace mixtape
