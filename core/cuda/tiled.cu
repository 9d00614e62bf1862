// The product kernel on the GPU tiling (gpu_layout.hpp): y += W^ x for 1..16 vectors with
// tensor cores, and a dequantizer of the tiling for larger batches.
//
// A block runs one item: a run of jobs of one depth B, so its shared memory holds that
// depth's codebook once per lane (entry e of copy l at word 32 e + l: lane l always reads
// bank l, so the random lookups never conflict). Depths 1..4 use pair tables (one 32-bit
// lookup gives the two float16 weights of an MMA register), deeper ones single tables.
//
// Each warp takes jobs in turn. Per unit a lane loads its B payload words (coalesced: the
// warp reads 32 consecutive words per load) and decodes 16 index pairs, each with a shift
// and a masked OR (the pair index times 128 plus the lane's byte offset is the shared
// address), feeding 4 MMAs m16n8k16 (fp16 in, fp32 accumulate). The MMA's reduction index
// k = 2 j + e runs over the block's 8 columns j and the row parity e; its n index 2 b + e'
// picks vector b and parity e', with B[(j, e)][(b, e')] = x_b[j] * scale_j when e = e' and
// 0 otherwise, so D[m][(b, e)] = y_b[row(m, e)]: one MMA covers 32 rows x 8 columns x 4
// vectors. loc * x is summed apart in fp32 and added to every row of the job.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "common.cuh"
#include "cvxq/cuda.hpp"
#include "cvxq/gpu_layout.hpp"

