// AVX2 + FMA + F16C kernels for the packed format (compiled with -mavx2 -mfma -mf16c; called
// only when cvxq::active_isa() says the CPU has them).
#include <immintrin.h>

#include <cstdint>

#include "cvxq/packed.hpp"

// GCC implements _mm256_mul_ps/_mm256_add_ps as plain vector arithmetic, which it may fuse
// into an FMA under -mfma; dequantize must round like the scalar `l + s * t` bit for bit.
#pragma GCC optimize("fp-contract=off")

#ifdef __AVX2__

namespace cvxq::detail {
namespace {

// The 32 indices of one column slice: lane l of quarter q holds row 8q + l. Built from
// the top plane down, each plane's bit moved to bit 31 by a variable left shift.
inline void decode_indices(const uint32_t* words, int bits, __m256i idx[4]) {
  const __m256i lane = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
  const __m256i eight = _mm256_set1_epi32(8);
  for (int q = 0; q < 4; ++q) idx[q] = _mm256_setzero_si256();
  for (int p = bits - 1; p >= 0; --p) {
    const __m256i w = _mm256_set1_epi32((int)words[p]);
    __m256i shift = lane;
    for (int q = 0; q < 4; ++q) {
      const __m256i bit = _mm256_srli_epi32(_mm256_sllv_epi32(w, shift), 31);
      idx[q] = _mm256_or_si256(_mm256_add_epi32(idx[q], idx[q]), bit);
      shift = _mm256_sub_epi32(shift, eight);
    }
  }
}

// Table values T[idx] for one column slice. Tables of up to 16 entries stay in registers
// (the 511-float table always has 16 readable floats past any offset of depth <= 4).
inline void lookup(const float* table, int bits, const __m256i idx[4], __m256 out[4]) {
  if (bits <= 3) {
    const __m256 t = _mm256_loadu_ps(table);
    for (int q = 0; q < 4; ++q) out[q] = _mm256_permutevar8x32_ps(t, idx[q]);
  } else if (bits == 4) {
    const __m256 lo = _mm256_loadu_ps(table), hi = _mm256_loadu_ps(table + 8);
    for (int q = 0; q < 4; ++q) {
      const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(idx[q], 28));
      out[q] = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx[q]),
                                _mm256_permutevar8x32_ps(hi, idx[q]), upper);
    }
  } else {
    for (int q = 0; q < 4; ++q) out[q] = _mm256_i32gather_ps(table, idx[q], 4);
  }
}

inline void decode_values(const TileBlock& b, int jj, int64_t slice, __m256 out[4]) {
  __m256i idx[4];
  decode_indices(b.group[jj] + slice * b.bits[jj], b.bits[jj], idx);
  lookup(b.table[jj], b.bits[jj], idx, out);
}

// In place: r[k] holds column k of an 8x8 block (8 rows) -> r[k] holds row k.
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int k = 0; k < 8; k += 2) {
    t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {
    u[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x20);
    r[k + 4] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x31);
  }
}

}  // namespace

void dequantize_slice_avx2(const TileBlock* blocks, int64_t n_blocks, int64_t slice,
                           float* const* rows) {
  alignas(32) float vals[kTileCols][kSliceRows];
  for (int64_t t = 0; t < n_blocks; ++t) {
    const TileBlock& b = blocks[t];
    for (int jj = 0; jj < b.ncols; ++jj) {
      __m256 v[4];
      decode_values(b, jj, slice, v);
      const __m256 l = _mm256_set1_ps(b.loc[jj]), sc = _mm256_set1_ps(b.scale[jj]);
      for (int q = 0; q < 4; ++q)
        _mm256_store_ps(&vals[jj][8 * q], _mm256_add_ps(l, _mm256_mul_ps(sc, v[q])));
    }
    for (int i0 = 0; i0 < kSliceRows; i0 += 8) {
      float* rp[8];
      bool full = true, aligned = true;
      for (int k = 0; k < 8; ++k) {
        rp[k] = rows[i0 + k] ? rows[i0 + k] + t * kTileCols : nullptr;
        full = full && rp[k];
        aligned = aligned && ((uintptr_t)rp[k] & 31) == 0;
      }
      int jj0 = 0;
      if (full) {
        // Two 8x8 transposes fill 16 floats of each row, so aligned rows take whole-line
        // streaming stores: the output is written once and not read back here, and
        // bypassing the cache measured 3-5x faster than ordinary stores.
        for (; jj0 + 16 <= b.ncols; jj0 += 16) {
          __m256 lo[8], hi[8];
          for (int k = 0; k < 8; ++k) {
            lo[k] = _mm256_load_ps(&vals[jj0 + k][i0]);
            hi[k] = _mm256_load_ps(&vals[jj0 + 8 + k][i0]);
          }
          transpose8(lo);
          transpose8(hi);
          for (int k = 0; k < 8; ++k) {
            if (aligned) {
              _mm256_stream_ps(rp[k] + jj0, lo[k]);
              _mm256_stream_ps(rp[k] + jj0 + 8, hi[k]);
            } else {
              _mm256_storeu_ps(rp[k] + jj0, lo[k]);
              _mm256_storeu_ps(rp[k] + jj0 + 8, hi[k]);
            }
          }
        }
      }
      for (int k = 0; k < 8; ++k) {
        if (!rp[k]) continue;
        for (int jj = jj0; jj < b.ncols; ++jj) rp[k][jj] = vals[jj][i0 + k];
      }
    }
  }
  _mm_sfence();  // streaming stores are weakly ordered: publish them before returning
}

void matmul_block_avx2(const TileBlock& b, const float* xs, int nb, float* acc,
                       int64_t acc_stride) {
  alignas(32) float vals[kTileCols][kSliceRows];
  for (int64_t sl = 0; sl < b.slices; ++sl) {
    for (int jj = 0; jj < b.ncols; ++jj) {
      __m256 t[4];
      decode_values(b, jj, sl, t);
      for (int q = 0; q < 4; ++q) _mm256_store_ps(&vals[jj][8 * q], t[q]);
    }
    for (int v = 0; v < nb; ++v) {
      float* a = acc + v * acc_stride + sl * kSliceRows;
      const float* x = xs + v * kTileCols;
      // Two accumulator sets (even/odd columns) halve the FMA dependency chains.
      __m256 s0[4], s1[4];
      for (int q = 0; q < 4; ++q) {
        s0[q] = _mm256_loadu_ps(a + 8 * q);
        s1[q] = _mm256_setzero_ps();
      }
      int jj = 0;
      for (; jj + 2 <= b.ncols; jj += 2) {
        const __m256 x0 = _mm256_set1_ps(x[jj]), x1 = _mm256_set1_ps(x[jj + 1]);
        for (int q = 0; q < 4; ++q) {
          s0[q] = _mm256_fmadd_ps(x0, _mm256_load_ps(&vals[jj][8 * q]), s0[q]);
          s1[q] = _mm256_fmadd_ps(x1, _mm256_load_ps(&vals[jj + 1][8 * q]), s1[q]);
        }
      }
      if (jj < b.ncols) {
        const __m256 x0 = _mm256_set1_ps(x[jj]);
        for (int q = 0; q < 4; ++q)
          s0[q] = _mm256_fmadd_ps(x0, _mm256_load_ps(&vals[jj][8 * q]), s0[q]);
      }
      for (int q = 0; q < 4; ++q) _mm256_storeu_ps(a + 8 * q, _mm256_add_ps(s0[q], s1[q]));
    }
  }
}

}  // namespace cvxq::detail

#endif  // __AVX2__
