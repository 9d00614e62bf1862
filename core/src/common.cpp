#include "cvxq/common.hpp"

#include <algorithm>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace cvxq {

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void parallel_chunks(int64_t n, int64_t chunk, int64_t serial_below, const Control& ctl,
                     const char* stage, const std::function<void(int64_t, int64_t)>& body) {
  if (n <= 0) return;
  chunk = std::max<int64_t>(1, chunk);
  const int64_t n_chunks = (n + chunk - 1) / chunk;
  // One parallel region; threads take chunks from a shared counter (no barrier between
  // waves, so a descheduled thread does not hold the others up). Any thread stops taking
  // work once cancel is set or an error occurred; only the calling thread (the master)
  // reports progress, so callbacks never run on a worker thread.
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  ExceptionCollector errors;
  const bool parallel = n > serial_below && max_threads() > 1;
  auto worker = [&](bool is_master) {
    for (;;) {
      if (errors.failed() || ctl.cancelled()) return;
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= n_chunks) return;
      errors.run([&] {
        const int64_t b = c * chunk;
        body(b, std::min(n, b + chunk));
      });
      const int64_t done = finished.fetch_add(1, std::memory_order_relaxed) + 1;
      if (is_master && stage && !errors.failed())
        errors.run([&] { ctl.report(stage, std::min(n, done * chunk), n); });
    }
  };
  if (parallel) {
#pragma omp parallel
    {
#ifdef _OPENMP
      worker(omp_get_thread_num() == 0);
#else
      worker(true);
#endif
    }
  } else {
    worker(true);
  }
  errors.rethrow();
  ctl.check();
  if (stage) ctl.report(stage, n, n);
}

}  // namespace cvxq
