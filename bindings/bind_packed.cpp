// The packed layer format: geometry, packing, validation and the decode kernels. A packed
// layer is passed as keyword arrays (rows, cols, group_rows, depth, offsets, payload, loc,
// scale, table, perm); PackedLayer holds them (keeping them alive) and validates them once.
#include <nanobind/stl/pair.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <new>
#include <limits>
#include <utility>

#include "common.hpp"
#include "cvxq/cpu_layout.hpp"
#include "cvxq/gpu_layout.hpp"
#include "cvxq/packed.hpp"
#include "cvxq/quantize.hpp"

namespace cvxq::py {

namespace {

template <class T>
using NpArray = nb::ndarray<nb::numpy, T>;

// Output buffers are cache-line aligned (dequantize then streams whole rows) and, when
// large, 2 MiB aligned and advised onto huge pages: faulting in a fresh 64 MB result 4 KiB at
// a time cost several times the dequantization itself.
void* alloc_buffer(size_t bytes) {
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t align = bytes >= 2 * kHuge ? kHuge : 64;
  const size_t size = (std::max<size_t>(bytes, 1) + align - 1) / align * align;
  void* p = std::aligned_alloc(align, size);
  if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  if (align == kHuge) madvise(p, size, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
  return p;
}

// A new numpy array of the given shape owning its buffer. Needs the GIL.
template <class T>
NpArray<T> new_array(std::initializer_list<size_t> shape, T** data) {
  size_t n = 1;
  for (size_t d : shape) n *= d;
  T* p = static_cast<T*>(alloc_buffer(n * sizeof(T)));
  nb::capsule owner(p, [](void* q) noexcept { std::free(q); });
  *data = p;
  return NpArray<T>(p, shape, owner);
}

// The GPU tiling (gpu_layout.hpp) as a dict of numpy arrays, ready to copy to a device.
template <class T>
NpArray<T> vector_array(const std::vector<T>& v) {
  T* p;
  auto out = new_array<T>({v.size()}, &p);
  std::copy(v.begin(), v.end(), p);
  return out;
}

nb::dict layout_dict(const gpu::GpuLayout& L) {
  nb::dict d;
  d["payload"] = vector_array(L.payload);
  d["jobs"] = vector_array(L.jobs);
  d["records"] = vector_array(L.records);
  d["pairs"] = vector_array(L.pairs);
  d["singles"] = vector_array(L.singles);
  nb::list jb;
  for (int i = 0; i < 10; ++i) jb.append(L.job_begin[i]);
  d["job_begin"] = jb;
  nb::list sb;
  for (int i = 0; i < 28; ++i) sb.append(L.seg_begin[i]);
  d["seg_begin"] = sb;
  return d;
}

gpu::GpuLayout layout_from(nb::dict d) {
  gpu::GpuLayout L;
  auto take = [&](const char* k, auto& vec) {
    using T = typename std::decay_t<decltype(vec)>::value_type;
    Arr1<const T> a;
    if (!nb::try_cast(d[k], a, false)) throw nb::type_error((std::string("layout['") + k + "'] has the wrong dtype or shape").c_str());
    vec.assign(a.data(), a.data() + a.shape(0));
  };
  take("payload", L.payload);
  take("jobs", L.jobs);
  take("records", L.records);
  take("pairs", L.pairs);
  take("singles", L.singles);
  nb::list jb = nb::cast<nb::list>(d["job_begin"]);
  for (int i = 0; i < 10; ++i) L.job_begin[i] = nb::cast<int64_t>(jb[i]);
  return L;
}

// x: [cols] or [batch, cols] -> a new [rows] or [batch, rows] array and the batch size.
NpArray<float> new_product(const nb::ndarray<const float, nb::c_contig, nb::device::cpu>& x,
                           const Geometry& geom, float** y, size_t* batch) {
  if (x.ndim() != 1 && x.ndim() != 2)
    shape_error("matmul: x must be [cols] or [batch, cols], got " + std::to_string(x.ndim()) +
                " dimensions");
  *batch = x.ndim() == 2 ? x.shape(0) : 1;
  expect_size("matmul: x's last dimension", x.shape(x.ndim() - 1), geom.cols);
  return x.ndim() == 2 ? new_array<float>({*batch, (size_t)geom.rows}, y)
                       : new_array<float>({(size_t)geom.rows}, y);
}

// The CPU tiling of a layer (cpu_layout.hpp), built once; owns its arrays.
struct CpuLayer {
  cpu::CpuLayout L;

  NpArray<float> matmul(nb::ndarray<const float, nb::c_contig, nb::device::cpu> x,
                        CancelFlag* cancel, const std::optional<ProgressFn>& progress) const {
    float* y;
    size_t batch;
    auto out = new_product(x, L.geom, &y, &batch);
    if (batch == 0) return out;
    const Control ctl = make_control(cancel, progress);
    nb::gil_scoped_release release;
    cpu::matmul(L, x.data(), (int64_t)batch, y, ctl);
    return out;
  }

  NpArray<uint8_t> unpack() const {
    uint8_t* idx;
    auto out = new_array<uint8_t>({(size_t)L.geom.rows_pad, (size_t)L.geom.cols}, &idx);
    nb::gil_scoped_release release;
    cpu::unpack_indices(L, idx);
    return out;
  }

  NpArray<float> dequantize(bool reference) const {
    float* w;
    auto out = new_array<float>({(size_t)L.geom.rows, (size_t)L.geom.cols}, &w);
    nb::gil_scoped_release release;
    if (reference) cpu::dense_reference(L, w);
    else cpu::dequantize(L, w);
    return out;
  }
};

struct PackedLayer {
  Geometry geom;
  Arr2<const uint8_t> depth;
  Arr1<const uint32_t> offsets, payload;
  Arr2<const uint16_t> loc, scale;
  Arr1<const float> table;
  std::optional<Arr1<const int32_t>> perm;

  PackedView view() const {
    PackedView v;
    v.geom = geom;
    v.depth = depth.data();
    v.tile_offset = offsets.data();
    v.payload = payload.data();
    v.payload_words = (int64_t)payload.shape(0);
    v.loc = loc.data();
    v.scale = scale.data();
    v.table = table.data();
    v.perm = perm ? perm->data() : nullptr;
    return v;
  }

  void validate() const {
    nb::gil_scoped_release release;
    cvxq::validate(view());
  }

  NpArray<uint8_t> unpack(bool reference, CancelFlag* cancel,
                          const std::optional<ProgressFn>& progress) const {
    uint8_t* idx;
    auto out = new_array<uint8_t>({(size_t)geom.rows_pad, (size_t)geom.cols}, &idx);
    const Control ctl = make_control(cancel, progress);
    {
      nb::gil_scoped_release release;
      if (reference) unpack_indices_reference(view(), idx);
      else unpack_indices(view(), idx, ctl);
    }
    return out;
  }

  // Into `out` (float32[rows, cols], C-contiguous, e.g. a torch weight's storage) when
  // given, which is returned; else into a new array.
  nb::object dequantize(bool reference, nb::object out, CancelFlag* cancel,
                        const std::optional<ProgressFn>& progress) const {
    nb::object result = out;
    float* w;
    if (out.is_none()) {
      result = nb::cast(new_array<float>({(size_t)geom.rows, (size_t)geom.cols}, &w));
    } else {
      Arr2<float> dst;
      if (!nb::try_cast(out, dst, /*convert=*/false))
        throw nb::type_error("dequantize: out must be a writable C-contiguous float32 CPU "
                             "array of 2 dimensions");
      expect_rows_cols("out", dst.shape(0), dst.shape(1), geom.rows, geom.cols);
      w = dst.data();
    }
    const Control ctl = make_control(cancel, progress);
    {
      nb::gil_scoped_release release;
      if (reference) dequantize_reference(view(), w);
      else cvxq::dequantize(view(), w, ctl);
    }
    return result;
  }

  nb::dict gpu_layout(int64_t units_per_job) const {
    gpu::GpuLayout L;
    {
      nb::gil_scoped_release release;
      L = gpu::build_layout(view(), units_per_job);
    }
    return layout_dict(L);
  }

  CpuLayer cpu_layout() const {
    CpuLayer c;
    nb::gil_scoped_release release;
    c.L = cpu::build_layout(view());
    return c;
  }

  // x: [cols] -> [rows], or [batch, cols] -> [batch, rows].
  NpArray<float> matmul(nb::ndarray<const float, nb::c_contig, nb::device::cpu> x,
                        bool reference, CancelFlag* cancel,
                        const std::optional<ProgressFn>& progress) const {
    float* y;
    size_t batch;
    auto out = new_product(x, geom, &y, &batch);
    if (batch == 0) return out;
    const Control ctl = make_control(cancel, progress);
    {
      nb::gil_scoped_release release;
      if (reference) matmul_reference(view(), x.data(), (int64_t)batch, y);
      else cvxq::matmul(view(), x.data(), (int64_t)batch, y, ctl);
    }
    return out;
  }
};

void expect_depth_shape(const char* name, const Geometry& g, size_t r, size_t c) {
  expect_rows_cols(name, r, c, g.n_clusters, g.cols);
}

PackedLayer make_layer(int64_t rows, int64_t cols, int64_t group_rows, Arr2<const uint8_t> depth,
                       Arr1<const uint32_t> offsets, Arr1<const uint32_t> payload,
                       Arr2<const uint16_t> loc, Arr2<const uint16_t> scale,
                       Arr1<const float> table, std::optional<Arr1<const int32_t>> perm) {
  PackedLayer L{make_geometry(rows, cols, group_rows), depth, offsets, payload, loc, scale,
                table, perm};
  const Geometry& g = L.geom;
  expect_depth_shape("depth", g, depth.shape(0), depth.shape(1));
  expect_depth_shape("loc", g, loc.shape(0), loc.shape(1));
  expect_depth_shape("scale", g, scale.shape(0), scale.shape(1));
  expect_size("offsets", offsets.shape(0), g.n_offsets());
  expect_size("table", table.shape(0), kTableSize);
  if (perm) expect_size("perm", perm->shape(0), g.rows);
  L.validate();
  return L;
}

// The layer's keyword arrays, shared by PackedLayer() and the functional forms.
#define CVXQ_LAYER_PARAMS                                                                \
  int64_t rows, int64_t cols, int64_t group_rows, Arr2<const uint8_t> depth,             \
      Arr1<const uint32_t> offsets, Arr1<const uint32_t> payload, Arr2<const uint16_t> loc, \
      Arr2<const uint16_t> scale, Arr1<const float> table,                               \
      std::optional<Arr1<const int32_t>> perm
// Arrays are noconvert: a wrong dtype or layout is a TypeError, never a silent copy.
#define CVXQ_LAYER_ARGS                                                                    \
  nb::arg("rows"), nb::arg("cols"), nb::arg("group_rows"), nb::arg("depth").noconvert(),   \
      nb::arg("offsets").noconvert(), nb::arg("payload").noconvert(),                      \
      nb::arg("loc").noconvert(), nb::arg("scale").noconvert(),                            \
      nb::arg("table").noconvert(), nb::arg("perm").noconvert().none() = nb::none()
#define CVXQ_MAKE_LAYER \
  make_layer(rows, cols, group_rows, depth, offsets, payload, loc, scale, table, perm)
#define CVXQ_CONTROL_ARGS \
  nb::arg("cancel").none() = nb::none(), nb::arg("progress").none() = nb::none()

}  // namespace

void bind_packed(nb::module_& m) {
  m.attr("TABLE_SIZE") = kTableSize;
  m.attr("FORMAT_VERSION") = kFormatVersion;

  m.def(
      "geometry",
      [](int64_t rows, int64_t cols, int64_t group_rows) {
        const Geometry g = make_geometry(rows, cols, group_rows);
        nb::dict d;
        d["rows"] = g.rows;
        d["cols"] = g.cols;
        d["group_rows"] = g.group_rows;
        d["rows_pad"] = g.rows_pad;
        d["n_clusters"] = g.n_clusters;
        d["n_tiles"] = g.n_tiles;
        d["n_groups"] = g.n_groups();
        d["n_offsets"] = g.n_offsets();
        return d;
      },
      nb::arg("rows"), nb::arg("cols"), nb::arg("group_rows"),
      "Sizes of a packed layer: rows_pad, n_clusters, n_tiles, n_groups, n_offsets.");

  m.def(
      "tile_offsets",
      [](int64_t rows, int64_t cols, int64_t group_rows, Arr2<const uint8_t> depth) {
        const Geometry g = make_geometry(rows, cols, group_rows);
        expect_depth_shape("depth", g, depth.shape(0), depth.shape(1));
        uint32_t* off;
        auto out = new_array<uint32_t>({(size_t)g.n_offsets()}, &off);
        nb::gil_scoped_release release;
        compute_tile_offsets(g, depth.data(), off);
        return out;
      },
      nb::arg("rows"), nb::arg("cols"), nb::arg("group_rows"), nb::arg("depth").noconvert(),
      "Word offset of every (cluster, 32-column tile) for a depth map uint8[n_clusters, cols]; "
      "the last entry is the payload's word count.");

  m.def(
      "pack",
      [](int64_t rows, int64_t cols, int64_t group_rows, Arr2<const uint8_t> depth,
         Arr2<const uint8_t> idx, CancelFlag* cancel, std::optional<ProgressFn> progress) {
        const Geometry g = make_geometry(rows, cols, group_rows);
        expect_depth_shape("depth", g, depth.shape(0), depth.shape(1));
        expect_rows_cols("idx", idx.shape(0), idx.shape(1), g.rows_pad, g.cols);
        uint32_t* off;
        auto offsets = new_array<uint32_t>({(size_t)g.n_offsets()}, &off);
        int64_t words;
        {
          nb::gil_scoped_release release;
          words = compute_tile_offsets(g, depth.data(), off);
        }
        uint32_t* pay;
        auto payload = new_array<uint32_t>({(size_t)words}, &pay);
        const Control ctl = make_control(cancel, progress);
        {
          nb::gil_scoped_release release;
          pack_indices(g, depth.data(), off, idx.data(), pay, ctl);
        }
        return std::make_pair(offsets, payload);
      },
      nb::arg("rows"), nb::arg("cols"), nb::arg("group_rows"), nb::arg("depth").noconvert(),
      nb::arg("idx").noconvert(),
      nb::kw_only(), CVXQ_CONTROL_ARGS,
      "Packs indices uint8[rows_pad, cols] (storage row order) at the depth map; returns "
      "(offsets uint32, payload uint32). Raises ValueError naming the group of an index that "
      "does not fit its depth.");

  nb::class_<CpuLayer>(m, "CpuLayer",
                       "The CPU tiling of a packed layer (core/include/cvxq/cpu_layout.hpp): the "
                       "same index bits re-ordered for the AVX2 product; owns its arrays. Made by "
                       "PackedLayer.cpu_layout().")
      .def_prop_ro("rows", [](const CpuLayer& c) { return c.L.geom.rows; })
      .def_prop_ro("cols", [](const CpuLayer& c) { return c.L.geom.cols; })
      .def_prop_ro("group_rows", [](const CpuLayer& c) { return c.L.geom.group_rows; })
      .def_prop_ro("nbytes", [](const CpuLayer& c) { return c.L.nbytes(); },
                   "Bytes the tiling holds (payload lines, column slots, tables, perm).")
      .def_prop_ro("payload_words", [](const CpuLayer& c) { return (int64_t)c.L.words.size(); })
      .def("matmul", &CpuLayer::matmul, nb::arg("x").noconvert(), nb::kw_only(),
           CVXQ_CONTROL_ARGS,
           "W^ x for x float32[cols] or [batch, cols] -> [rows] or [batch, rows].")
      .def("unpack", &CpuLayer::unpack,
           "Indices uint8[rows_pad, cols] in storage row order (padding rows 0); packing them "
           "gives the packed payload again.")
      .def("dequantize", &CpuLayer::dequantize, nb::kw_only(), nb::arg("reference") = false,
           "Dense float32[rows, cols] in original row order; reference=True decodes every "
           "index bit by bit from the tiling (for tests).");

  nb::class_<PackedLayer>(m, "PackedLayer",
                          "A packed layer over caller-owned arrays (kept alive by this object), "
                          "validated once at construction (FormatError when corrupt).")
      .def(
          "__init__",
          [](PackedLayer* self, CVXQ_LAYER_PARAMS) { new (self) PackedLayer(CVXQ_MAKE_LAYER); },
          nb::kw_only(), CVXQ_LAYER_ARGS)
      .def_prop_ro("rows", [](const PackedLayer& L) { return L.geom.rows; })
      .def_prop_ro("cols", [](const PackedLayer& L) { return L.geom.cols; })
      .def_prop_ro("group_rows", [](const PackedLayer& L) { return L.geom.group_rows; })
      .def_prop_ro("rows_pad", [](const PackedLayer& L) { return L.geom.rows_pad; })
      .def_prop_ro("n_clusters", [](const PackedLayer& L) { return L.geom.n_clusters; })
      .def_prop_ro("payload_words", [](const PackedLayer& L) { return L.payload.shape(0); })
      .def("validate", &PackedLayer::validate, "Raises FormatError naming the first problem.")
      .def("unpack", &PackedLayer::unpack, nb::kw_only(), nb::arg("reference") = false,
           CVXQ_CONTROL_ARGS, "Indices uint8[rows_pad, cols] in storage row order.")
      .def("dequantize", &PackedLayer::dequantize, nb::kw_only(), nb::arg("reference") = false,
           nb::arg("out").none() = nb::none(), CVXQ_CONTROL_ARGS,
           "Dense float32[rows, cols] in original row order (written into out if given).")
      .def("cpu_layout", &PackedLayer::cpu_layout,
           "The CPU tiling of this layer (a CpuLayer), built once from the bit planes.")
      .def("gpu_layout", &PackedLayer::gpu_layout, nb::kw_only(), nb::arg("units_per_job") = 8,
           "The GPU tiling of this layer (core/include/cvxq/gpu_layout.hpp) as a dict of "
           "numpy arrays: payload, jobs, records, pairs, singles, job_begin (10 depth boundaries) "
           "and seg_begin (28 boundaries of the (depth, NS) segments), as lists.")
      .def("matmul", &PackedLayer::matmul, nb::arg("x").noconvert(), nb::kw_only(),
           nb::arg("reference") = false, CVXQ_CONTROL_ARGS,
           "W^ x for x float32[cols] or [batch, cols] -> [rows] or [batch, rows].");

  m.def(
      "gpu_layout_dense",
      [](nb::dict layout, int64_t rows, int64_t cols, int64_t group_rows,
         std::optional<Arr1<const int32_t>> perm) {
        const gpu::GpuLayout L = layout_from(layout);
        const Geometry g = make_geometry(rows, cols, group_rows);
        float* w;
        auto out = new_array<float>({(size_t)rows, (size_t)cols}, &w);
        std::fill(w, w + rows * cols, std::numeric_limits<float>::quiet_NaN());
        gpu::layout_dense_reference(L, g, perm ? perm->data() : nullptr, w);
        return out;
      },
      nb::arg("layout"), nb::arg("rows"), nb::arg("cols"), nb::arg("group_rows"),
      nb::arg("perm").noconvert().none() = nb::none(),
      "Reference decode of a GPU tiling to dense float32[rows, cols] (NaN where no job "
      "wrote), with the float16 table values. For tests.");

  // Functional forms: the same operations on keyword arrays.
  m.def(
      "validate", [](CVXQ_LAYER_PARAMS) { CVXQ_MAKE_LAYER; }, nb::kw_only(), CVXQ_LAYER_ARGS,
      "Raises FormatError naming the first problem of a packed layer.");
  m.def(
      "unpack",
      [](CVXQ_LAYER_PARAMS, bool reference, CancelFlag* cancel,
         std::optional<ProgressFn> progress) {
        return CVXQ_MAKE_LAYER.unpack(reference, cancel, progress);
      },
      nb::kw_only(), CVXQ_LAYER_ARGS, nb::arg("reference") = false, CVXQ_CONTROL_ARGS,
      "Indices uint8[rows_pad, cols] in storage row order.");
  m.def(
      "dequantize",
      [](CVXQ_LAYER_PARAMS, bool reference, nb::object out, CancelFlag* cancel,
         std::optional<ProgressFn> progress) {
        return CVXQ_MAKE_LAYER.dequantize(reference, out, cancel, progress);
      },
      nb::kw_only(), CVXQ_LAYER_ARGS, nb::arg("reference") = false,
      nb::arg("out").none() = nb::none(), CVXQ_CONTROL_ARGS,
      "Dense float32[rows, cols] in original row order (written into out if given).");
  m.def(
      "matmul",
      [](nb::ndarray<const float, nb::c_contig, nb::device::cpu> x, CVXQ_LAYER_PARAMS,
         bool reference, CancelFlag* cancel, std::optional<ProgressFn> progress) {
        return CVXQ_MAKE_LAYER.matmul(x, reference, cancel, progress);
      },
      nb::arg("x").noconvert(), nb::kw_only(), CVXQ_LAYER_ARGS, nb::arg("reference") = false,
      CVXQ_CONTROL_ARGS, "W^ x for x float32[cols] or [batch, cols].");

  m.def(
      "pack_nibbles",
      [](Arr1<const uint8_t> depth) {
        const size_t n = depth.shape(0);
        uint8_t* out;
        auto arr = new_array<uint8_t>({(n + 1) / 2}, &out);
        pack_nibbles(depth.data(), (int64_t)n, out);
        return arr;
      },
      nb::arg("depth").noconvert(), "Two values (0..15) per byte, low nibble first.");
  m.def(
      "unpack_nibbles",
      [](Arr1<const uint8_t> data, int64_t n) {
        if (n < 0) shape_error("unpack_nibbles: n must be >= 0, got " + std::to_string(n));
        expect_size("unpack_nibbles: data", data.shape(0), (n + 1) / 2);
        uint8_t* out;
        auto arr = new_array<uint8_t>({(size_t)n}, &out);
        unpack_nibbles(data.data(), n, out);
        return arr;
      },
      nb::arg("data").noconvert(), nb::arg("n"), "Inverse of pack_nibbles: n values.");

  m.def(
      "half_to_float",
      [](Arr1<const uint16_t> h) {
        float* out;
        auto arr = new_array<float>({h.shape(0)}, &out);
        for (size_t i = 0; i < h.shape(0); ++i) out[i] = half_to_float(h.data()[i]);
        return arr;
      },
      nb::arg("h").noconvert(), "float16 bits -> float32, as the kernels decode loc and scale.");
  m.def(
      "float_to_half",
      [](Arr1<const float> f) {
        uint16_t* out;
        auto arr = new_array<uint16_t>({f.shape(0)}, &out);
        for (size_t i = 0; i < f.shape(0); ++i) out[i] = float_to_half(f.data()[i]);
        return arr;
      },
      nb::arg("f").noconvert(),
      "float32 -> float16 bits (round to nearest even), as loc/scale are stored.");
}

#undef CVXQ_LAYER_PARAMS
#undef CVXQ_LAYER_ARGS
#undef CVXQ_MAKE_LAYER
#undef CVXQ_CONTROL_ARGS

}  // namespace cvxq::py
