// AVX2 search error of quantize.cpp (search_err_scalar's contract): 8 weights per vector.
// The level of a weight is the count of thresholds below it: up to 4 bits a compare per
// threshold against broadcast registers and a permute for the level; beyond, a branch-free
// binary search with gathers. Sums follow quantize.cpp's Sum16 order (lanes 0-7 and 8-15
// of each 16 weights in two accumulators, mul then add, the same reduction tree), so the
// result equals the scalar path's bit for bit.
#if defined(__AVX2__) && defined(__FMA__)
// -mfma would otherwise let the compiler fuse the mul/add pairs and break that equality.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#include <immintrin.h>

#include <cstdint>

namespace cvxq::detail {
namespace {

// (q0 + q2) + (q1 + q3) with q = low half + high half: Sum16::total's tree.
inline float hsum(__m256 v) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}

// Lanes [0, rem) set.
inline __m256i tail_mask(int64_t rem) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)rem), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Level count known at compile time (2^B <= 16): thresholds live in registers.
template <int N>
struct SmallLevels {
  __m256 th[N - 1];
  __m256 lo, hi;
  SmallLevels(const float* levels, const float* t) {
    for (int j = 0; j < N - 1; ++j) th[j] = _mm256_set1_ps(t[j]);
    lo = _mm256_loadu_ps(levels);
    hi = N > 8 ? _mm256_loadu_ps(levels + 8) : lo;
  }
  __m256 level_of(__m256 z) const {
    __m256i cnt = _mm256_setzero_si256();
    for (int j = 0; j < N - 1; ++j)
      cnt = _mm256_sub_epi32(cnt, _mm256_castps_si256(_mm256_cmp_ps(th[j], z, _CMP_LT_OQ)));
    __m256 q = _mm256_permutevar8x32_ps(lo, cnt);
    if (N > 8) {
      const __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(cnt, _mm256_set1_epi32(7)));
      q = _mm256_blendv_ps(q, _mm256_permutevar8x32_ps(hi, cnt), upper);
    }
    return q;
  }
};

struct GatherLevels {
  const float* levels;
  const float* th;
  int n;
  __m256 level_of(__m256 z) const {
    __m256i pos = _mm256_setzero_si256();
    for (int step = n >> 1; step > 0; step >>= 1) {
      const __m256i probe = _mm256_add_epi32(pos, _mm256_set1_epi32(step - 1));
      const __m256 t = _mm256_i32gather_ps(th, probe, 4);
      const __m256i below = _mm256_castps_si256(_mm256_cmp_ps(t, z, _CMP_LT_OQ));
      pos = _mm256_add_epi32(pos, _mm256_and_si256(below, _mm256_set1_epi32(step)));
    }
    return _mm256_i32gather_ps(levels, pos, 4);
  }
};

template <class L>
float search_err(const L& lv, const float* w, int64_t len, float loc, float inv_scale) {
  const __m256 vloc = _mm256_set1_ps(loc), vinv = _mm256_set1_ps(inv_scale);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  auto term = [&](__m256 x) {
    const __m256 z = _mm256_mul_ps(_mm256_sub_ps(x, vloc), vinv);
    const __m256 d = _mm256_sub_ps(z, lv.level_of(z));
    return d;
  };
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m256 d0 = term(_mm256_loadu_ps(w + i));
    const __m256 d1 = term(_mm256_loadu_ps(w + i + 8));
    acc0 = _mm256_add_ps(acc0, _mm256_mul_ps(d0, d0));
    acc1 = _mm256_add_ps(acc1, _mm256_mul_ps(d1, d1));
  }
  for (; i < len; i += 8) {  // masked lanes add +0, which leaves a partial sum unchanged
    const __m256i mask = tail_mask(len - i);
    const __m256 d = _mm256_and_ps(term(_mm256_maskload_ps(w + i, mask)), _mm256_castsi256_ps(mask));
    __m256& acc = (i & 8) ? acc1 : acc0;
    acc = _mm256_add_ps(acc, _mm256_mul_ps(d, d));
  }
  return hsum(_mm256_add_ps(acc0, acc1));
}

}  // namespace

float search_err_avx2(const float* w, int64_t len, int depth, const float* levels,
                      const float* th, float loc, float inv_scale) {
  switch (depth) {
    case 1: return search_err(SmallLevels<2>(levels, th), w, len, loc, inv_scale);
    case 2: return search_err(SmallLevels<4>(levels, th), w, len, loc, inv_scale);
    case 3: return search_err(SmallLevels<8>(levels, th), w, len, loc, inv_scale);
    case 4: return search_err(SmallLevels<16>(levels, th), w, len, loc, inv_scale);
    default: return search_err(GatherLevels{levels, th, 1 << depth}, w, len, loc, inv_scale);
  }
}

}  // namespace cvxq::detail
#endif
