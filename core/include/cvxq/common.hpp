// Shared vocabulary of the core: typed errors, cancellation/progress control, and a
// parallel-for that carries exceptions out of OpenMP regions.
#pragma once
#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>

namespace cvxq {

// Typed errors; the bindings map each to a Python exception class.
struct ShapeError : std::invalid_argument { using std::invalid_argument::invalid_argument; };
struct ValueError : std::invalid_argument { using std::invalid_argument::invalid_argument; };
// A budget outside the reachable range; the message states the feasible range.
struct InfeasibleError : std::invalid_argument { using std::invalid_argument::invalid_argument; };
// Packed data that does not satisfy the format (corrupt, truncated, inconsistent).
struct FormatError : std::runtime_error { using std::runtime_error::runtime_error; };
struct Cancelled : std::runtime_error {
  Cancelled() : std::runtime_error("cancelled") {}
};

// Structured progress: which stage, how many work units done of how many.
struct Progress {
  const char* stage;
  int64_t done;
  int64_t total;
};

// Cancellation flag polled between work units and a progress callback. The callback is
// only ever invoked from the calling thread (never from inside a parallel region).
struct Control {
  const std::atomic<bool>* cancel = nullptr;
  std::function<void(const Progress&)> progress;

  bool cancelled() const { return cancel && cancel->load(std::memory_order_relaxed); }
  void check() const {
    if (cancelled()) throw Cancelled();
  }
  void report(const char* stage, int64_t done, int64_t total) const {
    if (progress) progress(Progress{stage, done, total});
  }
};

// Collects the first exception thrown inside a parallel region so it can be rethrown on
// the calling thread after the region (exceptions must not escape an OpenMP region).
class ExceptionCollector {
 public:
  template <class F>
  void run(F&& f) noexcept {
    if (failed_.load(std::memory_order_relaxed)) return;
    try {
      f();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!err_) err_ = std::current_exception();
      failed_.store(true);
    }
  }
  bool failed() const { return failed_.load(std::memory_order_relaxed); }
  void rethrow() {
    if (err_) std::rethrow_exception(err_);
  }

 private:
  std::mutex mu_;
  std::exception_ptr err_;
  std::atomic<bool> failed_{false};
};

// Runs body(begin, end) over [0, n) in chunks of `chunk`, in parallel when n exceeds
// `serial_below`. Between chunks the cancel flag is polled and progress is reported (from
// the calling thread only). Exceptions from any chunk are rethrown here.
void parallel_chunks(int64_t n, int64_t chunk, int64_t serial_below, const Control& ctl,
                     const char* stage, const std::function<void(int64_t, int64_t)>& body);

int max_threads();

}  // namespace cvxq
