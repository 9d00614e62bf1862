// CUDA products and dequantization straight from the packed layout (format.hpp), float32
// throughout: the product y = S^T x for layers stored as W^T (the RTN/GPTQ baselines) and
// the dequantizer of any packed layer. Layers stored as W multiply on the GPU tiling instead
// (tiled.cu, gpu_layout.hpp).
//
// Work decomposition. A warp job is (cluster c, 32-row slice s, row pass q, chunk of column
// tiles). Lane l owns column j = 32 t + l of each tile t of the chunk: it finds its group's
// words from the tile offset plus a warp prefix sum of depth * slices (no scan of the
// stream), loads the group's B bit-plane words of slice s, and decodes the 32 rows of the
// slice itself. Lanes therefore read the tile's contiguous stretch of the stream together
// (coalesced), and mixed depths inside a warp cost no divergence beyond the plane loop.
//
// Decoding. Bit plane p of a slice is one word (bit i = row i). A nibble of a plane (4 rows)
// is spread to one bit per byte with one multiply and a mask; OR-ing the planes' spreads
// shifted by p gives 4 rows' indices as 4 bytes, each then one byte extract (PRMT), one
// shared-memory read of the codebook and one FMA per vector. The plane count is a template
// argument picked by a warp-uniform switch on the tile's deepest group.
//
// Product (y = S^T x): the slice's 32 inputs sit in shared memory, each lane dots its
// column's 32 decoded weights with them and adds one value per tile and vector to y.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "common.cuh"
#include "cvxq/cuda.hpp"

