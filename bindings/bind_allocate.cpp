#include <cstring>

#include "common.hpp"
#include "cvxq/allocate.hpp"

namespace cvxq::py {
namespace {

template <class T>
using Opt1 = std::optional<Arr1<const T>>;
// side_bits is either shared [9] or per group [n, 9], so its rank is checked here.
using SideBits = nb::ndarray<const double, nb::c_contig, nb::device::cpu>;

template <class T>
const T* data_of(const char* name, const Opt1<T>& a, int64_t n) {
  if (!a) return nullptr;
  expect_size(name, a->shape(0), n);
  return a->data();
}

nb::dict allocate(Arr1<const int64_t> count, double budget_bits, Opt1<float> log2_var,
                  Opt1<float> log2_sens, double kappa,
                  std::optional<Arr2<const float>> curve, std::optional<SideBits> side_bits,
                  Opt1<int8_t> pinned, Opt1<int8_t> min_depth, Opt1<int8_t> max_depth,
                  int global_min_depth, int global_max_depth, CancelFlag* cancel,
                  const std::optional<ProgressFn>& progress, bool reference) {
  AllocProblem p;
  p.n_groups = (int64_t)count.shape(0);
  p.count = count.data();
  p.budget_bits = budget_bits;
  p.kappa = kappa;
  p.global_min_depth = global_min_depth;
  p.global_max_depth = global_max_depth;
  const bool model = log2_var || log2_sens;
  if (model == (bool)curve)
    throw ValueError(
        "allocate_bits: give exactly one distortion source: either log2_var and log2_sens "
        "(the 2^(-2B) model) or curve (measured distortion, shape (n_groups, 9))");
  if (model && !(log2_var && log2_sens))
    throw ValueError("allocate_bits: the model needs both log2_var and log2_sens");
  p.log2_var = data_of("log2_var", log2_var, p.n_groups);
  p.log2_sens = data_of("log2_sens", log2_sens, p.n_groups);
  if (curve) {
    expect_rows_cols("curve", curve->shape(0), curve->shape(1), p.n_groups, kNumDepths);
    p.curve = curve->data();
  }
  if (side_bits) {
    const size_t nd = side_bits->ndim();
    if (nd == 1) {
      expect_size("side_bits", side_bits->shape(0), kNumDepths);
    } else if (nd == 2) {
      expect_rows_cols("side_bits", side_bits->shape(0), side_bits->shape(1), p.n_groups,
                       kNumDepths);
      p.side_bits_per_group = true;
    } else {
      shape_error("side_bits: expected shape (9,) or (n_groups, 9), got " +
                  std::to_string(nd) + " dimensions");
    }
    p.side_bits = side_bits->data();
  }
  p.pinned = data_of("pinned", pinned, p.n_groups);
  p.min_depth = data_of("min_depth", min_depth, p.n_groups);
  p.max_depth = data_of("max_depth", max_depth, p.n_groups);

  const Control ctl = make_control(cancel, progress);
  AllocResult r;
  {
    nb::gil_scoped_release release;
    r = reference ? allocate_bits_reference(p) : allocate_bits(p, ctl);
  }
  auto* depth = new std::vector<int8_t>(std::move(r.depth));
  nb::capsule owner(depth, [](void* v) noexcept { delete static_cast<std::vector<int8_t>*>(v); });
  nb::dict out;
  out["depth"] = nb::ndarray<nb::numpy, int8_t, nb::ndim<1>>(depth->data(), {depth->size()},
                                                              owner);
  out["log2_lambda"] = r.log2_lambda;
  out["total_bits"] = r.total_bits;
  out["distortion"] = r.distortion;
  out["min_bits"] = r.min_bits;
  out["max_bits"] = r.max_bits;
  out["lagrangian_bits"] = r.lagrangian_bits;
  out["lagrangian_distortion"] = r.lagrangian_distortion;
  return out;
}

}  // namespace

void bind_allocate(nb::module_& m) {
  // noconvert: an array of the wrong dtype or layout raises TypeError instead of being
  // copied behind the caller's back.
  auto array = [](const char* name) { return nb::arg(name).noconvert().none() = nb::none(); };
  m.def("allocate_bits", &allocate, nb::arg("count").noconvert(), nb::arg("budget_bits"),
        nb::kw_only(), array("log2_var"), array("log2_sens"), nb::arg("kappa") = 1.0,
        array("curve"), array("side_bits"), array("pinned"), array("min_depth"),
        array("max_depth"),
        nb::arg("global_min_depth") = 0, nb::arg("global_max_depth") = kMaxDepth,
        nb::arg("cancel").none() = nb::none(), nb::arg("progress").none() = nb::none(),
        nb::arg("reference") = false,
        "Chooses a bit depth 0..8 per group (int64 count[n] weights each) so that the total "
        "size, payload plus side information, is at most budget_bits and the modelled "
        "distortion is least.\n\n"
        "Distortion comes from exactly one of: log2_var and log2_sens (float32[n]; "
        "D = count * 2^(log2_var + log2_sens) * kappa * 2^(-2B)) or curve (float32[n, 9], "
        "measured, replaced by its lower convex hull). side_bits: float64[9] shared or "
        "float64[n, 9] per group. pinned (int8[n], -1 = free), min_depth, max_depth and the "
        "global bounds restrict the depths. reference=True runs the slow plain solver.\n\n"
        "Returns a dict: depth (int8[n]), log2_lambda, total_bits, distortion, min_bits, "
        "max_bits, lagrangian_bits, lagrangian_distortion. Raises InfeasibleError with the "
        "reachable range when the budget is outside [min_bits, max_bits].");
}

}  // namespace cvxq::py