namespace cvxq {
namespace cuda {

namespace {

constexpr int kWarps = 8;
constexpr uint32_t kEmpty = 0xffffffffu;
constexpr int kTableMax = 32768;  // shared bytes of the largest table (depth 4 pairs)


struct TParams {
  const uint32_t* payload;
  const uint4* jobs;
  const uint2* records;
  const uint32_t* pairs;
  const uint16_t* singles;
  const float* table;
  const int32_t* perm;
  int rows, cols;
  int job_begin[10];
  int item_jobs;
  int item_end[9];  // blocks [item_end[d - 1], item_end[d]) run depth d
};

__host__ __device__ constexpr int table_bytes(int B) {
  return B == 0 ? 0 : B <= gpu::kPairDepths ? (1 << (2 * B)) * 32 * 4 : (1 << B) * 32 * 2;
}

__device__ __forceinline__ float h2f(uint32_t bits) { return __half2float(__ushort_as_half((unsigned short)bits)); }

__device__ __forceinline__ uint32_t pack_h2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Bits [P, P + W) of the lane's stream w, moved to bit S and masked (compile-time P, W, S
// after unrolling: one shift or funnel shift, and the AND).
template <int B>
__device__ __forceinline__ uint32_t field(const uint32_t (&w)[B], int P, int W, int S) {
  const int q = P >> 5, r = P & 31;
  uint32_t v;
  if (r + W <= 32) v = r >= S ? w[q] >> (r - S) : w[q] << (S - r);
  else v = __funnelshift_r(w[q], w[q + 1], r - S);
  return v & (((1u << W) - 1) << S);
}

__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The 4 A registers of MMA m of a unit: pair f at bit 2B (4m + f).
template <int B>
__device__ __forceinline__ void decode_mma(const uint32_t (&w)[B], int m, const char* sm, uint32_t lane4,
                                           uint32_t (&a)[4]) {
#pragma unroll
  for (int f = 0; f < 4; ++f) {
    const int P = 2 * B * (4 * m + f);
    if constexpr (B <= gpu::kPairDepths) {
      const uint32_t addr = field<B>(w, P, 2 * B, 7) | lane4;
      a[f] = *reinterpret_cast<const uint32_t*>(sm + addr);
    } else {
      const uint32_t lane2 = lane4 >> 1;
      const uint32_t a0 = field<B>(w, P, B, 6) | lane2, a1 = field<B>(w, P + B, B, 6) | lane2;
      const uint32_t h0 = *reinterpret_cast<const uint16_t*>(sm + a0);
      const uint32_t h1 = *reinterpret_cast<const uint16_t*>(sm + a1);
      a[f] = __byte_perm(h0, h1, 0x5410);
    }
  }
}

template <int BPU, int NT>
struct Unit {
  uint2 r[BPU][2];     // records of columns t and t + 4 of each block
  float xv[BPU][NT][2];  // x of those columns for this lane's vectors
};

template <int BPU>
__device__ __forceinline__ void load_recs(const uint2* rec, int u, int t, uint2 (&r)[BPU][2]) {
#pragma unroll
  for (int bk = 0; bk < BPU; ++bk) {
    r[bk][0] = __ldg(rec + (u * BPU + bk) * 8 + t);
    r[bk][1] = __ldg(rec + (u * BPU + bk) * 8 + t + 4);
  }
}

template <int BPU, int NT>
__device__ __forceinline__ void load_x(const float* __restrict__ x, int cols, int nb, int bq,
                                       const uint2 (&r)[BPU][2], float (&xv)[BPU][NT][2]) {
#pragma unroll
  for (int bk = 0; bk < BPU; ++bk)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int b = bq + 4 * nt;
        const uint32_t col = r[bk][h].x;
        xv[bk][nt][h] = (b < nb && col != kEmpty) ? __ldg(x + (int64_t)b * cols + col) : 0.f;
      }
}

template <int B>
__device__ __forceinline__ void load_words(const uint32_t* __restrict__ pw, int u, uint32_t (&w)[B > 0 ? B : 1]) {
  if constexpr (B > 0) {
#pragma unroll
    for (int p = 0; p < B; ++p) w[p] = __ldg(pw + (u * B + p) * 32);
  }
}

template <int B, int NS, int NT>
__device__ void run_rows(const TParams& p, int ja, int jb, const float* __restrict__ x, int nb, float* __restrict__ y,
                         const char* sm, int lane) {
  constexpr int BPU = B == 0 ? 1 : 4 / NS;
  constexpr int WB = B > 0 ? B : 1;
  const int g = lane >> 2, t = lane & 3, e = g & 1, bq = g >> 1;
  const uint32_t lane4 = (uint32_t)lane << 2;
  const float t0 = B == 0 ? __ldg(p.table) : 0.f;
  const int row0 = (int)__ldg(p.jobs + ja).z;

  float acc[NS][NT][4];
#pragma unroll
  for (int s = 0; s < NS; ++s)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[s][nt][i] = 0.f;
  float lsum[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) lsum[nt] = 0.f;

  for (int jj = ja; jj < jb; ++jj) {  // jobs of the same rows: one accumulator, one flush
  const uint4 job = __ldg(p.jobs + jj);
  const int units = (int)(job.w & 0xffff);
  const uint32_t* pw = p.payload + job.x + lane;
  const uint2* rec = p.records + job.y;

  // The product of one unit from its records, inputs and words.
  auto compute = [&](const Unit<BPU, NT>& cu, const uint32_t (&wc)[WB]) {
#pragma unroll
    for (int bk = 0; bk < BPU; ++bk) {
      uint32_t bf[NT][2];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float x0 = cu.xv[bk][nt][0], x1 = cu.xv[bk][nt][1];
        const uint32_t sl0 = cu.r[bk][0].y, sl1 = cu.r[bk][1].y;
        const float xs0 = x0 * h2f(sl0 & 0xffff), xs1 = x1 * h2f(sl1 & 0xffff);
        // Lane parity e puts x * scale in the low (e = 0) or high (e = 1) half: selects,
        // not branches (the parity differs across the warp).
        bf[nt][0] = pack_h2(e ? 0.f : xs0, e ? xs0 : 0.f);
        bf[nt][1] = pack_h2(e ? 0.f : xs1, e ? xs1 : 0.f);
        const float l0 = B == 0 ? h2f(sl0 >> 16) + h2f(sl0 & 0xffff) * t0 : h2f(sl0 >> 16);  // depth 0: loc + scale * T[0]
        const float l1 = B == 0 ? h2f(sl1 >> 16) + h2f(sl1 & 0xffff) * t0 : h2f(sl1 >> 16);
        lsum[nt] = fmaf(e ? 0.f : x0, l0, fmaf(e ? 0.f : x1, l1, lsum[nt]));
      }
      if constexpr (B > 0) {
        uint32_t a[NS][4];  // all lookups first: NS * 4 shared loads in flight, then the MMAs
#pragma unroll
        for (int s = 0; s < NS; ++s) decode_mma<B>(wc, bk * NS + s, sm, lane4, a[s]);
#pragma unroll
        for (int s = 0; s < NS; ++s)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma16816(acc[s][nt], a[s], bf[nt][0], bf[nt][1]);
      }
    }
  };

  if constexpr (BPU == 1 && NT == 1 && B <= 4) {
    // The common case (128-row groups, one vector): records three units ahead, words two,
    // x one, so each warp keeps about three units of loads in flight.
    Unit<BPU, NT> cur, nxt;
    uint32_t wc[WB], wn[WB];
    uint2 ra[BPU][2];
    load_recs<BPU>(rec, 0, t, cur.r);
    load_words<B>(pw, 0, wc);
    load_x<BPU, NT>(x, p.cols, nb, bq, cur.r, cur.xv);
    if (units > 1) {
      load_recs<BPU>(rec, 1, t, nxt.r);
      load_words<B>(pw, 1, wn);
    }
    if (units > 2) load_recs<BPU>(rec, 2, t, ra);
    for (int u = 0; u < units; ++u) {
      if (u + 1 < units) load_x<BPU, NT>(x, p.cols, nb, bq, nxt.r, nxt.xv);
      compute(cur, wc);
      cur = nxt;
#pragma unroll
      for (int i = 0; i < WB; ++i) wc[i] = wn[i];
      if (u + 2 < units) {
        nxt.r[0][0] = ra[0][0];
        nxt.r[0][1] = ra[0][1];
        load_words<B>(pw, u + 2, wn);
      }
      if (u + 3 < units) load_recs<BPU>(rec, u + 3, t, ra);
    }
  } else {
    // Everything else: the next unit's words and records load while this one computes.
    Unit<BPU, NT> cur;
    uint32_t wc[WB], wn[WB];
    uint2 rn[BPU][2];
    load_recs<BPU>(rec, 0, t, cur.r);
    load_words<B>(pw, 0, wc);
    for (int u = 0; u < units; ++u) {
      load_x<BPU, NT>(x, p.cols, nb, bq, cur.r, cur.xv);
      if (u + 1 < units) {
        load_recs<BPU>(rec, u + 1, t, rn);
        load_words<B>(pw, u + 1, wn);
      }
      compute(cur, wc);
#pragma unroll
      for (int bk = 0; bk < BPU; ++bk) {
        cur.r[bk][0] = rn[bk][0];
        cur.r[bk][1] = rn[bk][1];
      }
#pragma unroll
      for (int i = 0; i < WB; ++i) wc[i] = wn[i];
    }
  }

  }  // jobs