namespace cvxq {
namespace cuda {

namespace {

constexpr int kWarps = 8;  // warps per block
constexpr int kMaxBatch = 16;


struct Params {
  int64_t rows, cols, rows_pad;
  int group_rows, n_clusters, n_tiles, slices_max;
  const uint8_t* depth;
  const uint32_t* toff;
  const uint32_t* payload;
  const __half* loc;
  const __half* scale;
  const float* table;
  const int32_t* perm;
  // Job enumeration: job = ((c * n_chunks + chunk) * slices_max + s) * passes + q.
  int chunk_tiles, n_chunks, passes;
  int64_t n_jobs;
};

Params make_params(const DeviceLayer& L, int passes, int64_t resident_warps) {
  Params p;
  const Geometry& g = L.geom;
  p.rows = g.rows;
  p.cols = g.cols;
  p.rows_pad = g.rows_pad;
  p.group_rows = (int)g.group_rows;
  p.n_clusters = (int)g.n_clusters;
  p.n_tiles = (int)g.n_tiles;
  p.slices_max = (int)(g.group_rows / kSliceRows);
  p.depth = L.depth;
  p.toff = L.tile_offset;
  p.payload = L.payload;
  p.loc = reinterpret_cast<const __half*>(L.loc);
  p.scale = reinterpret_cast<const __half*>(L.scale);
  p.table = L.table;
  p.perm = L.perm;
  p.passes = passes;
  // About eight jobs per resident warp: long enough that the per-job reduction is
  // amortised, short enough that the tail of the grid stays small (with two jobs per warp,
  // Nsight Compute showed SMs idle for 30% of a 12288 x 49152 GEMV).
  const int64_t slice_tiles = (int64_t)p.n_clusters * p.slices_max * passes * p.n_tiles;
  int64_t chunk = slice_tiles / (8 * resident_warps);
  if (chunk < 4) chunk = 4;  // small layers: a job of under 4 tiles is mostly reduction

  if (chunk > p.n_tiles) chunk = p.n_tiles;
  p.chunk_tiles = (int)chunk;
  p.n_chunks = (int)((p.n_tiles + chunk - 1) / chunk);
  p.n_jobs = (int64_t)p.n_clusters * p.n_chunks * p.slices_max * passes;
  return p;
}

// Shared: the codebooks of depths 0..8.
struct Shared {
  float table[kTableSize];
};

__device__ void load_shared(Shared& sh, const float* table) {
  for (int i = threadIdx.x; i < kTableSize; i += blockDim.x) sh.table[i] = table[i];
  __syncthreads();
}

// Loads the B plane words (0 above B; planes at or above the warp's largest depth are not
// touched, so the loop costs what the deepest group of the tile needs).
__device__ __forceinline__ void load_planes(const uint32_t* __restrict__ payload, uint32_t off,
                                            int B, int maxB, uint32_t (&w)[8]) {
#pragma unroll
  for (int pl = 0; pl < 8; ++pl) {
    w[pl] = 0;
    if (pl < maxB && pl < B) w[pl] = __ldg(payload + off + pl);
  }
}

// The 8 indices of rows 8 * chunk .. 8 * chunk + 7 of the slice, one per byte of (lo, hi).
// A nibble n of a plane is spread to one bit per byte by n * 0x00204081 (copies of n at
// bits 0, 7, 14, 21: disjoint, so no carries) masked with 0x01010101; shifting both by the
// plane number puts the plane's bit in place. Registers only: no shared-memory table.
template <int MAXB>
__device__ __forceinline__ void spread8(const uint32_t (&w)[8], int chunk, uint32_t& lo, uint32_t& hi) {
  lo = 0;
  hi = 0;
#pragma unroll
  for (int pl = 0; pl < MAXB; ++pl) {
    {
      const uint32_t byte = w[pl] >> (8 * chunk);
      lo |= ((byte & 0xfu) * (0x00204081u << pl)) & (0x01010101u << pl);
      hi |= (((byte >> 4) & 0xfu) * (0x00204081u << pl)) & (0x01010101u << pl);
    }
  }
}

__device__ __forceinline__ uint32_t byte_of(uint32_t v, int i) { return __byte_perm(v, 0, 0x4440 + i); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

// Where a warp job sits: cluster c, slice s, row pass q, its tiles [t_begin, t_end) and the
// cluster's slice count. False for the slices a short last cluster lacks (uniform over the
// warp, so the whole warp skips the job).
struct JobPos {
  int c, s, q, slices, t_begin, t_end;
};

__device__ __forceinline__ bool locate_job(const Params& p, int64_t job, JobPos& j) {
  j.q = (int)(job % p.passes);
  job /= p.passes;
  j.s = (int)(job % p.slices_max);
  job /= p.slices_max;
  const int chunk = (int)(job % p.n_chunks);
  j.c = (int)(job / p.n_chunks);
  const int64_t cl_rows = min((int64_t)p.group_rows, p.rows_pad - (int64_t)j.c * p.group_rows);
  j.slices = (int)(cl_rows / kSliceRows);
  j.t_begin = chunk * p.chunk_tiles;
  j.t_end = min(p.n_tiles, j.t_begin + p.chunk_tiles);
  return j.s < j.slices;
}

// One tile's loads for one lane that need no other load first: depth, tile offset,
// scale/loc and the NB inputs of its column. Issued two tiles ahead of their use.
template <int NB>
struct TileRaw {
  uint32_t d, toff;
  float sc, lc;
  float xv[NB];
};

// A tile ready to decode: its plane words (issued one tile ahead), depth and inputs.
template <int NB>
struct TileIn {
  uint32_t w[8];
  int B, maxB;
  float sc, lc;
  float xv[NB];
};

template <int NB>
__device__ __forceinline__ void fetch_raw(const Params& p, const float* __restrict__ x, int nb, int c, int t,
                                          int lane, TileRaw<NB>& raw) {
  const int64_t j = (int64_t)t * kTileCols + lane;
  const bool live = j < p.cols && t < p.n_tiles;
  raw.d = live ? (uint32_t)__ldg(p.depth + (int64_t)c * p.cols + j) : 0u;
  raw.toff = t < p.n_tiles ? __ldg(p.toff + (int64_t)c * p.n_tiles + t) : 0u;
  raw.sc = live ? __half2float(p.scale[(int64_t)c * p.cols + j]) : 0.f;
  raw.lc = live ? __half2float(p.loc[(int64_t)c * p.cols + j]) : 0.f;
#pragma unroll
  for (int b = 0; b < NB; ++b) raw.xv[b] = (live && b < nb) ? __ldg(x + (int64_t)b * p.cols + j) : 0.f;
}

// The warp prefix sum that locates each lane's group, then the plane-word loads.
template <int NB>
__device__ __forceinline__ void resolve(const Params& p, const TileRaw<NB>& raw, int s, int slices, int lane,
                                        TileIn<NB>& in) {
  const int B = (int)raw.d;
  const uint32_t words = (uint32_t)(B * slices);
  uint32_t inc = words;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const uint32_t v = __shfl_up_sync(kFull, inc, d);
    if (lane >= d) inc += v;
  }
  in.B = B;
  in.maxB = (int)__reduce_max_sync(kFull, (unsigned)B);
  load_planes(p.payload, raw.toff + (inc - words) + (uint32_t)(s * B), B, in.maxB, in.w);
  in.sc = raw.sc;
  in.lc = raw.lc;
#pragma unroll
  for (int b = 0; b < NB; ++b) in.xv[b] = raw.xv[b];
}

// A whole tile at once (depth, offsets, plane words, scale/loc; no inputs), for the kernels
// that do not pipeline.
__device__ __forceinline__ void load_tile(const Params& p, int c, int t, int s, int slices, int lane,
                                          TileIn<1>& tile) {
  TileRaw<1> raw;
  fetch_raw<1>(p, nullptr, 0, c, t, lane, raw);
  resolve<1>(p, raw, s, slices, lane, tile);
}

// y[b, cols] += S^T x[b, rows] for b < nb <= NB.
template <int NB>
__global__ void __launch_bounds__(kWarps * 32)
matmul_cols_kernel(Params p, const float* __restrict__ x, int nb, float* __restrict__ y) {
  __shared__ Shared sh;
  __shared__ float xs_all[kWarps][kSliceRows * NB];
  load_shared(sh, p.table);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  float* xs = xs_all[warp];
  const int64_t warps = (int64_t)gridDim.x * kWarps;
  for (int64_t job = (int64_t)blockIdx.x * kWarps + warp; job < p.n_jobs; job += warps) {
    JobPos jp;
    if (!locate_job(p, job, jp)) continue;
    const int c = jp.c, s = jp.s;

    const int64_t row = (int64_t)c * p.group_rows + (int64_t)s * kSliceRows + lane;
    float xsum[NB];
    __syncwarp();
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      float xv = 0.f;
      if (row < p.rows && b < nb) xv = __ldg(x + (int64_t)b * p.rows + (p.perm ? (int64_t)p.perm[row] : row));
      xs[lane * NB + b] = xv;
      xsum[b] = warp_sum(xv);
    }
    __syncwarp();

    for (int t = jp.t_begin; t < jp.t_end; ++t) {
      const int64_t j = (int64_t)t * kTileCols + lane;
      const bool live = j < p.cols;
      TileIn<1> tile;
      load_tile(p, c, t, s, jp.slices, lane, tile);
      const float* tb = sh.table + ((1 << tile.B) - 1);
      float acc[NB];
#pragma unroll
      for (int b = 0; b < NB; ++b) acc[b] = 0.f;
#pragma unroll
      for (int ch = 0; ch < 4; ++ch) {
        uint32_t lo, hi;
        spread8<8>(tile.w, ch, lo, hi);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float v = tb[byte_of(i < 4 ? lo : hi, i & 3)];
#pragma unroll
          for (int b = 0; b < NB; ++b) acc[b] = fmaf(v, xs[(ch * 8 + i) * NB + b], acc[b]);
        }
      }
      if (live) {
#pragma unroll
        for (int b = 0; b < NB; ++b)
          if (b < nb) atomicAdd(y + (int64_t)b * p.cols + j, tile.sc * acc[b] + tile.lc * xsum[b]);
      }
    }
  }
}

template <bool Transposed, bool Half>
__global__ void __launch_bounds__(kWarps * 32) dequantize_kernel(Params p, void* out) {
  __shared__ Shared sh;
  load_shared(sh, p.table);
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t)gridDim.x * kWarps;
  for (int64_t job = (int64_t)blockIdx.x * kWarps + (threadIdx.x >> 5); job < p.n_jobs; job += warps) {
    JobPos jp;
    if (!locate_job(p, job, jp)) continue;
    const int c = jp.c, s = jp.s;
    for (int t = jp.t_begin; t < jp.t_end; ++t) {
      const int64_t j = (int64_t)t * kTileCols + lane;
      const bool live = j < p.cols;
      TileIn<1> tile;
      load_tile(p, c, t, s, jp.slices, lane, tile);
      const float* tb = sh.table + ((1 << tile.B) - 1);
      const float sc = tile.sc, lc = tile.lc;
#pragma unroll
      for (int ch = 0; ch < 4; ++ch) {
        uint32_t lo, hi;
        spread8<8>(tile.w, ch, lo, hi);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int64_t row = (int64_t)c * p.group_rows + (int64_t)s * kSliceRows + ch * 8 + i;
          if (!live || row >= p.rows) continue;
          // loc + scale * T exactly as the CPU computes it: no fused multiply-add.
          const float v = __fadd_rn(lc, __fmul_rn(sc, tb[byte_of(i < 4 ? lo : hi, i & 3)]));
          const int64_t orig = p.perm ? (int64_t)p.perm[row] : row;
          const int64_t at = Transposed ? j * p.rows + orig : orig * p.cols + j;
          if (Half) static_cast<__half*>(out)[at] = __float2half_rn(v);
          else static_cast<float*>(out)[at] = v;
        }
      }
    }
  }
}

