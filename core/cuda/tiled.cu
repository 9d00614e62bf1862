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
//
// Two product kernels share that scheme. tiled_fast_kernel runs the segments of 4- and
// 2-slice chunks (128- and 64-row groups: nearly all of a CVXQ layer, depth-0 columns
// included; one kernel per chunk size) for up to 8 vectors and is built for instruction
// count: x * scale made once per record and handed out through shared memory, lookups of
// one LOP3 on a static table, no bounds checks (padded payload), sums gathered in windows
// of y in shared memory; 9..16 vectors run it per 8. The general tiled_matmul_kernel runs
// the 1-slice chunks (32-row groups) for up to 16 vectors at once. Both give each warp an
// even share of a segment's jobs, in one wave of blocks.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <string>
#include <type_traits>

#include "common.cuh"
#include "cvxq/cuda.hpp"
#include "cvxq/gpu_layout.hpp"

namespace cvxq {
namespace cuda {

namespace {

constexpr int kWarps = 8;
constexpr uint32_t kEmpty = 0xffffffffu;
constexpr int kTableMax = 32768;  // shared bytes of the largest table (depth 4 pairs)

#ifdef CVXQ_PHASES
// Dev instrumentation (tools/phases.py): per warp of the fast kernel, %globaltimer at its
// start and end, and SM clock cycles since its start at each phase.
constexpr int kPhaseWarps = 8192, kPhases = 16;
__device__ unsigned long long g_phases[kPhaseWarps][kPhases];
__device__ __forceinline__ unsigned long long gtimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}
#define PHASE(k)                                                                   \
  do {                                                                             \
    const int pw_ = blockIdx.x * kWarps + (threadIdx.x >> 5);                      \
    if ((threadIdx.x & 31) == 0 && pw_ < kPhaseWarps && g_phases[pw_][k] == 0)    \
      g_phases[pw_][k] = k == 0 || k == 7 ? gtimer() : clock64() - phase_c0;       \
  } while (0)
#else
#define PHASE(k) \
  do {           \
  } while (0)
#endif


struct TParams {
  const uint32_t* payload;
  const uint4* jobs;
  const uint2* records;
  const uint32_t* pairs;
  const uint16_t* singles;
  const float* table;
  const int32_t* perm;
  int rows, cols;
  int seg_begin[28];  // GpuLayout::seg_begin: segment 3 d + i holds depth d, NS = 4 >> i
  int item_jobs[27];  // jobs per block in segment s
  int item_end[27];   // blocks [item_end[s - 1], item_end[s]) run segment s
};

__device__ __forceinline__ float h2f(uint32_t bits) { return __half2float(__ushort_as_half((unsigned short)bits)); }

__device__ __forceinline__ uint32_t pack_h2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// x * scale enters the MMA as float16, whose largest finite value is 65504: real inputs can
// come within 18x of it (the default model: |x * scale| up to 3.6e3). The fast kernel redoes
// a run where it passes 65504 in float32 (run_fp32). The general kernel's warps feed
// x * scale * 2^-ex, with ex = 0 until a value passes kXsMax (the products are then exactly
// those without it); such a value raises ex for the rest of the warp's run, what it has
// accumulated is scaled by the same power of two (exact), and the run adds acc * 2^ex.
constexpr float kXsMax = 32768.f;
constexpr float kHalfMax = 65504.f;  // float16's largest finite value
// The smallest e >= 0 with |v| * 2^-e < 2^15 (|v| in [2^E, 2^(E+1)); inf and NaN give 114).
__device__ __forceinline__ int xs_exponent(float v) {
  return max(0, (int)((__float_as_uint(v) >> 23) & 0xff) - 127 - 14);
}
__device__ __forceinline__ float pow2(int e) { return __int_as_float((127 + e) << 23); }  // -126 <= e <= 127
// A warp's ex after values whose largest magnitude on this lane is vmax (unscaled): the
// factor to scale what it has accumulated by (1: ex unchanged).
__device__ __forceinline__ float raise_exponent(float vmax, int& ex, float& fx) {
  const int en = (int)__reduce_max_sync(kFull, (unsigned)xs_exponent(vmax));
  if (en <= ex) return 1.f;
  const float down = pow2(ex - en);
  ex = en;
  fx = pow2(-en);
  return down;
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

// (v & mask) | c in one LOP3 (the compiler otherwise re-masks c in a second one).
__device__ __forceinline__ uint32_t and_or(uint32_t v, uint32_t mask, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(v), "r"(mask), "r"(c));
  return r;
}

// Bits [P, P + W) of the lane's stream w moved to bit S, not masked.
template <int B>
__device__ __forceinline__ uint32_t shifted(const uint32_t (&w)[B], int P, int W, int S) {
  const int q = P >> 5, r = P & 31;
  if (r + W <= 32) return r >= S ? w[q] >> (r - S) : w[q] << (S - r);
  return __funnelshift_r(w[q], w[q + 1], r - S);
}

// The 4 A registers of MMA m of a unit: pair f at bit 2B (4m + f).
template <int B>
__device__ __forceinline__ void decode_mma(const uint32_t (&w)[B], int m, const char* sm, uint32_t lane4,
                                           uint32_t (&a)[4]) {
#pragma unroll
  for (int f = 0; f < 4; ++f) {
    const int P = 2 * B * (4 * m + f);
    if constexpr (B <= gpu::kPairDepths) {
      const uint32_t addr = and_or(shifted<B>(w, P, 2 * B, 7), ((1u << (2 * B)) - 1) << 7, lane4);
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

// Adds a warp's accumulated rows to y for vector b: lane (g, t) holds rows
// row0 + 32 s + 4 g + i (s < NS, i < 4) of vector b; value(s, i) is what to add.
template <int NS, class V>
__device__ __forceinline__ void add_rows(const TParams& p, float* __restrict__ y, int b, int row0, int g, V&& value) {
#pragma unroll
  for (int s = 0; s < NS; ++s)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = row0 + s * 32 + 4 * g + i;
      if (row < p.rows) {
        const int orig = p.perm ? __ldg(p.perm + row) : row;
        atomicAdd(y + (int64_t)b * p.rows + orig, value(s, i));
      }
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
  int ex = 0;      // x * scale enters the MMAs times fx = 2^-ex (kXsMax)
  float fx = 1.f;

  for (int jj = ja; jj < jb; ++jj) {  // jobs of the same rows: one accumulator, one flush
  const uint4 job = __ldg(p.jobs + jj);
  const int units = (int)(job.w & 0xffff);
  const uint32_t* pw = p.payload + job.x + lane;
  const uint2* rec = p.records + job.y;

  // The product of one unit from its records, inputs and words.
  auto compute = [&](const Unit<BPU, NT>& cu, const uint32_t (&wc)[WB]) {
    if constexpr (B > 0) {  // x * scale within float16's range (kXsMax); costs 32-row groups 4-5% (H200)
      float vmax = 0.f;
#pragma unroll
      for (int bk = 0; bk < BPU; ++bk)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int h = 0; h < 2; ++h) vmax = fmaxf(vmax, fabsf(cu.xv[bk][nt][h] * h2f(cu.r[bk][h].y & 0xffff)));
      if (__any_sync(kFull, !(vmax * fx <= kXsMax))) {  // rare: the default model stays 18x below
        const float down = raise_exponent(vmax, ex, fx);
#pragma unroll
        for (int s = 0; s < NS; ++s)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[s][nt][i] *= down;
      }
    }
#pragma unroll
    for (int bk = 0; bk < BPU; ++bk) {
      uint32_t bf[NT][2];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float x0 = cu.xv[bk][nt][0], x1 = cu.xv[bk][nt][1];
        const uint32_t sl0 = cu.r[bk][0].y, sl1 = cu.r[bk][1].y;
        const float xs0 = x0 * (h2f(sl0 & 0xffff) * fx), xs1 = x1 * (h2f(sl1 & 0xffff) * fx);
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
    const float up = pow2(ex);  // 1 unless x * scale passed kXsMax
    add_rows<NS>(p, y, b, row0, g, [&](int s, int i) { return acc[s][nt][i] * up + ls; });
  }
}

// Shared memory `sm`: depth B's table, one copy per lane (entry e, copy c at e * 32 + c). One
// global load per entry per block (into `stage`, >= 1 KB of shared memory), then the 32 copies
// from there with 16-byte stores. (Loading every copy from global memory was 32 times the
// requests, all blocks at once on the same few lines: on an H200 the table was ready at p90
// 3.9 instead of 1.9 us on 4096 x 4096.)
template <int B>
__device__ __forceinline__ void fill_table(const TParams& p, char* sm, uint32_t* stage) {
  if constexpr (B > 0) {
    constexpr bool pairs = B <= gpu::kPairDepths;
    constexpr int entries = pairs ? 1 << (2 * B) : 1 << B;  // <= 256
    if (threadIdx.x < entries)
      stage[threadIdx.x] = pairs ? __ldg(p.pairs + gpu::pair_offset(B) + threadIdx.x)
                                 : (uint32_t)__ldg(p.singles + table_offset(B) + threadIdx.x) * 0x10001u;
    __syncthreads();
    constexpr int per_entry = pairs ? 8 : 4;  // 16-byte stores per entry: 32 copies of 4 or 2 bytes
#pragma unroll
    for (int i = threadIdx.x; i < entries * per_entry; i += kWarps * 32) {
      const uint32_t v = stage[i / per_entry];
      reinterpret_cast<uint4*>(sm)[i] = make_uint4(v, v, v, v);
    }
    __syncthreads();
  }
}

// The block's item: jobs [j0, j1) of segment `seg`. Each warp takes a contiguous share of
// them and runs them in runs of equal rows (row0 grows along the job list), accumulating a
// run in registers and adding it to y once: jobs adding straight into the same rows
// serialised in L2's atomic units. f(first job, end job, units of the run) runs one.
template <class Before, class F>
__device__ __forceinline__ void for_each_run(const TParams& p, int j0, int j1, Before&& before, F&& f) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n_item = j1 - j0;
  const int wa = j0 + n_item * warp / kWarps, wb = j0 + n_item * (warp + 1) / kWarps;
  // Job records 32 at a time, one per lane in one load (a run longer than that is cut); the
  // first load is in flight while before() (the table fill) runs.
  auto load = [&](int c) { return c + lane < wb ? __ldg(p.jobs + c + lane) : make_uint4(0u, 0u, kEmpty, 0u); };
  uint4 mine = load(wa);
  before();
  for (int c = wa; c < wb; c += 32) {
    if (c > wa) mine = load(c);
    const int n = min(32, wb - c);
    const uint32_t prev = __shfl_up_sync(kFull, mine.z, 1);
    uint32_t starts = __ballot_sync(kFull, lane < n && (lane == 0 || prev != mine.z));
    while (starts) {
      const int a = __ffs(starts) - 1;
      starts &= starts - 1;
      const int b = starts ? __ffs(starts) - 1 : n;
      const int units = (int)__reduce_add_sync(kFull, lane >= a && lane < b ? mine.w & 0xffff : 0u);
      const uint4 job = make_uint4(__shfl_sync(kFull, mine.x, a), __shfl_sync(kFull, mine.y, a),
                                   __shfl_sync(kFull, mine.z, a), __shfl_sync(kFull, mine.w, a));
      f(c + a, c + b, job, units);
    }
  }
}

// The decode path for up to 8 vectors and 128- or 64-row chunks (NS = 4, 2), every depth
// 1..8 (depth 0 has run_fast_loc): nearly every weight of a CVXQ layer with the default groups. A run of
// jobs is one stream of units (gpu_layout.hpp: contiguous payload and records). Per batch of
// 32 records (4 units at NS = 4) each lane loads one record and x at its column and makes x * scale
// once, in the forms the MMA's B operand takes (vector b in the low or high half: form
// 2 b + e); the lanes that feed a column read their form from shared memory, instead of
// every lane loading and converting its two records per unit. Loads run ahead: records two
// batches, x one batch, payload words D units. Units past the end of the run (up to 3, to
// finish the last batch) decode whatever words follow (the payload is padded,
// gpu_layout.hpp) against x * scale = 0 from their missing records, so they add exactly
// nothing and the loop needs no bounds checks.
constexpr int kXsStride = 36;  // words per form: forms 4 words apart in banks, no conflicts

// The fast kernel's table lives in static shared memory: its shared address is then a
// constant, and each lookup is shift, LOP3 and a load at register + immediate.
__shared__ __align__(128) uint32_t fast_table[kTableMax / 4];

// Payload and records are read once: loads that keep them out of L1, which then holds x
// (measured on an H200: 39.4 against 41.2 us on 8192 x 28672, 3 bits; even on 12288 x 49152).
__device__ __forceinline__ uint32_t stream_load(const uint32_t* a) {
  uint32_t v;
  asm("ld.global.nc.L1::no_allocate.b32 %0, [%1];" : "=r"(v) : "l"(a));
  return v;
}
__device__ __forceinline__ uint2 stream_load(const uint2* a) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.v2.b32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(a));
  return v;
}

template <int NB>
constexpr int xs_words() { return 2 * NB * kXsStride; }  // one warp's forms

__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint32_t lds16(uint32_t addr) {
  unsigned short v;
  asm volatile("ld.shared.u16 %0, [%1];" : "=h"(v) : "r"(addr));
  return v;
}

// The 4 A registers of MMA m of a unit from the table at shared address smb (lane4 = lane
// times 4): pair tables for depths 1..4, two single lookups for deeper ones.
template <int B>
__device__ __forceinline__ void decode_fast(const uint32_t (&w)[B], int m, uint32_t smb, uint32_t lane4,
                                            uint32_t (&a)[4]) {
#pragma unroll
  for (int f = 0; f < 4; ++f) {
    const int P = 2 * B * (4 * m + f);
    if constexpr (B <= gpu::kPairDepths) {
      a[f] = lds32(smb + and_or(shifted<B>(w, P, 2 * B, 7), ((1u << (2 * B)) - 1) << 7, lane4));
    } else {
      const uint32_t lane2 = lane4 >> 1, mask = ((1u << B) - 1) << 6;
      const uint32_t h0 = lds16(smb + and_or(shifted<B>(w, P, B, 6), mask, lane2));
      const uint32_t h1 = lds16(smb + and_or(shifted<B>(w, P + B, B, 6), mask, lane2));
      a[f] = __byte_perm(h0, h1, 0x5410);
    }
  }
}

// The fast kernel's runs add into a window of y in shared memory, rows [base, base + WR) of
// the block (base: its first job's rows; the rows of a segment grow along its jobs), one
// window per warp, so plain loads and stores; the block sums the windows and adds them to y
// once at its end. Runs past the window add to y directly. Measured on an H200 (3 bits,
// one vector): each run adding straight into y (atomics after a dependent load of perm)
// made 4096 x 4096 take 18.6 us; with the windows it takes 9.0 us, 12288 x 49152 87.6
// instead of 92.8. (A block-wide window with shared atomics, CAS loops on floats, was slower
// on the large layers; so was filling the table by cp.async while the first loads fly.)
template <int NB>
constexpr int win_rows() { return NB == 1 ? 512 : NB <= 4 ? 256 : 128; }  // 16..32 KB per block
// Floats per vector in a warp's window (WS). With per-warp windows (WB: the smaller layers,
// where runs are short and flushes frequent) one more than its rows, so that the lanes of
// one row group (g), which hold vectors t = 0..3, add into 4 different banks: with a stride
// of WR rows every load and store of a flush was a 4-way bank conflict (ncu on 4096 x 4096,
// 8 vectors: 36% of the kernel's shared-memory wavefronts). Measured on an H200 (8 vectors,
// 4 bits): 4096 x 4096 20.0 -> 19.3 us, 11008 x 4096 28.6 -> 27.9; the same padding in
// the block-window kernel (the large layers, few flushes) cost 12288 x 49152 167 -> 175 us.
template <int NB, bool WB>
constexpr int win_stride() { return win_rows<NB>() + (WB && NB > 1 ? 1 : 0); }

template <int NB, int NS, int WS, class V>
__device__ __forceinline__ void add_window(const TParams& p, float* __restrict__ y, float* win, int base, int b,
                                           int row0, int g, V&& value) {
  constexpr int WR = win_rows<NB>();
  if (row0 - base + 32 * NS > WR) {
    add_rows<NS>(p, y, b, row0, g, value);
    return;
  }
  float* w = win + b * WS + row0 - base + 4 * g;
  float v[NS][4];
#pragma unroll
  for (int s = 0; s < NS; ++s)
#pragma unroll
    for (int i = 0; i < 4; ++i) v[s][i] = w[s * 32 + i] + value(s, i);
#pragma unroll
  for (int s = 0; s < NS; ++s)
#pragma unroll
    for (int i = 0; i < 4; ++i) w[s * 32 + i] = v[s][i];
}

// The end of a fast-kernel run: loc * x of its columns (ls, per vector) summed over the
// warp, plus acc(nt, s, i) (the MMA sums; nullptr: none), added to each of its rows once.
template <int NB, int NS, int WS, class Acc>
__device__ __forceinline__ void flush_run(const TParams& p, float* __restrict__ y, float* win, int base, int row0,
                                          int nb, int lane, float (&ls)[NB], Acc&& acc) {
  constexpr int NT = NB > 4 ? 2 : 1;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int o = 16; o; o >>= 1)
#pragma unroll
    for (int b = 0; b < NB; ++b) ls[b] += __shfl_xor_sync(kFull, ls[b], o);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int b = t + 4 * nt;  // this lane's vector in D
    if (b >= nb) continue;
    float lsb = ls[0];
#pragma unroll
    for (int c = 1; c < NB; ++c) lsb = b == c ? ls[c] : lsb;
    add_window<NB, NS, WS>(p, y, win, base, b, row0, g, [&](int s, int i) {
      if constexpr (std::is_same_v<std::decay_t<Acc>, std::nullptr_t>) return lsb;
      else return acc(nt, s, i) + lsb;
    });
  }
}

// A run of the fast kernel in which some x * scale passed float16's largest value (so its
// MMAs summed inf), done again in float32 straight from global memory with the float32
// table (as the CPU and the dequantizer decode), then added as flush_run adds: slow, and
// only for such runs. Its own function (not inlined): the fast path's code and registers
// stay as they are.
template <int B, int NB, int NS, int WS>
__device__ __noinline__ void run_fp32(const uint32_t* __restrict__ payload, const uint2* __restrict__ records,
                                      const float* __restrict__ table, const int32_t* __restrict__ perm, int rows,
                                      int cols, const uint4 job, int U, const float* __restrict__ x, int nb,
                                      float* __restrict__ y, float* win, int base, int lane) {
  constexpr int NT = NB > 4 ? 2 : 1, BPU = 4 / NS;
  const int t = lane & 3;
  TParams p{};  // what flush_run reads (passing the kernel's parameters would copy them to the stack)
  p.perm = perm;
  p.rows = rows;
  p.cols = cols;
  p.records = records;
  p.payload = payload;
  const int R = 8 * BPU * U;  // column slots of the run
  float ls[NB];               // loc * x, summed as run_fast sums it
#pragma unroll
  for (int b = 0; b < NB; ++b) ls[b] = 0.f;
  for (int r = lane; r < R; r += 32) {
    const uint2 rc = __ldg(p.records + job.y + r);
    if (rc.x == kEmpty) continue;
#pragma unroll
    for (int b = 0; b < NB; ++b)
      if (b < nb) ls[b] = fmaf(__ldg(x + (size_t)b * p.cols + rc.x), h2f(rc.y >> 16), ls[b]);
  }
  float res[NT][NS][4];  // this lane's rows 32 s + 4 g + i of vector t + 4 nt, as the MMAs lay them
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    if (b >= nb) break;
    float sum[NS][4];  // the lane's columns (t, t + 4 of each block) only, then over the 4 lanes of g
#pragma unroll
    for (int s = 0; s < NS; ++s)
#pragma unroll
      for (int i = 0; i < 4; ++i) sum[s][i] = 0.f;
    for (int u = 0; u < U; ++u) {
      uint32_t w[B + 1];
#pragma unroll
      for (int q = 0; q <= B; ++q) w[q] = q < B ? __ldg(p.payload + job.x + (u * B + q) * 32 + lane) : 0u;
#pragma unroll
      for (int m = 0; m < 4; ++m)
#pragma unroll
        for (int f = 0; f < 4; ++f) {  // pair f of MMA m (gpu_layout.hpp)
          const int P = 2 * B * (4 * m + f), q = P >> 5, r = P & 31;
          const uint32_t val = (uint32_t)(((uint64_t)w[q] | (uint64_t)w[q + 1] << 32) >> r) & ((1u << (2 * B)) - 1);
          const uint2 rc = __ldg(p.records + job.y + (u * BPU + m / NS) * 8 + t + 4 * (f >> 1));
          if (rc.x == kEmpty) continue;
          const float xs = __ldg(x + (size_t)b * p.cols + rc.x) * h2f(rc.y & 0xffff);
          sum[m % NS][2 * (f & 1)] = fmaf(xs, __ldg(table + (val & ((1u << B) - 1))), sum[m % NS][2 * (f & 1)]);
          sum[m % NS][2 * (f & 1) + 1] = fmaf(xs, __ldg(table + (val >> B)), sum[m % NS][2 * (f & 1) + 1]);
        }
    }
#pragma unroll
    for (int s = 0; s < NS; ++s)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        sum[s][i] += __shfl_xor_sync(kFull, sum[s][i], 1);
        sum[s][i] += __shfl_xor_sync(kFull, sum[s][i], 2);
        if (t == (b & 3)) res[b >> 2][s][i] = sum[s][i];
      }
  }
  flush_run<NB, NS, WS>(p, y, win, base, (int)job.z, nb, lane, ls, [&](int nt, int s, int i) { return res[nt][s][i]; });
}

