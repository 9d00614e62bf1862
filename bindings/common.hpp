// Shared by the binding files: array aliases, cancel/progress plumbing. This folder is the
// only code that includes nanobind.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/function.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <atomic>
#include <optional>
#include <string>

#include "cvxq/common.hpp"

namespace nb = nanobind;

namespace cvxq::py {

// C-contiguous CPU arrays of a fixed dtype. Mark each such argument .noconvert() in its
// nb::arg: then anything else is refused with a TypeError naming the expected type instead
// of being silently converted (copied).
template <class T>
using Arr1 = nb::ndarray<T, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
template <class T>
using Arr2 = nb::ndarray<T, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

// A cancel flag Python code holds and sets from any thread; the core polls it.
struct CancelFlag {
  std::atomic<bool> flag{false};
  void set() { flag.store(true); }
  void clear() { flag.store(false); }
  bool is_set() const { return flag.load(); }
};

using ProgressFn = std::function<void(std::string, int64_t, int64_t)>;

// Builds the core's Control from optional Python arguments. The progress callback is
// called from the computing thread (which released the GIL), so it re-acquires it.
inline Control make_control(CancelFlag* cancel, const std::optional<ProgressFn>& progress) {
  Control ctl;
  if (cancel) ctl.cancel = &cancel->flag;
  if (progress && *progress) {
    ProgressFn fn = *progress;
    ctl.progress = [fn](const Progress& p) {
      nb::gil_scoped_acquire gil;
      fn(std::string(p.stage ? p.stage : ""), p.done, p.total);
    };
  }
  return ctl;
}

// Raises ShapeError with a message naming the argument when a size does not match.
[[noreturn]] void shape_error(const std::string& msg);
void expect_size(const char* name, size_t got, int64_t want);
void expect_rows_cols(const char* name, size_t r, size_t c, int64_t want_r, int64_t want_c);

void bind_common(nb::module_& m);
void bind_allocate(nb::module_& m);
void bind_quantize(nb::module_& m);
void bind_packed(nb::module_& m);
void bind_cuda(nb::module_& m);

}  // namespace cvxq::py