// How many blocks of Kernel fit on the current device at once (cached per kernel: the
// kernels run on the device that is current at their first call).
template <auto Kernel>
int64_t resident_blocks() {
  static const int64_t blocks = [] {
    int dev = 0, sms = 0, per_sm = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, kWarps * 32, 0),
          "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    return (int64_t)sms * (per_sm < 1 ? 1 : per_sm);
  }();
  return blocks;
}

// Launches Kernel(p, args...) over at most one resident wave of blocks; the warps stride
// over the jobs.
template <auto Kernel, class... A>
void launch(const DeviceLayer& L, int passes, cudaStream_t st, const char* what, A... args) {
  const int64_t blocks = resident_blocks<Kernel>();
  const Params p = make_params(L, passes, blocks * kWarps);
  const int64_t need = (p.n_jobs + kWarps - 1) / kWarps;
  const int64_t grid = need < 1 ? 1 : (need < blocks ? need : blocks);
  Kernel<<<(unsigned)grid, kWarps * 32, 0, st>>>(p, args...);
  check(cudaGetLastError(), what);
}

template <int NB>
void launch_cols(const DeviceLayer& L, const float* x, int nb, float* y, cudaStream_t st) {
  launch<matmul_cols_kernel<NB>>(L, 1, st, "matmul (transposed) kernel launch", x, nb, y);
}

}  // namespace