// NS = 4 (128-row chunks): a unit is one block of 8 columns x 4 slices, a batch of 32
// records 4 units. NS = 2 (64-row chunks): a unit is 2 blocks x 2 slices, a batch 2 units,
// and the loop runs two batches per turn so that the payload ring keeps compile-time slots.
template <int B, int NB, int NS, int WS>
__device__ void run_fast(const TParams& p, const uint4 job, int U, const float* __restrict__ x, int nb,
                         float* __restrict__ y, uint32_t* xsb, float* win, int base, int lane,
                         long long phase_c0 = 0) {
  static_assert(NS == 4 || NS == 2, "the fast kernel runs 4- and 2-slice chunks");
  constexpr int UB = NS, BPU = 4 / NS;  // units per batch, blocks per unit
  // Payload words load D units ahead. Measured on an H200 (12288 x 49152, 3 bits): D = 4
  // with 16 warps per SM beat D = 2 with 24 (98.8 against 102.6 us); an L2 prefetch 4 or 8
  // batches ahead gained nothing (100.4 us without, 114 us at 8).
  constexpr int D = 4;
  constexpr int NT = NB > 4 ? 2 : 1;
  const int g = lane >> 2, t = lane & 3, e = g & 1;
  // Opaque to the compiler, so that each lookup address stays one LOP3 (field & mask | lane4)
  // instead of re-deriving lane4's bits in every address.
  uint32_t lane4;
  asm("mov.b32 %0, %1;" : "=r"(lane4) : "r"((uint32_t)lane << 2));
  const uint32_t smb = (uint32_t)__cvta_generic_to_shared(fast_table);
  const uint32_t* __restrict__ pw = p.payload + job.x + lane;
  const uint2* __restrict__ rp = p.records + job.y + lane;
  const int R = 8 * BPU * U;
  const int nq = UB == 4 ? (U + 3) >> 2 : (U + 1) >> 1;
  const uint32_t* xs_read[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)  // vector g / 2 + 4 nt; lanes past NB read any form (unused)
    xs_read[nt] = xsb + (2 * min((g >> 1) + 4 * nt, NB - 1) + e) * kXsStride + t;

  float acc[NT][NS][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int s = 0; s < NS; ++s)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][s][i] = 0.f;
  float ls[NB];