  // loc * x of the jobs' columns, summed over the lanes of one vector, then added to rows.
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    lsum[nt] += __shfl_xor_sync(kFull, lsum[nt], 1);
    lsum[nt] += __shfl_xor_sync(kFull, lsum[nt], 2);
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const float ls = __shfl_sync(kFull, lsum[nt], 8 * t);  // vector t + 4 nt lives on lane 8 t
    const int b = t + 4 * nt;
    if (b >= nb) continue;
#pragma unroll
    for (int s = 0; s < NS; ++s)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = row0 + s * 32 + 4 * g + i;
        if (row < p.rows) {
          const int orig = p.perm ? __ldg(p.perm + row) : row;
          atomicAdd(y + (int64_t)b * p.rows + orig, acc[s][nt][i] + ls);
        }
      }
  }
}

template <int B, int NT>
__device__ void run_item(const TParams& p, int j0, int j1, const float* x, int nb, float* y, char* sm) {
  if constexpr (B > 0) {
    // All loads first, then the stores: a load-store loop would wait out one L2 latency per
    // entry (measured: ~9 us per block for the 32 KB depth-4 table).
    constexpr bool pairs = B <= gpu::kPairDepths;
    constexpr int n = table_bytes(B) / (pairs ? 4 : 2);
    constexpr int per = (n + kWarps * 32 - 1) / (kWarps * 32);
    uint32_t v[per];
#pragma unroll
    for (int k = 0; k < per; ++k) {
      const int i = threadIdx.x + k * kWarps * 32;  // entry i >> 5, copy i & 31 (= lane)
      if (i < n) v[k] = pairs ? __ldg(p.pairs + gpu::pair_offset(B) + (i >> 5)) : __ldg(p.singles + table_offset(B) + (i >> 5));
    }
#pragma unroll
    for (int k = 0; k < per; ++k) {
      const int i = threadIdx.x + k * kWarps * 32;
      if (i < n) {
        if (pairs) reinterpret_cast<uint32_t*>(sm)[i] = v[k];
        else reinterpret_cast<uint16_t*>(sm)[i] = (uint16_t)v[k];
      }
    }
    __syncthreads();
  }
  // Each warp takes a contiguous share of the item's jobs and runs them in runs of equal
  // rows (row0 grows along the job list), accumulating a run in registers and adding it to
  // y once: jobs adding straight into the same rows serialised in L2's atomic units.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int per = (j1 - j0 + kWarps - 1) / kWarps;
  const int wa = j0 + warp * per, wb = min(j1, wa + per);
  for (int j = wa; j < wb;) {
    const uint4 job = __ldg(p.jobs + j);
    int k = j + 1;
    while (k < wb && __ldg(p.jobs + k).z == job.z) ++k;
    switch ((job.w >> 16) & 0xff) {
      case 4: run_rows<B, 4, NT>(p, j, k, x, nb, y, sm, lane); break;
      case 2: run_rows<B, 2, NT>(p, j, k, x, nb, y, sm, lane); break;
      default: run_rows<B, 1, NT>(p, j, k, x, nb, y, sm, lane); break;
    }
    j = k;
  }
}

