// CUDA kernels on the packed layout of format.hpp: products straight from the packed data
// (no dense copy of W) and a dequantizer for large batches. Built only with CVXQ_CUDA=ON;
// this header includes no CUDA header, so the bindings compile with a plain C++ compiler.
//
// Every pointer in DeviceLayer, and x / y / out, is device memory. The layer must have
// passed cvxq::validate() on the host before its arrays were copied to the device: the
// kernels trust depths (0..8), tile offsets and perm and do no bounds checks of their own.
#pragma once
#include <cstdint>
#include <stdexcept>

#include "cvxq/format.hpp"

namespace cvxq {
namespace cuda {

// A CUDA runtime call or kernel launch failed; the message names the call and the error.
struct DeviceError : std::runtime_error { using std::runtime_error::runtime_error; };

struct DeviceLayer {
  Geometry geom;
  const uint8_t* depth = nullptr;         // [n_clusters, cols]
  const uint32_t* tile_offset = nullptr;  // [n_offsets]
  const uint32_t* payload = nullptr;      // [tile_offset[n_offsets - 1]]
  const uint16_t* loc = nullptr;          // float16 bits [n_clusters, cols]
  const uint16_t* scale = nullptr;        // float16 bits [n_clusters, cols]
  const float* table = nullptr;           // [kTableSize]
  const int32_t* perm = nullptr;          // [rows] or null (identity)
};

// True when the CUDA runtime sees at least one device. Never throws.
bool available();

// Products of the stored matrix S [rows, cols] (original row order, i.e. after perm) with a
// batch of n vectors, accumulated into y (which the caller initialises, e.g. to zero or to
// the bias):
//   y[b, cols] += S^T x[b, rows]      (layers stored as W^T; transposed must be true --
//   layers stored as W use tiled_matmul on the GPU tiling, and false throws DeviceError)
// x and y are float32, row-major, contiguous. Any n >= 1 (done in chunks of 16 vectors,
// each chunk decoding the weights once). Runs on `stream` (a cudaStream_t; null = default).
void matmul(const DeviceLayer& layer, bool transposed, const float* x, int64_t n, float* y,
            void* stream);

// Dense W into out: [rows, cols] for a layer stored as W, [cols, rows] for one stored as
// W^T, so that out is always [out_features, in_features]. half_out: out holds float16
// (bits in uint16), else float32. Values are loc + scale * T[k], rounded like the CPU path.
void dequantize(const DeviceLayer& layer, bool transposed, void* out, bool half_out,
                void* stream);

// A layer in the GPU tiling of gpu_layout.hpp (arrays of a GpuLayout copied to the device,
// plus the layer's float32 table and perm). rows/cols: the stored matrix's shape.
struct DeviceTiled {
  int64_t rows = 0, cols = 0;
  const uint32_t* payload = nullptr;
  const uint32_t* jobs = nullptr;     // 4 words per job, 16-byte aligned
  const uint32_t* records = nullptr;  // 2 words per slot, 8-byte aligned
  const uint32_t* pairs = nullptr;    // gpu::kPairTableSize
  const uint16_t* singles = nullptr;  // kTableSize float16
  const float* table = nullptr;       // kTableSize float32 (dequantize)
  const int32_t* perm = nullptr;      // [rows] or null
  int64_t seg_begin[28] = {};  // GpuLayout::seg_begin
};

// y[b, rows] += S x[b, cols] on the tiling with tensor cores: products of float16 inputs
// (x * scale and the codebook values, each rounded to float16) accumulated in float32,
// plus loc * x in float32. Any n >= 1 (chunks of 16 vectors).
void tiled_matmul(const DeviceTiled& layer, const float* x, int64_t n, float* y, void* stream);

// Tuning: layers with up to this many fast-kernel jobs run 5-8 vectors with per-warp y
// windows (tiled.cu, launch_fast). Returns the previous value.
int64_t set_warp_windows_max_jobs(int64_t jobs);

#ifdef CVXQ_PHASES
// Dev instrumentation of the fast kernel (built with -DCVXQ_PHASES, tools/phases.py): copies
// 8192 x 16 values out (per warp: globaltimer at start and end, clock cycles at each phase)
// and optionally clears them.
void debug_phases(uint64_t* out, bool reset);
#endif

// Dense S [rows, cols] (original row order) from the tiling, exactly as dequantize() rounds.
void tiled_dequantize(const DeviceTiled& layer, void* out, bool half_out, void* stream);

}  // namespace cuda
}  // namespace cvxq
