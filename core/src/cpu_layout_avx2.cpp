// AVX2 + FMA + F16C kernels for the CPU tiling (cpu_layout.hpp); compiled with -mavx2
// -mfma -mf16c and called only when cvxq::active_isa() says the CPU has them.
//
// One step handles 8 rows (one ymm lane each) of one slot: vpermps looks the index up in a
// table register, vpsrld moves the next index into the low bits, and one FMA per vector
// adds T[k] * (scale * x) into the rows' accumulators. RB row blocks (of a 32-row slice)
// and NV vectors are done together so that at least 4 independent FMA chains are in flight.
#include <immintrin.h>

#include <cstdint>

#include "cvxq/cpu_layout.hpp"

// The depth-0 weight loc + scale * T0 must round like the scalar expression (no FMA).
#pragma GCC optimize("fp-contract=off")

#ifdef __AVX2__

namespace cvxq::cpu::detail {
namespace {

// Table registers of one depth <= 4 (loaded per run, so that only these are live): depths
// 1 and 2 repeated to 8 entries (vpermps reads 3 bits; the one or two above the index
// belong to the next index).
template <int B>
struct Table {
  __m256 lo, hi;
  explicit Table(const float* table) {
    const float* t = table + table_offset(B);
    if constexpr (B == 1) lo = _mm256_setr_ps(t[0], t[1], t[0], t[1], t[0], t[1], t[0], t[1]);
    if constexpr (B == 2) lo = _mm256_setr_ps(t[0], t[1], t[2], t[3], t[0], t[1], t[2], t[3]);
    if constexpr (B >= 3) lo = _mm256_loadu_ps(t);
    if constexpr (B == 4) hi = _mm256_loadu_ps(t + 8);
  }
  __m256 operator()(__m256i w) const {
    if constexpr (B <= 3) {
      return _mm256_permutevar8x32_ps(lo, w);
    } else {
      // Bit 3 of the index selects the upper half: moved to the sign bit for blendv.
      const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(w, 28));
      return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, w), _mm256_permutevar8x32_ps(hi, w),
                              upper);
    }
  }
};

// A run of depth B <= 4: n lines. Returns the next line.
template <int B, int XS, int RB, int NV>
inline const uint32_t* run_small(const uint32_t* w, const float*& xs, int64_t n,
                                 const float* table, __m256 (&acc)[RB][NV]) {
  constexpr int P = per_word(B);
  if (n == 0) return w;
  const Table<B> lookup(table);
  const float* x = xs;
  for (; n > 0; --n, w += kLineRows, x += P * XS) {
    __m256i W[RB];
    for (int q = 0; q < RB; ++q) W[q] = _mm256_loadu_si256((const __m256i*)(w + 8 * q));
#pragma GCC unroll 32
    for (int i = 0; i < P; ++i) {
      __m256 val[RB];
      for (int q = 0; q < RB; ++q) {
        val[q] = lookup(W[q]);
        W[q] = _mm256_srli_epi32(W[q], B);
      }
      for (int v = 0; v < NV; ++v) {
        const __m256 xb = _mm256_broadcast_ss(x + i * XS + v);
        for (int q = 0; q < RB; ++q) acc[q][v] = _mm256_fmadd_ps(val[q], xb, acc[q][v]);
      }
    }
  }
  xs = x;
  return w;
}

// A run of depth 5..8: gathers from the table.
template <int XS, int RB, int NV>
inline const uint32_t* run_gather(int B, const uint32_t* w, const float*& xs, int64_t n,
                                  const float* T, __m256 (&acc)[RB][NV]) {
  const int P = per_word(B);
  const __m256i mask = _mm256_set1_epi32((1 << B) - 1);
  const __m128i shift = _mm_cvtsi32_si128(B);
  const float* x = xs;
  for (; n > 0; --n, w += kLineRows, x += P * XS) {
    __m256i W[RB];
    for (int q = 0; q < RB; ++q) W[q] = _mm256_loadu_si256((const __m256i*)(w + 8 * q));
    for (int i = 0; i < P; ++i) {
      __m256 val[RB];
      for (int q = 0; q < RB; ++q) {
        val[q] = _mm256_i32gather_ps(T, _mm256_and_si256(W[q], mask), 4);
        W[q] = _mm256_srl_epi32(W[q], shift);
      }
      for (int v = 0; v < NV; ++v) {
        const __m256 xb = _mm256_broadcast_ss(x + i * XS + v);
        for (int q = 0; q < RB; ++q) acc[q][v] = _mm256_fmadd_ps(val[q], xb, acc[q][v]);
      }
    }
  }
  xs = x;
  return w;
}

