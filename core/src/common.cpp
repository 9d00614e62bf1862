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
  // Work is cut into waves so the calling thread can poll cancel and report progress
  // between them without calling back from worker threads.
  const int64_t wave = std::max<int64_t>(1, (int64_t)max_threads() * 4);
  ExceptionCollector errors;
  int64_t done = 0;
  for (int64_t w0 = 0; w0 < n_chunks; w0 += wave) {
    ctl.check();
    const int64_t w1 = std::min(n_chunks, w0 + wave);
#pragma omp parallel for schedule(dynamic, 1) if (n > serial_below)
    for (int64_t c = w0; c < w1; ++c) {
      errors.run([&] {
        const int64_t b = c * chunk;
        body(b, std::min(n, b + chunk));
      });
    }
    errors.rethrow();
    done = std::min(n, w1 * chunk);
    if (stage) ctl.report(stage, done, n);
  }
  ctl.check();
}

}  // namespace cvxq
