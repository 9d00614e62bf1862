#include <atomic>
#include <stdexcept>
#include <vector>

#include "check.hpp"
#include "cvxq/common.hpp"
#include "cvxq/dispatch.hpp"

using namespace cvxq;

CVXQ_TEST(parallel_chunks_covers_every_index_once) {
  const int64_t n = 100003;
  std::vector<std::atomic<int>> hits(n);
  Control ctl;
  parallel_chunks(n, 97, 0, ctl, nullptr, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
  });
  for (int64_t i = 0; i < n; ++i) CHECK(hits[i].load() == 1);
}

CVXQ_TEST(parallel_chunks_rethrows_the_worker_exception) {
  Control ctl;
  CHECK_THROWS(parallel_chunks(1000, 10, 0, ctl, nullptr,
                               [&](int64_t b, int64_t) {
                                 if (b == 500) throw ValueError("bad chunk");
                               }),
               ValueError);
}

CVXQ_TEST(parallel_chunks_stops_when_cancelled) {
  std::atomic<bool> flag{false};
  Control ctl;
  ctl.cancel = &flag;
  std::atomic<int64_t> done{0};
  CHECK_THROWS(parallel_chunks(100000, 10, 0, ctl, nullptr,
                               [&](int64_t, int64_t) {
                                 if (done.fetch_add(1) == 50) flag.store(true);
                               }),
               Cancelled);
  CHECK(done.load() < 10000);  // stopped early, not after all 10000 chunks
}

CVXQ_TEST(progress_is_reported_from_the_calling_thread_and_ends_complete) {
  Control ctl;
  int64_t last = -1, calls = 0;
  bool monotone = true;
  ctl.progress = [&](const Progress& p) {
    ++calls;
    if (p.done < last) monotone = false;
    last = p.done;
    CHECK(p.total == 5000);
  };
  parallel_chunks(5000, 7, 0, ctl, "stage", [](int64_t, int64_t) {});
  CHECK(calls > 0);
  CHECK(last == 5000);
  CHECK(monotone);
}

CVXQ_TEST(isa_can_be_forced_to_scalar_and_back) {
  const Isa before = active_isa();
  set_isa(Isa::Scalar);
  CHECK(active_isa() == Isa::Scalar);
  set_isa(Isa::AVX2);
  CHECK(active_isa() == (cpu_has_avx2() ? Isa::AVX2 : Isa::Scalar));
  set_isa(before);
}