// Vectors [V0, V0 + NV) of the XS in xs.
template <int RB, int NV, int XS = NV, int V0 = 0>
void slices(const CpuLayout& L, int64_t c, int64_t s0, int64_t s1, const float* xs, float* acc,
            int64_t stride) {
  xs += V0;
  acc += V0 * stride;
  const float* T = L.table.data();
  const int64_t* run = L.run.data() + 10 * c;
  int64_t n[9];
  for (int B = 1; B <= 8; ++B) n[B] = (run[B + 1] - run[B]) / per_word(B);
  const int64_t lines = L.line_count[(size_t)c];
  for (int64_t s = s0; s < s1; ++s) {
    const uint32_t* base = L.words.data() + L.word_off[(size_t)c] + s * lines * kLineRows;
    for (int q0 = 0; q0 < kLineRows / 8; q0 += RB) {
      __m256 a[RB][NV];
      for (int q = 0; q < RB; ++q)
        for (int v = 0; v < NV; ++v) a[q][v] = _mm256_setzero_ps();
      const uint32_t* w = base + 8 * q0;
      const float* x = xs;
      w = run_small<1, XS>(w, x, n[1], T, a);
      w = run_small<2, XS>(w, x, n[2], T, a);
      w = run_small<3, XS>(w, x, n[3], T, a);
      w = run_small<4, XS>(w, x, n[4], T, a);
      for (int B = 5; B <= 8; ++B) w = run_gather<XS>(B, w, x, n[B], T + table_offset(B), a);
      float* out = acc + (s - s0) * kLineRows + 8 * q0;
      for (int q = 0; q < RB; ++q)
        for (int v = 0; v < NV; ++v) _mm256_storeu_ps(out + v * stride + 8 * q, a[q][v]);
    }
  }
}

}  // namespace

namespace {

// Several vectors: xt holds x transposed, 8 floats per column (vectors nv..7 zero), so a
// slot's values for all vectors are one load.
void prepare_many(const CpuLayout& L, int64_t c, const float* xt, int nv, float* xs, double* cst) {
  const int64_t* run = L.run.data() + 10 * c;
  const float t0 = L.table[0];
  __m256d c_lo = _mm256_setzero_pd(), c_hi = _mm256_setzero_pd();
  for (int64_t sl = run[0]; sl < run[1]; ++sl) {  // depth 0: the whole weight is constant
    const uint32_t p = L.sl[(size_t)sl];
    const float l = half_to_float((uint16_t)(p >> 16)), sc = half_to_float((uint16_t)(p & 0xffffu));
    const __m256d w = _mm256_set1_pd((double)(l + sc * t0));
    const __m256 xv = _mm256_loadu_ps(xt + 8 * (size_t)L.col[(size_t)sl]);
    c_lo = _mm256_fmadd_pd(w, _mm256_cvtps_pd(_mm256_castps256_ps128(xv)), c_lo);
    c_hi = _mm256_fmadd_pd(w, _mm256_cvtps_pd(_mm256_extractf128_ps(xv, 1)), c_hi);
  }
  const int64_t first = run[1], end = run[9];
  for (int64_t sl = first; sl < end; ++sl) {
    const uint32_t p = L.sl[(size_t)sl];
    const __m128 h = _mm_cvtph_ps(_mm_cvtsi32_si128((int)p));  // scale, loc
    const __m256 scale = _mm256_broadcastss_ps(h);
    const __m256d loc = _mm256_broadcastsd_pd(_mm_cvtps_pd(_mm_movehdup_ps(h)));
    const __m256 xv = _mm256_loadu_ps(xt + 8 * (size_t)L.col[(size_t)sl]);
    // 8 lanes written, nv kept: the next slot overwrites the rest (xs has 8 floats slack).
    _mm256_storeu_ps(xs + (sl - first) * nv, _mm256_mul_ps(xv, scale));
    c_lo = _mm256_fmadd_pd(loc, _mm256_cvtps_pd(_mm256_castps256_ps128(xv)), c_lo);
    c_hi = _mm256_fmadd_pd(loc, _mm256_cvtps_pd(_mm256_extractf128_ps(xv, 1)), c_hi);
  }
  alignas(32) double d[8];
  _mm256_store_pd(d, c_lo);
  _mm256_store_pd(d + 4, c_hi);
  for (int v = 0; v < nv; ++v) cst[v] = d[v];
}

}  // namespace