#pragma unroll
  for (int b = 0; b < NB; ++b) ls[b] = 0.f;
  bool big = false;  // some x * scale past float16's range: the run is redone in float32

  auto load_rec = [&](int q) {
    return 32 * q + lane < R ? stream_load(rp + 32 * q) : make_uint2(kEmpty, 0u);
  };
  auto load_x = [&](const uint2 r, float (&xv)[NB]) {
#pragma unroll
    for (int b = 0; b < NB; ++b)
      xv[b] = (b == 0 || b < nb) && r.x != kEmpty ? __ldg(x + (size_t)b * p.cols + r.x) : 0.f;
  };
  uint32_t w[D][B];
#pragma unroll
  for (int k = 0; k < D; ++k)
#pragma unroll
    for (int i = 0; i < B; ++i) w[k][i] = stream_load(pw + (k * B + i) * 32);
  uint2 rq = load_rec(0), rn = load_rec(1);
  float xq[NB];
  load_x(rq, xq);
  // One batch; O: the payload ring slot of its first unit (compile time).
  auto batch = [&](int q, auto O) {
    const uint2 rnn = load_rec(q + 2);
    float xn[NB];
    load_x(rn, xn);
    {
      const float sc = h2f(rq.y & 0xffff), lc = h2f(rq.y >> 16);
      __syncwarp();  // everyone has read the previous batch's forms
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        const float v = xq[b] * sc;
        big = big || fabsf(v) > kHalfMax;
        xsb[(2 * b) * kXsStride + lane] = pack_h2(v, 0.f);
        xsb[(2 * b + 1) * kXsStride + lane] = pack_h2(0.f, v);
        ls[b] = fmaf(xq[b], lc, ls[b]);
      }
      __syncwarp();
#ifdef CVXQ_PHASES
      if (q == 0) {
        __syncwarp();
        PHASE(2);  // the first batch's records and x are here
      }
      if (q == 1) PHASE(3);  // the first batch computed (its MMAs issued)
#endif
    }
