// The CUDA kernels (core/cuda) for arrays that live on a GPU: torch CUDA tensors or any
// DLPack producer. Without CVXQ_CUDA the functions exist and say how to get them.
//
// Packed arrays arrive with signed dtypes of the same width as the format's (payload and
// tile offsets as int32, loc/scale float16 bits as int16), because torch has no uint32 or
// uint16 tensors worth relying on. The layer must have been validated on the host
// (PackedLayer does that) before its arrays were copied to the device.
#include "common.hpp"
#include "cvxq/format.hpp"
#include "cvxq/gpu_layout.hpp"

#include <nanobind/stl/vector.h>

#ifdef CVXQ_WITH_CUDA
#include "cvxq/cuda.hpp"
#endif

namespace cvxq::py {

namespace {

#ifdef CVXQ_WITH_CUDA
template <class T>
using Dev1 = nb::ndarray<T, nb::ndim<1>, nb::c_contig, nb::device::cuda>;
template <class T>
using Dev2 = nb::ndarray<T, nb::ndim<2>, nb::c_contig, nb::device::cuda>;

struct DevLayerArgs {
  int64_t rows, cols, group_rows;
  Dev1<const uint8_t> depth;
  Dev1<const int32_t> tile_offset, payload;
  Dev1<const int16_t> loc, scale;
  Dev1<const float> table;
  std::optional<Dev1<const int32_t>> perm;
};

cuda::DeviceLayer device_layer(const DevLayerArgs& a) {
  cuda::DeviceLayer L;
  L.geom = make_geometry(a.rows, a.cols, a.group_rows);
  expect_size("depth", a.depth.size(), L.geom.n_groups());
  expect_size("tile_offset", a.tile_offset.size(), L.geom.n_offsets());
  expect_size("loc", a.loc.size(), L.geom.n_groups());
  expect_size("scale", a.scale.size(), L.geom.n_groups());
  expect_size("table", a.table.size(), kTableSize);
  if (a.perm) expect_size("perm", a.perm->size(), L.geom.rows);
  const int dev = a.depth.device_id();
  for (int other : {a.tile_offset.device_id(), a.payload.device_id(), a.loc.device_id(),
                    a.scale.device_id(), a.table.device_id()})
    if (other != dev) throw ValueError("the packed arrays of one layer are on different GPUs");
  L.depth = a.depth.data();
  L.tile_offset = reinterpret_cast<const uint32_t*>(a.tile_offset.data());
  L.payload = reinterpret_cast<const uint32_t*>(a.payload.data());
  L.loc = reinterpret_cast<const uint16_t*>(a.loc.data());
  L.scale = reinterpret_cast<const uint16_t*>(a.scale.data());
  L.table = a.table.data();
  L.perm = a.perm ? a.perm->data() : nullptr;
  return L;
}

#define CVXQ_LAYER_ARGS                                                                   \
  nb::arg("rows"), nb::arg("cols"), nb::arg("group_rows"), nb::arg("transposed"),         \
      nb::arg("depth").noconvert(), nb::arg("tile_offset").noconvert(),                   \
      nb::arg("payload").noconvert(), nb::arg("loc").noconvert(),                         \
      nb::arg("scale").noconvert(), nb::arg("table").noconvert(),                         \
      nb::arg("perm").noconvert().none()

struct TiledArgs {
  int64_t rows, cols;
  Dev1<const int32_t> payload, jobs, records, pairs;
  Dev1<const int16_t> singles;
  Dev1<const float> table;
  std::optional<Dev1<const int32_t>> perm;
  std::vector<int64_t> seg_begin;
};

cuda::DeviceTiled device_tiled(const TiledArgs& a) {
  cuda::DeviceTiled L;
  if (a.rows < 1 || a.cols < 1) throw ValueError("rows and cols must be >= 1");
  if (a.seg_begin.size() != 28) throw ValueError("seg_begin must hold 28 entries");
  for (int i = 0; i < 28; ++i) {
    L.seg_begin[i] = a.seg_begin[(size_t)i];
    if (L.seg_begin[i] < 0 || (i && L.seg_begin[i] < L.seg_begin[i - 1]))
      throw ValueError("seg_begin must be non-decreasing from 0");
  }
  expect_size("jobs", a.jobs.size(), 4 * L.seg_begin[27]);
  expect_size("pairs", a.pairs.size(), gpu::kPairTableSize);
  expect_size("singles", a.singles.size(), kTableSize);
  expect_size("table", a.table.size(), kTableSize);
  if (a.perm) expect_size("perm", a.perm->size(), a.rows);
  const int dev = a.payload.device_id();
  for (int other : {a.jobs.device_id(), a.records.device_id(), a.pairs.device_id(), a.singles.device_id(),
                    a.table.device_id()})
    if (other != dev) throw ValueError("the arrays of one layer are on different GPUs");
  if ((reinterpret_cast<uintptr_t>(a.jobs.data()) & 15) || (reinterpret_cast<uintptr_t>(a.records.data()) & 7))
    throw ValueError("jobs must be 16-byte and records 8-byte aligned");
  L.rows = a.rows;
  L.cols = a.cols;
  L.payload = reinterpret_cast<const uint32_t*>(a.payload.data());
  L.jobs = reinterpret_cast<const uint32_t*>(a.jobs.data());
  L.records = reinterpret_cast<const uint32_t*>(a.records.data());
  L.pairs = reinterpret_cast<const uint32_t*>(a.pairs.data());
  L.singles = reinterpret_cast<const uint16_t*>(a.singles.data());
  L.table = a.table.data();
  L.perm = a.perm ? a.perm->data() : nullptr;
  return L;
}

#define CVXQ_TILED_ARGS                                                                         \
  nb::arg("rows"), nb::arg("cols"), nb::arg("payload").noconvert(), nb::arg("jobs").noconvert(), \
      nb::arg("records").noconvert(), nb::arg("pairs").noconvert(), nb::arg("singles").noconvert(), \
      nb::arg("table").noconvert(), nb::arg("perm").noconvert().none(), nb::arg("seg_begin")
#endif

}  // namespace

void bind_cuda(nb::module_& m) {
#ifdef CVXQ_PHASES
  m.def(
      "cuda_debug_phases",
      [](bool reset) {
        std::vector<uint64_t> v(8192 * 16);
        cuda::debug_phases(v.data(), reset);
        nb::list out;
        for (uint64_t e : v) out.append(e);
        return out;
      },
      nb::arg("reset") = true, "Dev instrumentation (-DCVXQ_PHASES): 8192 x 16 phase stamps, flat.");
#endif
#ifdef CVXQ_WITH_CUDA
  static nb::exception<cuda::DeviceError> device_exc(m, "CudaError", PyExc_RuntimeError);
  m.def("cuda_available", [] { return cuda::available(); },
        "True when this build has the CUDA kernels and the CUDA runtime sees a GPU.");
  m.def(
      "cuda_matmul",
      [](int64_t rows, int64_t cols, int64_t group_rows, bool transposed, Dev1<const uint8_t> depth,
         Dev1<const int32_t> tile_offset, Dev1<const int32_t> payload, Dev1<const int16_t> loc,
         Dev1<const int16_t> scale, Dev1<const float> table, std::optional<Dev1<const int32_t>> perm,
         Dev2<const float> x, Dev2<float> y, uintptr_t stream) {
        const cuda::DeviceLayer L = device_layer(
            {rows, cols, group_rows, depth, tile_offset, payload, loc, scale, table, perm});
        const int64_t in = transposed ? rows : cols, out = transposed ? cols : rows;
        expect_rows_cols("x", x.shape(0), x.shape(1), (int64_t)x.shape(0), in);
        expect_rows_cols("y", y.shape(0), y.shape(1), (int64_t)x.shape(0), out);
        if (x.device_id() != depth.device_id() || y.device_id() != depth.device_id())
          throw ValueError("x, y and the packed layer must be on the same GPU");
        nb::gil_scoped_release release;
        cuda::matmul(L, transposed, x.data(), (int64_t)x.shape(0), y.data(),
                     reinterpret_cast<void*>(stream));
      },
      CVXQ_LAYER_ARGS, nb::arg("x").noconvert(), nb::arg("y").noconvert(), nb::arg("stream") = 0,
      "y += W^ x for a layer stored as W^T (transposed=True; layers stored as W use "
      "cuda_tiled_matmul): float32 x [n, in_features] and y [n, out_features] on the GPU, "
      "decoding the packed layer on the fly (no dense copy of W). Asynchronous on `stream` "
      "(a cudaStream_t as an int, e.g. torch.cuda.current_stream().cuda_stream).");
  m.def(
      "cuda_dequantize",
      [](int64_t rows, int64_t cols, int64_t group_rows, bool transposed, Dev1<const uint8_t> depth,
         Dev1<const int32_t> tile_offset, Dev1<const int32_t> payload, Dev1<const int16_t> loc,
         Dev1<const int16_t> scale, Dev1<const float> table, std::optional<Dev1<const int32_t>> perm,
         nb::ndarray<nb::ndim<2>, nb::c_contig, nb::device::cuda> out, uintptr_t stream) {
        const cuda::DeviceLayer L = device_layer(
            {rows, cols, group_rows, depth, tile_offset, payload, loc, scale, table, perm});
        const int64_t of = transposed ? cols : rows, inf = transposed ? rows : cols;
        expect_rows_cols("out", out.shape(0), out.shape(1), of, inf);
        const auto dt = out.dtype();
        const bool half = dt == nb::dtype<int16_t>() ||
                          (dt.code == (uint8_t)nb::dlpack::dtype_code::Float && dt.bits == 16);
        if (!half && dt != nb::dtype<float>())
          throw ValueError("out must be float32 or float16");
        if (out.device_id() != depth.device_id())
          throw ValueError("out and the packed layer must be on the same GPU");
        nb::gil_scoped_release release;
        cuda::dequantize(L, transposed, out.data(), half, reinterpret_cast<void*>(stream));
      },
      CVXQ_LAYER_ARGS, nb::arg("out").noconvert(), nb::arg("stream") = 0,
      "Dense W [out_features, in_features] into `out` (float32 or float16) on the GPU.");
  m.def(
      "cuda_tiled_matmul",
      [](int64_t rows, int64_t cols, Dev1<const int32_t> payload, Dev1<const int32_t> jobs,
         Dev1<const int32_t> records, Dev1<const int32_t> pairs, Dev1<const int16_t> singles,
         Dev1<const float> table, std::optional<Dev1<const int32_t>> perm, std::vector<int64_t> seg_begin,
         Dev2<const float> x, Dev2<float> y, uintptr_t stream) {
        const cuda::DeviceTiled L =
            device_tiled({rows, cols, payload, jobs, records, pairs, singles, table, perm, seg_begin});
        expect_rows_cols("x", x.shape(0), x.shape(1), (int64_t)x.shape(0), cols);
        expect_rows_cols("y", y.shape(0), y.shape(1), (int64_t)x.shape(0), rows);
        if (x.device_id() != payload.device_id() || y.device_id() != payload.device_id())
          throw ValueError("x, y and the layer must be on the same GPU");
        nb::gil_scoped_release release;
        cuda::tiled_matmul(L, x.data(), (int64_t)x.shape(0), y.data(), reinterpret_cast<void*>(stream));
      },
      CVXQ_TILED_ARGS, nb::arg("x").noconvert(), nb::arg("y").noconvert(), nb::arg("stream") = 0,
      "y += W^ x on a layer in the GPU tiling (PackedLayer.gpu_layout arrays on the GPU) with "
      "tensor cores: float16 products (x * scale, codebook values) summed in float32.");
  m.def(
      "cuda_tiled_dequantize",
      [](int64_t rows, int64_t cols, Dev1<const int32_t> payload, Dev1<const int32_t> jobs,
         Dev1<const int32_t> records, Dev1<const int32_t> pairs, Dev1<const int16_t> singles,
         Dev1<const float> table, std::optional<Dev1<const int32_t>> perm, std::vector<int64_t> seg_begin,
         nb::ndarray<nb::ndim<2>, nb::c_contig, nb::device::cuda> out, uintptr_t stream) {
        const cuda::DeviceTiled L =
            device_tiled({rows, cols, payload, jobs, records, pairs, singles, table, perm, seg_begin});
        expect_rows_cols("out", out.shape(0), out.shape(1), rows, cols);
        const auto dt = out.dtype();
        const bool half = dt.code == (uint8_t)nb::dlpack::dtype_code::Float && dt.bits == 16;
        if (!half && dt != nb::dtype<float>()) throw ValueError("out must be float32 or float16");
        if (out.device_id() != payload.device_id()) throw ValueError("out and the layer must be on the same GPU");
        nb::gil_scoped_release release;
        cuda::tiled_dequantize(L, out.data(), half, reinterpret_cast<void*>(stream));
      },
      CVXQ_TILED_ARGS, nb::arg("out").noconvert(), nb::arg("stream") = 0,
      "Dense W [rows, cols] (float32 or float16) from a layer in the GPU tiling.");
  m.def("cuda_set_warp_windows_max_jobs", [](int64_t jobs) { return cuda::set_warp_windows_max_jobs(jobs); },
        nb::arg("jobs"),
        "Tuning: layers with up to `jobs` fast-kernel jobs run 5-8 vectors with per-warp y windows. "
        "Returns the previous value.");
#else
  m.def("cuda_available", [] { return false; },
        "False: this build has no CUDA kernels (rebuild with CVXQ_CUDA=ON).");
#endif
}

}  // namespace cvxq::py