template <int NT>
__global__ void __launch_bounds__(kWarps * 32, 2) tiled_matmul_kernel(TParams p, const float* __restrict__ x, int nb,
                                                                    float* __restrict__ y) {
  extern __shared__ __align__(16) char sm[];
  int d = 0;
  while (d < 8 && (int)blockIdx.x >= p.item_end[d]) ++d;
  const int item = (int)blockIdx.x - (d ? p.item_end[d - 1] : 0);
  const int j0 = p.job_begin[d] + item * p.item_jobs;
  const int j1 = min(j0 + p.item_jobs, p.job_begin[d + 1]);
  switch (d) {
    case 0: run_item<0, NT>(p, j0, j1, x, nb, y, sm); break;
    case 1: run_item<1, NT>(p, j0, j1, x, nb, y, sm); break;
    case 2: run_item<2, NT>(p, j0, j1, x, nb, y, sm); break;
    case 3: run_item<3, NT>(p, j0, j1, x, nb, y, sm); break;
    case 4: run_item<4, NT>(p, j0, j1, x, nb, y, sm); break;
    case 5: run_item<5, NT>(p, j0, j1, x, nb, y, sm); break;
    case 6: run_item<6, NT>(p, j0, j1, x, nb, y, sm); break;
    case 7: run_item<7, NT>(p, j0, j1, x, nb, y, sm); break;
    default: run_item<8, NT>(p, j0, j1, x, nb, y, sm); break;
  }
}

// Dense W from the tiling: one warp per job, values loc + scale * T[k] with the float32
// table, rounded as the CPU rounds them (no fused multiply-add).
template <bool Half>
__global__ void __launch_bounds__(kWarps * 32) tiled_dequantize_kernel(TParams p, void* out) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int warps = gridDim.x * kWarps;
  const int n_jobs = p.job_begin[9];
  for (int j = blockIdx.x * kWarps + (threadIdx.x >> 5); j < n_jobs; j += warps) {
    const uint4 job = __ldg(p.jobs + j);
    const int units = (int)(job.w & 0xffff), ns = (int)((job.w >> 16) & 0xff), B = (int)(job.w >> 24);
    const int row0 = (int)job.z;
    auto put = [&](int row, uint32_t slot, int k) {
      const uint2 r = __ldg(p.records + slot);
      if (r.x == kEmpty || row >= p.rows) return;
      const float v = __fadd_rn(h2f(r.y >> 16), __fmul_rn(h2f(r.y & 0xffff), __ldg(p.table + table_offset(B) + k)));
      const int64_t at = (int64_t)(p.perm ? __ldg(p.perm + row) : row) * p.cols + r.x;
      if (Half) static_cast<__half*>(out)[at] = __float2half_rn(v);
      else static_cast<float*>(out)[at] = v;
    };
    if (B == 0) {
      for (int u = 0; u < units; ++u)
        for (int i = lane; i < 8 * ns * 32; i += 32) put(row0 + i / 8, job.y + u * 8 + (i & 7), 0);
      continue;
    }
    const int bpu = 4 / ns;
    for (int u = 0; u < units; ++u) {
      uint32_t w[9];
      for (int q = 0; q < 9; ++q) w[q] = q < B ? __ldg(p.payload + job.x + (u * B + q) * 32 + lane) : 0u;
      for (int m = 0; m < 4; ++m)
        for (int f = 0; f < 4; ++f) {
          const int P = 2 * B * (4 * m + f), q = P >> 5, r = P & 31;
          const uint64_t both = (uint64_t)w[q] | (uint64_t)w[q + 1] << 32;
          const uint32_t val = (uint32_t)(both >> r) & ((1u << (2 * B)) - 1);
          const uint32_t slot = job.y + (u * bpu + m / ns) * 8 + t + 4 * (f >> 1);
          const int row = row0 + (m % ns) * 32 + 4 * g + 2 * (f & 1);
          put(row, slot, (int)(val & ((1u << B) - 1)));
          put(row + 1, slot, (int)(val >> B));
        }
    }
  }
}