#pragma unroll
    for (int k = 0; k < UB; ++k) {
      constexpr int o = decltype(O)::value;
      uint32_t wc[B];
#pragma unroll
      for (int i = 0; i < B; ++i) {
        wc[i] = w[(o + k) % D][i];
        w[(o + k) % D][i] = stream_load(pw + ((k + D) * B + i) * 32);
      }
#pragma unroll
      for (int bk = 0; bk < BPU; ++bk) {
        uint32_t bf[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          bf[nt][0] = xs_read[nt][8 * (k * BPU + bk)];
          bf[nt][1] = xs_read[nt][8 * (k * BPU + bk) + 4];
        }
        uint32_t a[NS][4];
#pragma unroll
        for (int s = 0; s < NS; ++s) decode_fast<B>(wc, bk * NS + s, smb, lane4, a[s]);
#pragma unroll
        for (int s = 0; s < NS; ++s)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma16816(acc[nt][s], a[s], bf[nt][0], bf[nt][1]);
      }
    }
    pw += UB * B * 32;
    rq = rn;
    rn = rnn;
#pragma unroll
    for (int b = 0; b < NB; ++b) xq[b] = xn[b];
  };
  if constexpr (NS == 4) {
    for (int q = 0; q < nq; ++q) batch(q, std::integral_constant<int, 0>());
  } else {
    for (int q = 0; q < nq; q += 2) {
      batch(q, std::integral_constant<int, 0>());
      if (q + 1 < nq) batch(q + 1, std::integral_constant<int, 2>());
    }
  }

  // Rare: the default model stays 18x below it. The check costs the 1-4-vector kernels under
  // 1% and the 8-vector kernel 5-10% (the call's registers; measured on an H200).
  if (__any_sync(kFull, big)) {
    run_fp32<B, NB, NS, WS>(p.payload, p.records, p.table + table_offset(B), p.perm, p.rows, p.cols, job, U, x, nb, y,
                            win, base, lane);
    return;
  }
  flush_run<NB, NS, WS>(p, y, win, base, (int)job.z, nb, lane, ls, [&](int nt, int s, int i) { return acc[nt][s][i]; });
}

