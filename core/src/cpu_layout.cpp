// The CPU tiling of cpu_layout.hpp: building it from a packed layer, the portable (scalar)
// kernels, dequantization and the product driver that hands (cluster, slices) units to the
// per-ISA kernel.
#include "cvxq/cpu_layout.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>

#include "cvxq/dispatch.hpp"
#include "cvxq/packed.hpp"

namespace cvxq {
namespace cpu {

namespace {

constexpr int kMaxVectors = 8;  // vectors sharing one lookup in the kernels

std::string s(int64_t v) { return std::to_string(v); }

inline float scale_of(uint32_t sl) { return half_to_float((uint16_t)(sl & 0xffffu)); }
inline float loc_of(uint32_t sl) { return half_to_float((uint16_t)(sl >> 16)); }

// Word offset of every group (c, j) of cluster c in the packed payload.
void group_offsets(const PackedView& v, int64_t c, uint64_t* off) {
  const Geometry& g = v.geom;
  const uint64_t slices = (uint64_t)g.cluster_slices(c);
  for (int64_t t = 0; t < g.n_tiles; ++t) {
    uint64_t at = v.tile_offset[c * g.n_tiles + t];
    for (int64_t j = t * kTileCols; j < std::min(g.cols, (t + 1) * kTileCols); ++j) {
      off[j] = at;
      at += v.depth[c * g.cols + j] * slices;
    }
  }
}

// Portable kernels (the Isa::Scalar path), twins of the AVX2 ones.
void prepare_scalar(const CpuLayout& L, int64_t c, const float* x, int64_t x_stride, int nv,
                    const float*, float* xs, double* cst) {
  const int64_t* run = L.run.data() + 10 * c;
  const float t0 = L.table[0];
  for (int v = 0; v < nv; ++v) cst[v] = 0;
  for (int64_t sl = run[0]; sl < run[1]; ++sl) {  // depth 0: the whole weight is constant
    const uint32_t p = L.sl[(size_t)sl];
    const float l = loc_of(p), sc = scale_of(p);
    const float w = l + sc * t0;
    for (int v = 0; v < nv; ++v) cst[v] += (double)w * x[v * x_stride + L.col[(size_t)sl]];
  }
  for (int64_t sl = run[1]; sl < run[9]; ++sl) {
    const uint32_t p = L.sl[(size_t)sl];
    const float l = loc_of(p), sc = scale_of(p);
    float* o = xs + (sl - run[1]) * nv;
    for (int v = 0; v < nv; ++v) {
      const float xv = x[v * x_stride + L.col[(size_t)sl]];
      o[v] = xv * sc;
      cst[v] += (double)l * xv;
    }
  }
}

void slices_scalar(const CpuLayout& L, int64_t c, int64_t s0, int64_t s1, const float* xs,
                   int nv, float* acc, int64_t stride) {
  const int64_t* run = L.run.data() + 10 * c;
  const int64_t lines = L.line_count[(size_t)c];
  for (int64_t s = s0; s < s1; ++s) {
    float a[kMaxVectors][kLineRows] = {};
    const uint32_t* w = L.words.data() + L.word_off[(size_t)c] + s * lines * kLineRows;
    const float* x = xs;
    for (int B = 1; B <= 8; ++B) {
      const int P = per_word(B);
      const uint32_t mask = (1u << B) - 1;
      const float* T = L.table.data() + table_offset(B);
      for (int64_t n = (run[B + 1] - run[B]) / P; n > 0; --n, w += kLineRows, x += P * nv)
        for (int r = 0; r < kLineRows; ++r)
          for (int i = 0; i < P; ++i) {
            const float t = T[(w[r] >> (B * i)) & mask];
            for (int v = 0; v < nv; ++v) a[v][r] += t * x[i * nv + v];
          }
    }
    for (int v = 0; v < nv; ++v)
      std::memcpy(acc + v * stride + (s - s0) * kLineRows, a[v], sizeof(a[v]));
  }
}

detail::PrepareFn prepare_kernel() {
#ifdef CVXQ_HAVE_AVX2_SOURCES
  if (active_isa() == Isa::AVX2) return detail::prepare_avx2;
#endif
  return prepare_scalar;
}

detail::SliceKernelFn slice_kernel() {
#ifdef CVXQ_HAVE_AVX2_SOURCES
  if (active_isa() == Isa::AVX2) return detail::slices_avx2;
#endif
  return slices_scalar;
}

}  // namespace

int64_t CpuLayout::nbytes() const {
  return (int64_t)(words.size() * 4 + col.size() * 4 + sl.size() * 4 + run.size() * 8 +
                   n_real.size() * 4 + word_off.size() * 8 + line_count.size() * 4 +
                   table.size() * 4 + perm.size() * 4 + sizeof(CpuLayout));
}

CpuLayout build_layout(const PackedView& v, const Control& ctl) {
  validate(v);
  const Geometry& g = v.geom;
  CpuLayout L;
  L.geom = g;
  const size_t nc = (size_t)g.n_clusters;
  L.run.resize(nc * 10);
  L.n_real.assign(nc * kRuns, 0);
  L.line_count.resize(nc);
  L.word_off.resize(nc + 1);
  for (size_t c = 0; c < nc; ++c)
    for (int64_t j = 0; j < g.cols; ++j) ++L.n_real[c * kRuns + v.depth[c * g.cols + j]];
  int64_t slot = 0, words = 0;
  for (size_t c = 0; c < nc; ++c) {
    int64_t lines = 0;
    for (int d = 0; d < kRuns; ++d) {
      L.run[c * 10 + d] = slot;
      int64_t n = L.n_real[c * kRuns + d];
      if (d > 0) {
        n = (n + per_word(d) - 1) / per_word(d);
        lines += n;
        n *= per_word(d);
      }
      slot += n;
    }
    L.run[c * 10 + 9] = slot;
    if (lines > std::numeric_limits<int32_t>::max())
      throw ValueError("layer too large for the CPU tiling: split it");
    L.line_count[c] = (int32_t)lines;
    L.word_off[c] = words;
    words += lines * g.cluster_slices((int64_t)c) * kLineRows;
  }
  L.word_off[nc] = words;

  // Slots: each cluster's columns by depth, then column; padding slots stay column 0 with
  // scale and loc 0.
  L.col.assign((size_t)slot, 0);
  L.sl.assign((size_t)slot, 0);
  for (size_t c = 0; c < nc; ++c) {
    int64_t at[kRuns];
    for (int d = 0; d < kRuns; ++d) at[d] = L.run[c * 10 + d];
    for (int64_t j = 0; j < g.cols; ++j) {
      const size_t gi = c * (size_t)g.cols + (size_t)j;
      const int64_t k = at[v.depth[gi]]++;
      L.col[(size_t)k] = (uint32_t)j;
      L.sl[(size_t)k] = v.scale[gi] | (uint32_t)v.loc[gi] << 16;
    }
  }
  L.table.assign(v.table, v.table + kTableSize);
  L.table.resize(kTableSize + 16, 0.0f);
  if (v.perm) L.perm.assign(v.perm, v.perm + g.rows);

  // The lines, one (cluster, slice) at a time: the slice's indices of every column from the
  // bit planes, then each line's words.
  L.words.assign((size_t)words, 0);
  const int64_t max_slices = g.cluster_slices(0);
  parallel_chunks(g.n_clusters * max_slices, 1, 64, ctl, "cpu layout", [&](int64_t u0, int64_t u1) {
    std::vector<uint64_t> goff((size_t)g.cols);
    std::vector<uint8_t> idx((size_t)g.cols * kSliceRows);
    int64_t have = -1;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t c = u / max_slices, s = u % max_slices;
      if (s >= g.cluster_slices(c)) continue;
      if (have != c) group_offsets(v, c, goff.data()), have = c;
      for (int64_t j = 0; j < g.cols; ++j) {
        const int B = v.depth[c * g.cols + j];
        cvxq::detail::decode_slice_indices(v.payload + goff[(size_t)j] + s * B, B,
                                     idx.data() + j * kSliceRows);
      }
      const int64_t* run = L.run.data() + 10 * c;
      uint32_t* out = L.words.data() + L.word_off[(size_t)c] + s * L.line_count[(size_t)c] * kLineRows;
      for (int B = 1; B <= 8; ++B) {
        const int P = per_word(B);
        const int64_t real_end = run[B] + L.n_real[(size_t)c * kRuns + B];
        for (int64_t first = run[B]; first < run[B + 1]; first += P, out += kLineRows)
          for (int i = 0; i < P && first + i < real_end; ++i) {
            const uint8_t* k = idx.data() + (size_t)L.col[(size_t)(first + i)] * kSliceRows;
            for (int r = 0; r < kLineRows; ++r) out[r] |= (uint32_t)k[r] << (B * i);
          }
      }
    }
  });
  return L;
}

void dequantize(const CpuLayout& L, float* out, const Control& ctl) {
  const Geometry& g = L.geom;
  const int64_t max_slices = g.cluster_slices(0);
  const bool small = g.rows_pad * g.cols < (int64_t)1 << 17;
  const int64_t units = g.n_clusters * max_slices;
  // A slice's 32 rows are assembled in a buffer (columns arrive in slot order, scattered
  // along the row) and then copied out whole: scattering straight into the output touched
  // 32 rows a multiple of 4 KiB apart per column, three times slower.
  parallel_chunks(units, 1, small ? units : 0, ctl, "dequantize", [&](int64_t u0, int64_t u1) {
    std::vector<float> buf((size_t)(kLineRows * g.cols));
    float l[32], sc[32];
    uint32_t j[32];
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t c = u / max_slices, s = u % max_slices;
      if (s >= g.cluster_slices(c)) continue;
      const int64_t row0 = c * g.group_rows + s * kSliceRows;
      const int nrows = (int)std::min<int64_t>(kLineRows, g.rows - row0);
      if (nrows <= 0) continue;
      const int64_t* run = L.run.data() + 10 * c;
      for (int64_t k = run[0]; k < run[1]; ++k) {
        const uint32_t p = L.sl[(size_t)k];
        const float w = loc_of(p) + scale_of(p) * L.table[0];
        for (int r = 0; r < nrows; ++r) buf[(size_t)(r * g.cols + L.col[(size_t)k])] = w;
      }
      const uint32_t* w = L.words.data() + L.word_off[(size_t)c] + s * L.line_count[(size_t)c] * kLineRows;
      for (int B = 1; B <= 8; ++B) {
        const int P = per_word(B);
        const uint32_t mask = (1u << B) - 1;
        const float* T = L.table.data() + table_offset(B);
        const int64_t real_end = run[B] + L.n_real[(size_t)c * kRuns + B];
        for (int64_t first = run[B]; first < run[B + 1]; first += P, w += kLineRows) {
          const int n = (int)std::min<int64_t>(P, real_end - first);
          for (int i = 0; i < n; ++i) {
            const uint32_t p = L.sl[(size_t)(first + i)];
            l[i] = loc_of(p), sc[i] = scale_of(p), j[i] = L.col[(size_t)(first + i)];
          }
          for (int r = 0; r < nrows; ++r) {
            float* row = buf.data() + r * g.cols;
            uint32_t word = w[r];
            for (int i = 0; i < n; ++i, word >>= B) {
              const float val = l[i] + sc[i] * T[word & mask];
              row[j[i]] = val;
            }
          }
        }
      }
      for (int r = 0; r < nrows; ++r)
        std::memcpy(out + (L.perm.empty() ? row0 + r : L.perm[(size_t)(row0 + r)]) * g.cols,
                    buf.data() + r * g.cols, (size_t)g.cols * sizeof(float));
    }
  });
}