TParams make_tparams(const DeviceTiled& L) {
  TParams p{};
  p.payload = L.payload;
  p.jobs = reinterpret_cast<const uint4*>(L.jobs);
  p.records = reinterpret_cast<const uint2*>(L.records);
  p.pairs = L.pairs;
  p.singles = L.singles;
  p.table = L.table;
  p.perm = L.perm;
  p.rows = (int)L.rows;
  p.cols = (int)L.cols;
  for (int i = 0; i < 10; ++i) p.job_begin[i] = (int)L.job_begin[i];
  return p;
}

struct Launch {
  int blocks_per_sm = 1, sms = 1;
};

template <int NT>
const Launch& launch_info(int smem) {
  static const Launch info = [smem] {
    Launch li;
    int dev = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&li.sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&li.blocks_per_sm, tiled_matmul_kernel<NT>, kWarps * 32, smem),
          "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    if (li.blocks_per_sm < 1) li.blocks_per_sm = 1;
    return li;
  }();
  return info;
}

template <int NT>
void launch_tiled(const DeviceTiled& L, const float* x, int nb, float* y, cudaStream_t st) {
  TParams p = make_tparams(L);
  const int smem = kTableMax;
  const Launch& li = launch_info<NT>(smem);
  const int n_jobs = p.job_begin[9];
  const int resident = li.sms * li.blocks_per_sm;
  int per = (n_jobs + 2 * resident - 1) / (2 * resident);
  per = std::max(kWarps, (per + kWarps - 1) / kWarps * kWarps);
  p.item_jobs = per;
  int blocks = 0;
  for (int d = 0; d <= 8; ++d) {
    blocks += (p.job_begin[d + 1] - p.job_begin[d] + per - 1) / per;
    p.item_end[d] = blocks;
  }
  if (blocks == 0) return;
  tiled_matmul_kernel<NT><<<blocks, kWarps * 32, smem, st>>>(p, x, nb, y);
  check(cudaGetLastError(), "tiled matmul kernel launch");
}

}  // namespace

void tiled_matmul(const DeviceTiled& L, const float* x, int64_t n, float* y, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  for (int64_t b0 = 0; b0 < n; b0 += 16) {
    const int nb = (int)std::min<int64_t>(16, n - b0);
    const float* xb = x + b0 * L.cols;
    float* yb = y + b0 * L.rows;
    if (nb <= 4) launch_tiled<1>(L, xb, nb, yb, st);
    else if (nb <= 8) launch_tiled<2>(L, xb, nb, yb, st);
    else launch_tiled<4>(L, xb, nb, yb, st);
  }
}

void tiled_dequantize(const DeviceTiled& L, void* out, bool half_out, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const TParams p = make_tparams(L);
  const int n_jobs = p.job_begin[9];
  if (n_jobs == 0) return;
  const int blocks = std::min((n_jobs + kWarps - 1) / kWarps, 4096);
  if (half_out) tiled_dequantize_kernel<true><<<blocks, kWarps * 32, 0, st>>>(p, out);
  else tiled_dequantize_kernel<false><<<blocks, kWarps * 32, 0, st>>>(p, out);
  check(cudaGetLastError(), "tiled dequantize kernel launch");
}

}  // namespace cuda
}  // namespace cvxq