// Segment of this block and its item's jobs [j0, j1).
__device__ __forceinline__ int block_segment(const TParams& p, int& j0, int& j1) {
  int s = 0;
  while (s < 26 && (int)blockIdx.x >= p.item_end[s]) ++s;
  const int item = (int)blockIdx.x - (s ? p.item_end[s - 1] : 0);
  j0 = p.seg_begin[s] + item * p.item_jobs[s];
  j1 = min(j0 + p.item_jobs[s], p.seg_begin[s + 1]);
  return s;
}

template <int B, int NS, int NT>
__device__ void run_item(const TParams& p, int j0, int j1, const float* x, int nb, float* y, char* sm) {
  const int lane = threadIdx.x & 31;
  for_each_run(
      p, j0, j1, [&] { fill_table<B>(p, sm, reinterpret_cast<uint32_t*>(sm + kTableMax)); },
      [&](int ja, int jb, const uint4&, int) { run_rows<B, NS, NT>(p, ja, jb, x, nb, y, sm, lane); });
}

template <int B, int NT>
__device__ void run_depth(const TParams& p, int ni, int j0, int j1, const float* x, int nb, float* y, char* sm) {
  switch (ni) {
    case 0: run_item<B, 4, NT>(p, j0, j1, x, nb, y, sm); break;
    case 1: run_item<B, 2, NT>(p, j0, j1, x, nb, y, sm); break;
    default: run_item<B, 1, NT>(p, j0, j1, x, nb, y, sm); break;
  }
}

// Every segment, any batch of up to 4 NT vectors.
template <int NT>
__global__ void __launch_bounds__(kWarps * 32, 2) tiled_matmul_kernel(TParams p, const float* __restrict__ x, int nb,
                                                                    float* __restrict__ y) {
  extern __shared__ __align__(16) char sm[];
  int j0, j1;
  const int s = block_segment(p, j0, j1);
  const int d = s / 3, ni = s % 3;
  switch (d) {
    case 0: run_depth<0, NT>(p, ni, j0, j1, x, nb, y, sm); break;
    case 1: run_depth<1, NT>(p, ni, j0, j1, x, nb, y, sm); break;
    case 2: run_depth<2, NT>(p, ni, j0, j1, x, nb, y, sm); break;
    case 3: run_depth<3, NT>(p, ni, j0, j1, x, nb, y, sm); break;
    case 4: run_depth<4, NT>(p, ni, j0, j1, x, nb, y, sm); break;
    case 5: run_depth<5, NT>(p, ni, j0, j1, x, nb, y, sm); break;
    case 6: run_depth<6, NT>(p, ni, j0, j1, x, nb, y, sm); break;
    case 7: run_depth<7, NT>(p, ni, j0, j1, x, nb, y, sm); break;
    default: run_depth<8, NT>(p, ni, j0, j1, x, nb, y, sm); break;
  }
}