void matmul(const CpuLayout& L, const float* x, int64_t batch, float* y, const Control& ctl) {
  if (batch < 1) throw ShapeError("matmul: batch must be >= 1, got " + s(batch));
  const Geometry& g = L.geom;
  const detail::PrepareFn prepare = prepare_kernel();
  const detail::SliceKernelFn kernel = slice_kernel();
  int64_t max_slots = 0;
  for (int64_t c = 0; c < g.n_clusters; ++c)
    max_slots = std::max(max_slots, L.run[(size_t)(10 * c + 9)] - L.run[(size_t)(10 * c + 1)]);
  // Each thread takes one contiguous range of the layer's 32-row slices (storage slice u is
  // rows 32u..32u+31, in cluster 32u / group_rows): balanced to a slice, and the per-cluster
  // preparation of the vectors is done once per cluster a thread touches. Finer dynamic
  // units split clusters between threads, and each repeated that preparation.
  const int64_t n_slices = g.rows_pad / kSliceRows, per_cluster = g.group_rows / kSliceRows;
  const int64_t threads = std::max(1, max_threads());
  // Vectors in blocks of at most 8, of balanced sizes (9 -> 5 + 4).
  const int64_t n_blocks = (batch + kMaxVectors - 1) / kMaxVectors;
  int64_t done = 0;
  for (int64_t bi = 0; bi < n_blocks; ++bi) {
    const int64_t b0 = batch * bi / n_blocks, b1 = batch * (bi + 1) / n_blocks;
    const int nv = (int)(b1 - b0);
    const float* xb = x + b0 * g.cols;
    float* yb = y + b0 * g.rows;
    std::vector<float> xt;  // the block transposed, 8 floats per column (see PrepareFn)
    if (nv > 1) {
      xt.assign((size_t)(8 * g.cols), 0.0f);
      for (int v = 0; v < nv; ++v)
        for (int64_t j = 0; j < g.cols; ++j) xt[(size_t)(8 * j + v)] = xb[v * g.cols + j];
    }
    const bool small = g.rows_pad * g.cols * nv < (int64_t)1 << 17;
    const int64_t chunk = small ? n_slices : (n_slices + threads - 1) / threads;
    parallel_chunks(n_slices, chunk, small ? n_slices : 0, ctl, nullptr, [&](int64_t u0, int64_t u1) {
      // Per-thread scratch, kept between calls: a decode step calls this for every layer.
      thread_local std::vector<float> xs, acc;
      xs.resize(std::max(xs.size(), (size_t)(max_slots * nv + 8)));
      acc.resize(std::max(acc.size(), (size_t)(per_cluster * kLineRows * nv)));
      const int64_t stride = per_cluster * kLineRows;
      double cst[kMaxVectors];
      for (int64_t u = u0; u < u1;) {
        const int64_t c = u / per_cluster, s0 = u - c * per_cluster;
        const int64_t s1 = std::min(g.cluster_slices(c), s0 + (u1 - u));
        u += s1 - s0;
        prepare(L, c, xb, g.cols, nv, xt.data(), xs.data(), cst);
        kernel(L, c, s0, s1, xs.data(), nv, acc.data(), stride);
        const int64_t row0 = c * g.group_rows + s0 * kSliceRows;
        const int64_t nrows = std::min(g.rows - row0, (s1 - s0) * kSliceRows);
        for (int64_t r = 0; r < nrows; ++r) {
          const int64_t out = L.perm.empty() ? row0 + r : L.perm[(size_t)(row0 + r)];
          for (int v = 0; v < nv; ++v)
            yb[v * g.rows + out] = (float)((double)acc[(size_t)(v * stride + r)] + cst[v]);
        }
      }
    });
    done = b1;
    ctl.report("matmul", done, batch);
  }
}