bool available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls are not confused
    return false;
  }
  return n > 0;
}

void matmul(const DeviceLayer& L, bool transposed, const float* x, int64_t n, float* y, void* stream) {
  if (!transposed)
    throw DeviceError("cuda::matmul takes layers stored as W^T; layers stored as W run on the GPU tiling "
                      "(gpu::build_layout, then tiled_matmul)");
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t in = transposed ? L.geom.rows : L.geom.cols;
  const int64_t out = transposed ? L.geom.cols : L.geom.rows;
  for (int64_t b0 = 0; b0 < n; b0 += kMaxBatch) {
    const int nb = (int)(n - b0 < kMaxBatch ? n - b0 : kMaxBatch);
    const float* xb = x + b0 * in;
    float* yb = y + b0 * out;
    if (nb == 1) launch_cols<1>(L, xb, nb, yb, st);
    else if (nb == 2) launch_cols<2>(L, xb, nb, yb, st);
    else if (nb <= 4) launch_cols<4>(L, xb, nb, yb, st);
    else if (nb <= 8) launch_cols<8>(L, xb, nb, yb, st);
    else launch_cols<16>(L, xb, nb, yb, st);
  }
}

void dequantize(const DeviceLayer& L, bool transposed, void* out, bool half_out, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const char* what = "dequantize kernel launch";
  if (transposed) {
    if (half_out) launch<dequantize_kernel<true, true>>(L, 1, st, what, out);
    else launch<dequantize_kernel<true, false>>(L, 1, st, what, out);
  } else {
    if (half_out) launch<dequantize_kernel<false, true>>(L, 1, st, what, out);
    else launch<dequantize_kernel<false, false>>(L, 1, st, what, out);
  }
}

}  // namespace cuda
}  // namespace cvxq