// Depth-0 columns of 128- or 64-row chunks: each weight of column c in the chunk is
// loc + scale * T0[0], so a run adds sum_c x[c] (loc + scale * T0[0]) to each of its rows:
// records and x only, no payload, no MMA. (Real layers have a few percent of such groups,
// mostly in attention projections; in the general kernel they cost a second launch.)
template <int NB, int NS, int WS>
__device__ void run_fast_loc(const TParams& p, const uint4 job, int U, const float* __restrict__ x, int nb,
                             float* __restrict__ y, float* win, int base, int lane) {
  const float t0 = __ldg(p.table);
  const uint2* __restrict__ rp = p.records + job.y + lane;
  const int R = 8 * U;  // depth 0: a unit is one block of 8 columns at any NS (gpu_layout)
  float ls[NB];
#pragma unroll
  for (int b = 0; b < NB; ++b) ls[b] = 0.f;
  auto load_rec = [&](int r) { return r + lane < R ? stream_load(rp + r) : make_uint2(kEmpty, 0u); };
  uint2 rn = load_rec(0);
  for (int r = 0; r < R; r += 32) {
    const uint2 rc = rn;
    rn = load_rec(r + 32);
    if (rc.x != kEmpty) {
      const float l = h2f(rc.y >> 16) + h2f(rc.y & 0xffff) * t0;
#pragma unroll
      for (int b = 0; b < NB; ++b)
        if (b == 0 || b < nb) ls[b] = fmaf(__ldg(x + (size_t)b * p.cols + rc.x), l, ls[b]);
    }
  }
  flush_run<NB, NS, WS>(p, y, win, base, (int)job.z, nb, lane, ls, nullptr);
}

template <int B, int NB, int NS, bool WB>
__device__ void run_fast_item(const TParams& p, int j0, int j1, const float* x, int nb, float* y, char* dyn) {
#ifdef CVXQ_PHASES
  const long long phase_c0 = clock64();
  PHASE(0);
  if ((threadIdx.x & 31) == 0 && blockIdx.x * kWarps + (threadIdx.x >> 5) < kPhaseWarps) {
    unsigned smid;
    asm("mov.u32 %0, %smid;" : "=r"(smid));
    g_phases[blockIdx.x * kWarps + (threadIdx.x >> 5)][8] = B;
    g_phases[blockIdx.x * kWarps + (threadIdx.x >> 5)][9] = smid;
  }
  int phase_units = 0, phase_runs = 0;
#else
  constexpr long long phase_c0 = 0;
#endif
  constexpr int WR = win_rows<NB>(), PER = (WR + kWarps * 32 - 1) / (kWarps * 32);
  // WB (5-8 vectors on smaller layers, launch_fast): each warp's window starts at its own
  // first row chunk (wbase), not the block's: at 128 rows a window holds one chunk, and the block's later chunks had 17-48%
  // of the units of Llama-sized layers adding straight into y (simulated on the job lists;
  // 4 vectors with such windows took 35% longer on an H200). The block end then sums over
  // [base, base + span): every warp's window is in it. Measured on an H200 (8 vectors,
  // same run): 11008 x 4096 34.8 -> 26.3 us at 3 bits; but 8192 x 28672 63.3 -> 66.0 and
  // 12288 x 49152 at 4 bits 166.9 -> 182.2 (neutral at 3 bits), hence the choice by size.
  constexpr int PER_END = WB ? 2 : PER;  // rows per thread preloaded for the end
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t* xsb = reinterpret_cast<uint32_t*>(dyn) + warp * xs_words<NB>();
  float* const wins = reinterpret_cast<float*>(dyn) + kWarps * xs_words<NB>();
  constexpr int WS = win_stride<NB, WB>();
  float* const win = wins + warp * NB * WS;  // this warp's
  const int base = (int)__ldg(&p.jobs[j0].z);
  __shared__ int wbases[kWarps];
  int wbase = base;
  if constexpr (WB) {
    const int wa = j0 + (j1 - j0) * warp / kWarps, wb = j0 + (j1 - j0) * (warp + 1) / kWarps;
    if (wa < wb) wbase = (int)__ldg(&p.jobs[wa].z);
    if (lane == 0) wbases[warp] = wbase;
  }
  int orig[PER_END];  // output rows of this thread's window rows
  int span = WR;      // rows [base, base + span) hold every window
  auto orig_row = [&](int r) {
    const int row = base + r;
    return r < span && row < p.rows ? (p.perm ? __ldg(p.perm + row) : row) : -1;
  };
  auto load_orig = [&] {
    if constexpr (WB) span = (int)__ldg(&p.jobs[j1 - 1].z) - base + WR;  // >= the last wbase's
#pragma unroll
    for (int k = 0; k < PER_END; ++k) orig[k] = orig_row(threadIdx.x + k * kWarps * 32);
  };
  for_each_run(
      p, j0, j1,
      [&] {
        for (int i = lane; i < NB * WS; i += 32) win[i] = 0.f;
        __syncwarp();
        // ends in __syncthreads (B > 0); the forms' memory (dyn) is free until the runs start
        fill_table<B>(p, reinterpret_cast<char*>(fast_table), reinterpret_cast<uint32_t*>(dyn));
        PHASE(1);
        // Output rows of the windows, for the end: loaded here, off the end's critical path,
        // and not before the table fill, whose loads would then wait out base's load (8
        // vectors: no registers to spare, loaded at the end).
        if constexpr (NB <= 4) load_orig();
      },
      [&](int, int, const uint4& job, int units) {
#ifdef CVXQ_PHASES
        phase_units += units;
        phase_runs += 1;
#endif
        if constexpr (B == 0) run_fast_loc<NB, NS, WS>(p, job, units, x, nb, y, win, wbase, lane);
        else run_fast<B, NB, NS, WS>(p, job, units, x, nb, y, xsb, win, wbase, lane, phase_c0);
      });
  PHASE(4);
  if constexpr (NB > 4) load_orig();
  __syncthreads();
  PHASE(5);
  if constexpr (WB) {
    int off[kWarps];  // each warp's window start in the block's rows
#pragma unroll
    for (int w = 0; w < kWarps; ++w) off[w] = wbases[w] - base;
    for (int k = 0; k * kWarps * 32 < span; ++k) {  // more than PER_END: rare, perm not preloaded
      const int r = threadIdx.x + k * kWarps * 32;
      int o = -1;
#pragma unroll
      for (int i = 0; i < PER_END; ++i) o = k == i ? orig[i] : o;
      if (k >= PER_END) o = orig_row(r);
      if (o < 0) continue;
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        if (b >= nb) continue;
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w)
          if ((unsigned)(r - off[w]) < (unsigned)WR) v += wins[(w * NB + b) * WS + r - off[w]];
        if (v != 0.f) atomicAdd(y + (int64_t)b * p.rows + o, v);
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < PER; ++k)
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        if (orig[k] < 0 || b >= nb) continue;
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) v += wins[(w * NB + b) * WS + threadIdx.x + k * kWarps * 32];
        if (v != 0.f) atomicAdd(y + (int64_t)b * p.rows + orig[k], v);
      }
  }
  PHASE(6);
  PHASE(7);
