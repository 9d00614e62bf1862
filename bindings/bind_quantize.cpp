// Quantizers (cvxq/quantize.hpp) and row clustering (cvxq/cluster.hpp).
#include <memory>
#include <vector>

#include "common.hpp"
#include "cvxq/cluster.hpp"
#include "cvxq/quantize.hpp"

namespace cvxq::py {
namespace {

// Array arguments are .noconvert(): a wrong dtype or layout is a TypeError, never a
// silent copy.

// A buffer filled with the GIL released, then handed to numpy without a copy.
template <class T>
struct OutBuf {
  std::unique_ptr<T[]> data;
  std::vector<size_t> shape;
  explicit OutBuf(std::vector<size_t> s) : shape(std::move(s)) {
    size_t n = 1;
    for (size_t d : shape) n *= d;
    data.reset(new T[n == 0 ? 1 : n]);
  }
  T* get() { return data.get(); }
  nb::ndarray<nb::numpy, T> release() {
    T* p = data.release();
    nb::capsule owner(p, [](void* q) noexcept { delete[] static_cast<T*>(q); });
    return nb::ndarray<nb::numpy, T>(p, shape.size(), shape.data(), owner);
  }
};

QuantKind parse_kind(const std::string& kind) {
  if (kind == "laplace") return QuantKind::Laplace;
  if (kind == "uniform") return QuantKind::Uniform;
  if (kind == "lloyd") return QuantKind::Lloyd;
  throw ValueError("kind: expected 'laplace', 'uniform' or 'lloyd', got '" + kind + "'");
}

using Table = std::optional<Arr1<const float>>;

const float* table_ptr(QuantKind kind, const Table& table) {
  if (!table) {
    if (kind == QuantKind::Lloyd)
      throw ValueError("kind='lloyd' needs a table: fit one with fit_lloyd_table(z) and pass "
                       "table=...");
    return nullptr;
  }
  expect_size("table", table->shape(0), kTableSize);
  return table->data();
}

QuantSpec make_spec(const std::string& kind, float grid_range, float grid_step,
                    int search_rounds, bool fp16_params) {
  QuantSpec spec;
  spec.kind = parse_kind(kind);
  spec.grid_range = grid_range;
  spec.grid_step = grid_step;
  spec.search_rounds = search_rounds;
  spec.fp16_params = fp16_params;
  return spec;
}

#define CVXQ_SPEC_ARGS                                                              \
  nb::arg("kind") = "laplace", nb::arg("table").noconvert() = nb::none(),                       \
  nb::arg("grid_range") = 2.0f, nb::arg("grid_step") = 0.125f,                      \
  nb::arg("search_rounds") = 2, nb::arg("fp16_params") = true

}  // namespace

void bind_quantize(nb::module_& m) {
  m.def(
      "builtin_table",
      [](const std::string& kind) {
        OutBuf<float> t({(size_t)kTableSize});
        builtin_table(parse_kind(kind), t.get());
        return t.release();
      },
      nb::arg("kind"),
      "Built-in level table (float32[511], depth B at offset 2^B - 1) of 'laplace' or "
      "'uniform'.");
  m.def(
      "laplace_table",
      [] {
        OutBuf<float> t({(size_t)kTableSize});
        builtin_table(QuantKind::Laplace, t.get());
        return t.release();
      },
      "The Laplace level table: standard Laplace inverse CDF at (k + 0.5) / 2^B.");

  m.def(
      "quantize_groups",
      [](Arr2<const float> x, Arr1<const uint8_t> depth, const std::string& kind,
         const Table& table, float grid_range, float grid_step, int search_rounds,
         bool fp16_params, bool reference, CancelFlag* cancel,
         const std::optional<ProgressFn>& progress) {
        const int64_t g = (int64_t)x.shape(0), len = (int64_t)x.shape(1);
        expect_size("depth", depth.shape(0), g);
        const QuantSpec spec = make_spec(kind, grid_range, grid_step, search_rounds, fp16_params);
        const float* tp = table_ptr(spec.kind, table);
        const Control ctl = make_control(cancel, progress);
        OutBuf<uint8_t> idx({(size_t)g, (size_t)len});
        OutBuf<float> recon({(size_t)g, (size_t)len}), loc({(size_t)g}), scale({(size_t)g}),
            err({(size_t)g});
        {
          nb::gil_scoped_release release;
          if (reference) {
            ctl.check();
            quantize_groups_reference(x.data(), g, len, depth.data(), spec, tp, idx.get(),
                                      recon.get(), loc.get(), scale.get(), err.get());
          } else {
            quantize_groups(x.data(), g, len, depth.data(), spec, tp, idx.get(), recon.get(),
                            loc.get(), scale.get(), err.get(), ctl);
          }
        }
        nb::dict out;
        out["idx"] = idx.release();
        out["recon"] = recon.release();
        out["loc"] = loc.release();
        out["scale"] = scale.release();
        out["err"] = err.release();
        return out;
      },
      nb::arg("x").noconvert(), nb::arg("depth").noconvert(), nb::kw_only(), CVXQ_SPEC_ARGS,
      nb::arg("reference") = false, nb::arg("cancel").none() = nb::none(),
      nb::arg("progress") = nb::none(),
      "Quantize groups x[G, len] at depths[G] (0..8). Returns dict(idx uint8[G, len], recon "
      "float32[G, len], loc, scale, err float32[G]); recon == loc + scale * table[2^B - 1 + "
      "idx] in float32 (no FMA). reference=True runs the plain scalar twin.");

  m.def(
      "quantize_feedback",
      [](Arr2<const float> w, Arr2<const float> u, Arr2<const uint8_t> depth, int64_t group_rows,
         const std::string& kind, const Table& table, float grid_range, float grid_step,
         int search_rounds, bool fp16_params, CancelFlag* cancel,
         const std::optional<ProgressFn>& progress) {
        const int64_t rows = (int64_t)w.shape(0), cols = (int64_t)w.shape(1);
        if (group_rows < 1) throw ValueError("group_rows must be >= 1");
        const int64_t n_clusters = (rows + group_rows - 1) / group_rows;
        expect_size("u rows", u.shape(0), cols);
        expect_size("u cols", u.shape(1), cols);
        expect_size("depth rows", depth.shape(0), n_clusters);
        expect_size("depth cols", depth.shape(1), cols);
        const QuantSpec spec = make_spec(kind, grid_range, grid_step, search_rounds, fp16_params);
        const float* tp = table_ptr(spec.kind, table);
        const Control ctl = make_control(cancel, progress);
        OutBuf<uint8_t> idx({(size_t)rows, (size_t)cols});
        OutBuf<float> recon({(size_t)rows, (size_t)cols}), loc({(size_t)n_clusters, (size_t)cols}),
            scale({(size_t)n_clusters, (size_t)cols}), err({(size_t)n_clusters, (size_t)cols});
        {
          nb::gil_scoped_release release;
          quantize_feedback(w.data(), rows, cols, group_rows, u.data(), depth.data(), spec, tp,
                            idx.get(), recon.get(), loc.get(), scale.get(), err.get(), ctl);
        }
        nb::dict out;
        out["idx"] = idx.release();
        out["recon"] = recon.release();
        out["loc"] = loc.release();
        out["scale"] = scale.release();
        out["err"] = err.release();
        return out;
      },
      nb::arg("w").noconvert(), nb::arg("u").noconvert(), nb::arg("depth").noconvert(),
      nb::kw_only(), nb::arg("group_rows"), CVXQ_SPEC_ARGS, nb::arg("cancel").none() = nb::none(),
      nb::arg("progress") = nb::none(),
      "GPTQ-style error feedback over groups of group_rows rows x one column: w[rows, cols] "
      "(storage order), u[cols, cols] the upper Cholesky factor of H^-1, depth[n_clusters, "
      "cols]. Columns in order, each column's error pushed onto the later ones; clusters "
      "run in parallel. Returns dict(idx uint8[rows, cols], recon float32[rows, cols], loc, "
      "scale, err float32[n_clusters, cols]).");

  m.def(
      "error_curves",
      [](Arr2<const float> x, const std::string& kind, const Table& table, float grid_range,
         float grid_step, int search_rounds, bool fp16_params, int measured_max_depth,
         CancelFlag* cancel, const std::optional<ProgressFn>& progress) {
        const int64_t g = (int64_t)x.shape(0), len = (int64_t)x.shape(1);
        const QuantSpec spec = make_spec(kind, grid_range, grid_step, search_rounds, fp16_params);
        const float* tp = table_ptr(spec.kind, table);
        const Control ctl = make_control(cancel, progress);
        OutBuf<float> curve({(size_t)g, 9});
        {
          nb::gil_scoped_release release;
          error_curves(x.data(), g, len, spec, tp, curve.get(), ctl, measured_max_depth);
        }
        return curve.release();
      },
      nb::arg("x").noconvert(), nb::kw_only(), CVXQ_SPEC_ARGS, nb::arg("measured_max_depth") = 8,
      nb::arg("cancel").none() = nb::none(), nb::arg("progress") = nb::none(),
      "Squared error of every group at every depth B = 0..8 after the parameter search: "
      "float32[G, 9]. Depths above measured_max_depth are extrapolated (error / 4 per bit).");

  m.def(
      "fit_lloyd_table",
      [](Arr1<const float> z, int iters, CancelFlag* cancel,
         const std::optional<ProgressFn>& progress) {
        const Control ctl = make_control(cancel, progress);
        OutBuf<float> t({(size_t)kTableSize});
        {
          nb::gil_scoped_release release;
          fit_lloyd_table(z.data(), (int64_t)z.shape(0), iters, t.get(), ctl);
        }
        return t.release();
      },
      nb::arg("z").noconvert(), nb::arg("iters") = 20, nb::kw_only(), nb::arg("cancel").none() = nb::none(),
      nb::arg("progress") = nb::none(),
      "Fit the Lloyd-Max table (float32[511]) for depths 1..8 on standardised samples z.");

  m.def(
      "group_stats",
      [](Arr2<const float> x) {
        const int64_t g = (int64_t)x.shape(0), len = (int64_t)x.shape(1);
        OutBuf<float> mu({(size_t)g}), sigma({(size_t)g});
        {
          nb::gil_scoped_release release;
          group_stats(x.data(), g, len, mu.get(), sigma.get());
        }
        return nb::make_tuple(mu.release(), sigma.release());
      },
      nb::arg("x").noconvert(), "(mu, sigma) per group: median, and RMS about the median.");

  m.def(
      "cluster_rows",
      [](Arr1<const float> key) {
        const int64_t rows = (int64_t)key.shape(0);
        OutBuf<int32_t> perm({(size_t)rows});
        {
          nb::gil_scoped_release release;
          cluster_rows(key.data(), rows, perm.get());
        }
        return perm.release();
      },
      nb::arg("key").noconvert(),
      "Stable ascending argsort of the row key: perm[i] = original row at position i.");
}

}  // namespace cvxq::py