void unpack_indices(const CpuLayout& L, uint8_t* idx) {
  const Geometry& g = L.geom;
  std::memset(idx, 0, (size_t)(g.rows_pad * g.cols));
  for (int64_t c = 0; c < g.n_clusters; ++c) {
    const int64_t* run = L.run.data() + 10 * c;
    for (int64_t s = 0; s < g.cluster_slices(c); ++s) {
      const uint32_t* w = L.words.data() + L.word_off[(size_t)c] + s * L.line_count[(size_t)c] * kLineRows;
      uint8_t* rows = idx + (c * g.group_rows + s * kSliceRows) * g.cols;
      for (int B = 1; B <= 8; ++B) {
        const int P = per_word(B);
        const int64_t real_end = run[B] + L.n_real[(size_t)(c * kRuns + B)];
        for (int64_t first = run[B]; first < run[B + 1]; first += P, w += kLineRows)
          for (int i = 0; i < P && first + i < real_end; ++i)
            for (int r = 0; r < kLineRows; ++r)
              rows[r * g.cols + L.col[(size_t)(first + i)]] =
                  (uint8_t)((w[r] >> (B * i)) & ((1u << B) - 1));
      }
    }
  }
}

void dense_reference(const CpuLayout& L, float* out) {
  const Geometry& g = L.geom;
  for (int64_t c = 0; c < g.n_clusters; ++c) {
    const int64_t* run = L.run.data() + 10 * c;
    for (int64_t r = 0; r < g.cluster_rows(c); ++r) {
      const int64_t row = c * g.group_rows + r;
      if (row >= g.rows) break;
      float* o = out + (L.perm.empty() ? row : L.perm[(size_t)row]) * g.cols;
      const int64_t s = r / kLineRows;
      int64_t line = 0;
      for (int B = 0; B <= 8; ++B) {
        const int P = B ? per_word(B) : 1;
        for (int64_t k = 0; k < L.n_real[(size_t)(c * kRuns + B)]; ++k) {
          const int64_t slot = run[B] + k;
          int idx = 0;
          if (B > 0) {
            const uint64_t word = (uint64_t)L.word_off[(size_t)c] +
                                  (uint64_t)((s * L.line_count[(size_t)c] + line + k / P) * kLineRows +
                                             r % kLineRows);
            for (int b = 0; b < B; ++b)
              idx |= (int)((L.words[word] >> (B * (k % P) + b)) & 1u) << b;
          }
          const uint32_t p = L.sl[(size_t)slot];
          const float l = loc_of(p), sc = scale_of(p);
          const float w = l + sc * L.table[(size_t)(table_offset(B) + idx)];
          o[L.col[(size_t)slot]] = w;
        }
        if (B > 0) line += (run[B + 1] - run[B]) / P;
      }
    }
  }
}

}  // namespace cpu
}  // namespace cvxq