#ifdef CVXQ_PHASES
  if ((threadIdx.x & 31) == 0 && blockIdx.x * kWarps + (threadIdx.x >> 5) < kPhaseWarps) {
    g_phases[blockIdx.x * kWarps + (threadIdx.x >> 5)][10] = phase_units;
    g_phases[blockIdx.x * kWarps + (threadIdx.x >> 5)][11] = phase_runs;
  }
#endif
}

// Segments of NS-slice chunks (depth 0..8; NS = 4 or 2) for up to NB vectors: its own
// kernel, so that its smaller register footprint buys more resident warps (and one per NS,
// so that the 64-row path cannot cost the 128-row one registers). Dynamic shared memory: the
// warps' x * scale forms and y windows. WB: each warp's y window starts at its own first row
// chunk (run_fast_item).
template <int NB, int NS, bool WB>
__global__ void __launch_bounds__(kWarps * 32, 2)
    tiled_fast_kernel(TParams p, const float* __restrict__ x, int nb, float* __restrict__ y) {
  extern __shared__ __align__(16) char dyn[];
  int j0, j1;
  switch (block_segment(p, j0, j1) / 3) {
    case 0: run_fast_item<0, NB, NS, WB>(p, j0, j1, x, nb, y, dyn); break;
    case 1: run_fast_item<1, NB, NS, WB>(p, j0, j1, x, nb, y, dyn); break;
    case 2: run_fast_item<2, NB, NS, WB>(p, j0, j1, x, nb, y, dyn); break;
    case 3: run_fast_item<3, NB, NS, WB>(p, j0, j1, x, nb, y, dyn); break;
    case 4: run_fast_item<4, NB, NS, WB>(p, j0, j1, x, nb, y, dyn); break;
    case 5: run_fast_item<5, NB, NS, WB>(p, j0, j1, x, nb, y, dyn); break;
    case 6: run_fast_item<6, NB, NS, WB>(p, j0, j1, x, nb, y, dyn); break;
    case 7: run_fast_item<7, NB, NS, WB>(p, j0, j1, x, nb, y, dyn); break;
    default: run_fast_item<8, NB, NS, WB>(p, j0, j1, x, nb, y, dyn); break;
  }
}

// Segment s = 3 d + i holds chunks of NS = 4 >> i slices: the fast kernel runs i = 0 (128
// rows) and i = 1 (64 rows), depth 0..8.
constexpr bool fast_segment(int s) { return s % 3 != 2; }
constexpr int ns_index(int ns) { return ns == 4 ? 0 : ns == 2 ? 1 : 2; }  // the i of NS

// Dense W from the tiling: one warp per job, values loc + scale * T[k] with the float32
// table, rounded as the CPU rounds them (no fused multiply-add).
template <bool Half>
__global__ void __launch_bounds__(kWarps * 32) tiled_dequantize_kernel(TParams p, void* out) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int warps = gridDim.x * kWarps;
  const int n_jobs = p.seg_begin[27];
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
  for (int i = 0; i < 28; ++i) p.seg_begin[i] = (int)L.seg_begin[i];
  return p;
}

template <class K>
int resident_blocks(K kernel, int smem) {
  int dev = 0, sms = 1, per_sm = 1;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWarps * 32, smem),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  return sms * std::max(per_sm, 1);
}

// Relative time of a job of depth d (a few units), counted in L1 data-pipe wavefronts per
// unit, the busiest unit of the product (Nsight Compute on an H200, 12288 x 49152, 3 bits:
// 69%; issue slots and the ALU pipe are close behind, bench/results/gpu_profile_h200.txt):
// 16 table lookups at depths 1..4 (pair tables), 32 at depths 5..8 (two single lookups per
// pair), plus d payload words and ~5 for records, x and forms. Depth 0 reads records and x
// only.
// Measured on an H200 (same run, equal job counts before): 12288 x 49152 at 4 bits (a
// quarter of groups at depth 5) 141.6 -> 112.1 us, 8192 x 28672 57.4 -> 47.9 us.
constexpr int job_cost(int d) { return d == 0 ? 3 : d <= gpu::kPairDepths ? 21 + d : 37 + d; }

// Cuts the segments that `take` selects into one wave of blocks: each segment gets blocks in
// proportion to its jobs' cost (job_cost; at least one block), and each block an equal share
// of that segment's jobs; returns the number of blocks (0: nothing to do). Jobs are small (a
// few units), so the shares come out even.
template <class Take>
int plan_items(TParams& p, int resident, Take take) {
  int64_t total = 0;
  for (int s = 0; s < 27; ++s)
    if (take(s)) total += (int64_t)(p.seg_begin[s + 1] - p.seg_begin[s]) * job_cost(s / 3);
  int blocks = 0;
  for (int s = 0; s < 27; ++s) {
    const int n = take(s) ? p.seg_begin[s + 1] - p.seg_begin[s] : 0;
    if (n > 0) {
      const int want = std::max(1, (int)((int64_t)resident * n * job_cost(s / 3) / total));
      p.item_jobs[s] = (n + want - 1) / want;
      blocks += (n + p.item_jobs[s] - 1) / p.item_jobs[s];
    } else {
      p.item_jobs[s] = 1;
    }
    p.item_end[s] = blocks;
  }
  return blocks;
}

// A kernel's launch settings on the current device, found on its first launch there:
// cudaFuncSetAttribute applies to the current device only, and the occupancy depends on the
// device. compute() is idempotent, so two threads racing on a first launch is harmless.
constexpr int kMaxDevices = 64;
template <class F>
int per_device(std::atomic<int> (&cache)[kMaxDevices], F&& compute) {
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 0 || dev >= kMaxDevices) return compute();
  int v = cache[dev].load(std::memory_order_acquire);
  if (v == 0) {
    v = compute();
    cache[dev].store(v, std::memory_order_release);
  }
  return v;
}