void prepare_avx2(const CpuLayout& L, int64_t c, const float* x, int64_t x_stride, int nv,
                  const float* xt, float* xs, double* cst) {
  if (nv > 1) return prepare_many(L, c, xt, nv, xs, cst);
  const int64_t* run = L.run.data() + 10 * c;
  const float t0 = L.table[0];
  double c0[8];
  for (int v = 0; v < nv; ++v) c0[v] = 0;
  for (int64_t sl = run[0]; sl < run[1]; ++sl) {  // depth 0: the whole weight is constant
    const uint32_t p = L.sl[(size_t)sl];
    const float l = half_to_float((uint16_t)(p >> 16)), sc = half_to_float((uint16_t)(p & 0xffffu));
    const float w = l + sc * t0;
    for (int v = 0; v < nv; ++v) c0[v] += (double)w * x[v * x_stride + L.col[(size_t)sl]];
  }
  // Slots of depths 1..8 come in multiples of 4 or more per run, but the total need not be
  // a multiple of 8: the tail goes through a scalar loop.
  const int64_t first = run[1], end = run[9];
  __m256d cacc[8];
  for (int v = 0; v < nv; ++v) cacc[v] = _mm256_setzero_pd();
  const __m256i lo16 = _mm256_set1_epi32(0xffff);
  int64_t sl = first;
  alignas(32) float tmp[8];
  for (; sl + 8 <= end; sl += 8) {
    const __m256i col = _mm256_loadu_si256((const __m256i*)(L.col.data() + sl));
    const __m256i p = _mm256_loadu_si256((const __m256i*)(L.sl.data() + sl));
    // [scale 0..3, loc 0..3 | scale 4..7, loc 4..7] as 16-bit -> [scales | locs].
    const __m256i packed = _mm256_permute4x64_epi64(
        _mm256_packus_epi32(_mm256_and_si256(p, lo16), _mm256_srli_epi32(p, 16)), 0xD8);
    const __m256 scale = _mm256_cvtph_ps(_mm256_castsi256_si128(packed));
    const __m256 loc = _mm256_cvtph_ps(_mm256_extracti128_si256(packed, 1));
    const __m256d loc_lo = _mm256_cvtps_pd(_mm256_castps256_ps128(loc));
    const __m256d loc_hi = _mm256_cvtps_pd(_mm256_extractf128_ps(loc, 1));
    for (int v = 0; v < nv; ++v) {
      const __m256 xv = _mm256_i32gather_ps(x + v * x_stride, col, 4);
      const __m256 prod = _mm256_mul_ps(xv, scale);
      cacc[v] = _mm256_fmadd_pd(loc_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(xv)), cacc[v]);
      cacc[v] = _mm256_fmadd_pd(loc_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(xv, 1)), cacc[v]);
      if (nv == 1) {
        _mm256_storeu_ps(xs + (sl - first), prod);
      } else {
        _mm256_store_ps(tmp, prod);
        for (int k = 0; k < 8; ++k) xs[(sl - first + k) * nv + v] = tmp[k];
      }
    }
  }
  for (; sl < end; ++sl) {
    const uint32_t p = L.sl[(size_t)sl];
    const float l = half_to_float((uint16_t)(p >> 16)), sc = half_to_float((uint16_t)(p & 0xffffu));
    for (int v = 0; v < nv; ++v) {
      const float xv = x[v * x_stride + L.col[(size_t)sl]];
      xs[(sl - first) * nv + v] = xv * sc;
      c0[v] += (double)l * xv;
    }
  }
  for (int v = 0; v < nv; ++v) {
    alignas(32) double d[4];
    _mm256_store_pd(d, cacc[v]);
    cst[v] = c0[v] + ((d[0] + d[1]) + (d[2] + d[3]));
  }
}

void slices_avx2(const CpuLayout& L, int64_t c, int64_t s0, int64_t s1, const float* xs, int nv,
                 float* acc, int64_t stride) {
  switch (nv) {
    case 1: return slices<4, 1>(L, c, s0, s1, xs, acc, stride);
    case 2: return slices<2, 2>(L, c, s0, s1, xs, acc, stride);
    case 3: return slices<2, 3>(L, c, s0, s1, xs, acc, stride);
    case 4: return slices<2, 4>(L, c, s0, s1, xs, acc, stride);
    case 5: return slices<1, 5>(L, c, s0, s1, xs, acc, stride);
    case 6: return slices<1, 6>(L, c, s0, s1, xs, acc, stride);
    case 7: return slices<1, 7>(L, c, s0, s1, xs, acc, stride);
    default:
      return slices<1, 8>(L, c, s0, s1, xs, acc, stride);
  }
}

}  // namespace cvxq::cpu::detail

#endif  // __AVX2__