template <int NT>
void launch_general(TParams p, const float* x, int nb, float* y, bool skip_fast, cudaStream_t st) {
  static std::atomic<int> cache[kMaxDevices];
  constexpr int smem = kTableMax + 1024;  // the table, then its fill's stage
  const int resident = per_device(cache, [] { return resident_blocks(tiled_matmul_kernel<NT>, smem); });
  const int blocks = plan_items(p, resident, [&](int s) { return !(skip_fast && fast_segment(s)); });
  if (blocks == 0) return;
  tiled_matmul_kernel<NT><<<blocks, kWarps * 32, smem, st>>>(p, x, nb, y);
  check(cudaGetLastError(), "tiled matmul kernel launch");
}

template <int NB, int NS, bool WB>
void launch_fast_kernel(TParams p, const float* x, int nb, float* y, cudaStream_t st) {
  constexpr int smem = kWarps * (xs_words<NB>() + NB * win_stride<NB, WB>()) * 4;
  static std::atomic<int> cache[kMaxDevices];
  const int resident = per_device(cache, [] {
    // static table + dynamic forms pass the default 48 KB per block
    check(cudaFuncSetAttribute(tiled_fast_kernel<NB, NS, WB>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
          "cudaFuncSetAttribute");
    return resident_blocks(tiled_fast_kernel<NB, NS, WB>, smem);
  });
  const int blocks = plan_items(p, resident, [](int s) { return s % 3 == ns_index(NS); });
  if (blocks == 0) return;
  tiled_fast_kernel<NB, NS, WB><<<blocks, kWarps * 32, smem, st>>>(p, x, nb, y);
  check(cudaGetLastError(), "tiled matmul kernel launch");
}

// Layers with up to this many jobs of the launch's chunk size (128-row jobs: about 4 units
// of 1024 weights each) take per-warp y windows for 8 vectors: on an H200 they took
// 11008 x 4096 (11K jobs) from 34.8 to 26.3 us, while 8192 x 28672 (57K jobs) went
// 63.3 -> 66.0 and 12288 x 49152 at 4 bits 166.9 -> 182.2 us.
std::atomic<int64_t> g_warp_windows_max_jobs{25000};

template <int NB, int NS>
void launch_fast(TParams p, const float* x, int nb, float* y, cudaStream_t st) {
  if constexpr (NB > 4) {
    int64_t jobs = 0;
    for (int s = ns_index(NS); s < 27; s += 3) jobs += p.seg_begin[s + 1] - p.seg_begin[s];
    if (jobs <= g_warp_windows_max_jobs.load(std::memory_order_relaxed)) {
      launch_fast_kernel<NB, NS, true>(p, x, nb, y, st);
      return;
    }
  }
  launch_fast_kernel<NB, NS, false>(p, x, nb, y, st);
}

// The fast kernels for 128- and 64-row chunks (each launched only where the layer has them).
void launch_fast_any(const TParams& p, const float* x, int nb, float* y, cudaStream_t st) {
  if (nb == 1) launch_fast<1, 4>(p, x, nb, y, st), launch_fast<1, 2>(p, x, nb, y, st);
  else if (nb == 2) launch_fast<2, 4>(p, x, nb, y, st), launch_fast<2, 2>(p, x, nb, y, st);
  else if (nb <= 4) launch_fast<4, 4>(p, x, nb, y, st), launch_fast<4, 2>(p, x, nb, y, st);
  else launch_fast<8, 4>(p, x, nb, y, st), launch_fast<8, 2>(p, x, nb, y, st);
}

// The fast kernels for their segments (128- and 64-row chunks), the general one for the rest
// (32-row chunks; not launched for layers with 64- or 128-row groups). 9..16 vectors: the
// fast kernel per 8 of them and the general kernel once for all; measured on an H200 (3 bits, 16
// vectors), the fast kernel twice took 12288 x 49152 310 us and 4096 x 4096 41 us where the
// general kernel took 447 and 76 us. (The general kernel itself runs 16 at once: on 64-row
// groups, before they had the fast kernel, once on 16 beat twice on 8, 466 against 653 us.)
void launch_tiled(const DeviceTiled& L, const float* x, int nb, float* y, cudaStream_t st) {
  const TParams p = make_tparams(L);
  if (nb > 8) {
    launch_fast_any(p, x, 8, y, st);
    launch_fast_any(p, x + 8 * (int64_t)L.cols, nb - 8, y + 8 * (int64_t)L.rows, st);
    launch_general<4>(p, x, nb, y, true, st);
    return;
  }
  launch_fast_any(p, x, nb, y, st);
  if (nb <= 4) launch_general<1>(p, x, nb, y, true, st);
  else launch_general<2>(p, x, nb, y, true, st);
}

}  // namespace

int64_t set_warp_windows_max_jobs(int64_t jobs) { return g_warp_windows_max_jobs.exchange(jobs); }

void tiled_matmul(const DeviceTiled& L, const float* x, int64_t n, float* y, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  for (int64_t b0 = 0; b0 < n; b0 += 16) {
    const int nb = (int)std::min<int64_t>(16, n - b0);
    const float* xb = x + b0 * L.cols;
    float* yb = y + b0 * L.rows;
    launch_tiled(L, xb, nb, yb, st);
  }
}

#ifdef CVXQ_PHASES
void debug_phases(uint64_t* out, bool reset) {
  check(cudaMemcpyFromSymbol(out, g_phases, sizeof(g_phases)), "phases");
  if (reset) {
    static unsigned long long zero[kPhaseWarps][kPhases];
    check(cudaMemcpyToSymbol(g_phases, zero, sizeof(zero)), "phases");
  }
}
#endif

void tiled_dequantize(const DeviceTiled& L, void* out, bool half_out, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const TParams p = make_tparams(L);
  const int n_jobs = p.seg_begin[27];
  if (n_jobs == 0) return;
  const int blocks = std::min((n_jobs + kWarps - 1) / kWarps, 4096);
  if (half_out) tiled_dequantize_kernel<true><<<blocks, kWarps * 32, 0, st>>>(p, out);
  else tiled_dequantize_kernel<false><<<blocks, kWarps * 32, 0, st>>>(p, out);
  check(cudaGetLastError(), "tiled dequantize kernel launch");
}

}  // namespace cuda
}  // namespace cvxq
