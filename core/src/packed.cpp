// The packed layout of format.hpp: geometry, offsets, pack/unpack, validation, the
// portable kernels and the drivers that cut a layer into (cluster, tile) blocks for the
// per-ISA kernels.
#include "cvxq/packed.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cvxq/dispatch.hpp"
#include "cvxq/quantize.hpp"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the SWAR bit-plane code below assumes a little-endian target"
#endif

namespace cvxq {

using detail::TileBlock;

namespace {

constexpr int kMaxDepth = 8;
constexpr uint64_t kByteLsb = 0x0101010101010101ULL;

std::string s(int64_t v) { return std::to_string(v); }

// Word offset of every group of tile (c, t), from the tile's start and its depths.
void tile_group_offsets(const Geometry& g, const uint8_t* depth, uint64_t tile_start,
                        int64_t c, int64_t t, uint64_t* goff) {
  const int64_t j0 = t * kTileCols, j1 = std::min(g.cols, j0 + kTileCols);
  const int64_t slices = g.cluster_slices(c);
  uint64_t at = tile_start;
  for (int64_t j = j0; j < j1; ++j) {
    goff[j - j0] = at;
    at += (uint64_t)depth[c * g.cols + j] * (uint64_t)slices;
  }
}

// Calls on_tile(c, t, offset) for every tile in stream order with the offset the depth
// map implies, then on_tile(n_clusters, 0, total). Depths must already be <= 8.
template <class F>
void walk_tiles(const Geometry& g, const uint8_t* depth, F&& on_tile) {
  uint64_t at = 0;
  for (int64_t c = 0; c < g.n_clusters; ++c) {
    const uint64_t slices = (uint64_t)g.cluster_slices(c);
    for (int64_t t = 0; t < g.n_tiles; ++t) {
      on_tile(c, t, at);
      const int64_t j1 = std::min(g.cols, (t + 1) * kTileCols);
      uint64_t bits = 0;
      for (int64_t j = t * kTileCols; j < j1; ++j) bits += depth[c * g.cols + j];
      at += bits * slices;
    }
  }
  on_tile(g.n_clusters, 0, at);
}

// Bit p of each of 8 bytes -> an 8-bit value (byte k's bit lands at bit k). The multiply
// moves byte k's bit to bit 56 + k; all partial products hit distinct bits, so no carries.
inline uint32_t gather_plane(uint64_t bytes8, int p) {
  return (uint32_t)((((bytes8 >> p) & kByteLsb) * 0x0102040810204080ULL) >> 56);
}

// Inverse: bit k of an 8-bit value -> byte k in {0, 1}.
inline uint64_t spread_plane(uint32_t bits8) {
  const uint64_t y = ((uint64_t)bits8 * kByteLsb) & 0x8040201008040201ULL;
  return ((y + 0x7f7f7f7f7f7f7f7fULL) >> 7) & kByteLsb;
}

// 32 indices of one slice (bytes) <-> its B plane words.
inline void encode_slice(const uint8_t* idx32, int bits, uint32_t* words) {
  uint64_t q[4];
  std::memcpy(q, idx32, 32);
  for (int p = 0; p < bits; ++p) {
    words[p] = gather_plane(q[0], p) | gather_plane(q[1], p) << 8 |
               gather_plane(q[2], p) << 16 | gather_plane(q[3], p) << 24;
  }
}

inline void decode_slice(const uint32_t* words, int bits, uint8_t* idx32) {
  uint64_t q[4] = {0, 0, 0, 0};
  for (int p = 0; p < bits; ++p)
    for (int h = 0; h < 4; ++h) q[h] |= spread_plane((words[p] >> (8 * h)) & 0xffu) << p;
  std::memcpy(idx32, q, 32);
}

// Runs body(c, s0, s1) over slabs (cluster c, its slices [s0, s1)) covering the layer, in
// parallel for large layers. Slab order writes whole row segments slice by slice; visiting
// (cluster, tile) blocks instead writes 128-byte pieces of hundreds of rows at a time, which
// measured several times slower (cache and TLB misses). Few clusters: slabs split the slices
// so every thread has work.
template <class F>
void for_each_slab(const Geometry& g, const Control& ctl, const char* stage, F&& body) {
  const int64_t threads = max_threads(), max_slices = g.cluster_slices(0);
  int64_t per = 1;
  if (threads > 1 && g.n_clusters < 2 * threads)
    per = std::min(max_slices, (2 * threads + g.n_clusters - 1) / g.n_clusters);
  const int64_t span = (max_slices + per - 1) / per, units = g.n_clusters * per;
  const bool small = g.rows_pad * g.cols < (int64_t)1 << 17;
  parallel_chunks(units, 1, small ? units : 0, ctl, stage, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t c = u / per, s0 = (u % per) * span;
      const int64_t s1 = std::min(g.cluster_slices(c), s0 + span);
      if (s0 < s1) body(c, s0, s1);
    }
  });
}

void fill_block(const PackedView& v, int64_t c, int64_t t, TileBlock& b) {
  const Geometry& g = v.geom;
  const int64_t j0 = t * kTileCols;
  b.ncols = (int)(std::min(g.cols, j0 + kTileCols) - j0);
  b.slices = g.cluster_slices(c);
  uint64_t goff[kTileCols];
  tile_group_offsets(g, v.depth, v.tile_offset[c * g.n_tiles + t], c, t, goff);
  for (int jj = 0; jj < b.ncols; ++jj) {
    const int64_t gi = c * g.cols + j0 + jj;
    b.group[jj] = v.payload + goff[jj];
    b.bits[jj] = v.depth[gi];
    b.table[jj] = v.table + table_offset(b.bits[jj]);
    b.loc[jj] = half_to_float(v.loc[gi]);
    b.scale[jj] = half_to_float(v.scale[gi]);
  }
}

void fill_cluster(const PackedView& v, int64_t c, std::vector<TileBlock>& blocks) {
  blocks.resize((size_t)v.geom.n_tiles);
  for (int64_t t = 0; t < v.geom.n_tiles; ++t) fill_block(v, c, t, blocks[(size_t)t]);
}

// Portable kernels (the Isa::Scalar path).
void dequantize_slice_scalar(const TileBlock* blocks, int64_t n_blocks, int64_t slice,
                             float* const* rows) {
  float vals[kTileCols][kSliceRows];
  uint8_t idx[kSliceRows];
  for (int64_t t = 0; t < n_blocks; ++t) {
    const TileBlock& b = blocks[t];
    for (int jj = 0; jj < b.ncols; ++jj) {
      decode_slice(b.group[jj] + slice * b.bits[jj], b.bits[jj], idx);
      const float l = b.loc[jj], sc = b.scale[jj];
      const float* T = b.table[jj];
      for (int i = 0; i < kSliceRows; ++i) {
        const float r = l + sc * T[idx[i]];
        vals[jj][i] = r;
      }
    }
    for (int i = 0; i < kSliceRows; ++i) {
      if (!rows[i]) continue;
      for (int jj = 0; jj < b.ncols; ++jj) rows[i][t * kTileCols + jj] = vals[jj][i];
    }
  }
}

void matmul_block_scalar(const TileBlock& b, const float* xs, int nb, float* acc,
                         int64_t acc_stride) {
  float vals[kTileCols][kSliceRows];
  uint8_t idx[kSliceRows];
  for (int64_t sl = 0; sl < b.slices; ++sl) {
    for (int jj = 0; jj < b.ncols; ++jj) {
      decode_slice(b.group[jj] + sl * b.bits[jj], b.bits[jj], idx);
      for (int i = 0; i < kSliceRows; ++i) vals[jj][i] = b.table[jj][idx[i]];
    }
    for (int v = 0; v < nb; ++v) {
      float* a = acc + v * acc_stride + sl * kSliceRows;
      for (int jj = 0; jj < b.ncols; ++jj) {
        const float x = xs[v * kTileCols + jj];
        for (int i = 0; i < kSliceRows; ++i) a[i] += x * vals[jj][i];
      }
    }
  }
}

detail::DequantizeSliceFn dequantize_kernel() {
#ifdef CVXQ_HAVE_AVX2_SOURCES
  if (active_isa() == Isa::AVX2) return detail::dequantize_slice_avx2;
#endif
  return dequantize_slice_scalar;
}

detail::MatmulBlockFn matmul_kernel() {
#ifdef CVXQ_HAVE_AVX2_SOURCES
  if (active_isa() == Isa::AVX2) return detail::matmul_block_avx2;
#endif
  return matmul_block_scalar;
}

[[noreturn]] void format_error(const std::string& msg) { throw FormatError(msg); }

}  // namespace

void detail::decode_slice_indices(const uint32_t* words, int bits, uint8_t* idx32) {
  decode_slice(words, bits, idx32);
}

Geometry make_geometry(int64_t rows, int64_t cols, int64_t group_rows) {
  if (rows < 1 || cols < 1)
    throw ShapeError("packed layer: rows and cols must be >= 1, got " + s(rows) + " x " +
                     s(cols));
  // perm is int32 and offsets are computed in 64 bits from rows * cols.
  if (rows > std::numeric_limits<int32_t>::max() || cols > std::numeric_limits<int32_t>::max())
    throw ShapeError("packed layer: rows and cols must be < 2^31, got " + s(rows) + " x " +
                     s(cols));
  if (group_rows < kSliceRows || group_rows > kMaxGroupRows || group_rows % kSliceRows != 0)
    throw ShapeError("packed layer: group_rows must be a multiple of 32 in [32, 4096], got " +
                     s(group_rows));
  Geometry g;
  g.rows = rows;
  g.cols = cols;
  g.group_rows = group_rows;
  g.rows_pad = (rows + kSliceRows - 1) / kSliceRows * kSliceRows;
  g.n_clusters = (g.rows_pad + group_rows - 1) / group_rows;
  g.n_tiles = (cols + kTileCols - 1) / kTileCols;
  return g;
}

int64_t compute_tile_offsets(const Geometry& g, const uint8_t* depth, uint32_t* offsets) {
  for (int64_t i = 0; i < g.n_groups(); ++i)
    if (depth[i] > kMaxDepth)
      throw ValueError("depth of group (cluster " + s(i / g.cols) + ", column " +
                       s(i % g.cols) + ") is " + s(depth[i]) + ": depths must be 0..8");
  uint64_t total = 0;
  walk_tiles(g, depth, [&](int64_t, int64_t, uint64_t at) { total = at; });
  if (total > std::numeric_limits<uint32_t>::max())
    throw ValueError("packed layer needs " + s((int64_t)total) +
                     " payload words, more than 32-bit offsets address: split the layer or "
                     "lower its depths");
  walk_tiles(g, depth, [&](int64_t c, int64_t t, uint64_t at) {
    offsets[c * g.n_tiles + t] = (uint32_t)at;
  });
  return (int64_t)total;
}

void pack_indices(const Geometry& g, const uint8_t* depth, const uint32_t* offsets,
                  const uint8_t* idx, uint32_t* payload, const Control& ctl) {
  // The payload is sized from offsets, so offsets that disagree with the depth map would
  // make us write outside it.
  std::vector<uint32_t> expect((size_t)g.n_offsets());
  compute_tile_offsets(g, depth, expect.data());
  for (int64_t i = 0; i < g.n_offsets(); ++i)
    if (offsets[i] != expect[i])
      throw ValueError("pack_indices: tile offset " + s(i) + " is " + s(offsets[i]) +
                       ", expected " + s(expect[i]) +
                       ": compute the offsets from this depth map with compute_tile_offsets");
  for_each_slab(g, ctl, "pack", [&](int64_t c, int64_t s0, int64_t s1) {
    std::vector<uint64_t> goff((size_t)(g.n_tiles * kTileCols));
    for (int64_t t = 0; t < g.n_tiles; ++t)
      tile_group_offsets(g, depth, offsets[c * g.n_tiles + t], c, t, goff.data() + t * kTileCols);
    uint8_t cols_buf[kTileCols][kSliceRows];
    for (int64_t sl = s0; sl < s1; ++sl) {
      const int64_t r0 = c * g.group_rows + sl * kSliceRows;
      for (int64_t j0 = 0; j0 < g.cols; j0 += kTileCols) {
        const int64_t ncols = std::min<int64_t>(kTileCols, g.cols - j0);
        for (int i = 0; i < kSliceRows; ++i) {
          const uint8_t* src = idx + (r0 + i) * g.cols + j0;
          for (int64_t jj = 0; jj < ncols; ++jj) cols_buf[jj][i] = src[jj];
        }
        for (int64_t jj = 0; jj < ncols; ++jj) {
          const int bits = depth[c * g.cols + j0 + jj];
          uint8_t any = 0;
          for (int i = 0; i < kSliceRows; ++i) any |= cols_buf[jj][i];
          if (any >> bits) {
            int i = 0;
            while (!(cols_buf[jj][i] >> bits)) ++i;
            throw ValueError("index " + s(cols_buf[jj][i]) + " at row " + s(r0 + i) +
                             " of group (cluster " + s(c) + ", column " + s(j0 + jj) +
                             ") does not fit its depth " + s(bits) + ": indices must be < 2^" +
                             s(bits));
          }
          encode_slice(cols_buf[jj], bits, payload + goff[(size_t)(j0 + jj)] + sl * bits);
        }
      }
    }
  });
}

void validate(const PackedView& v) {
  const Geometry& g = v.geom;
  Geometry want;
  try {
    want = make_geometry(g.rows, g.cols, g.group_rows);
  } catch (const ShapeError& e) {
    format_error(std::string("invalid geometry: ") + e.what());
  }
  if (g.rows_pad != want.rows_pad || g.n_clusters != want.n_clusters ||
      g.n_tiles != want.n_tiles)
    format_error("inconsistent geometry: rows_pad/n_clusters/n_tiles " + s(g.rows_pad) + "/" +
                 s(g.n_clusters) + "/" + s(g.n_tiles) + " do not follow from " + s(g.rows) +
                 " x " + s(g.cols) + " with group_rows " + s(g.group_rows) +
                 "; build the geometry with make_geometry");
  if (!v.depth || !v.tile_offset || !v.loc || !v.scale || !v.table ||
      (!v.payload && v.payload_words > 0))
    format_error("packed layer has a missing array (depth, offsets, payload, loc, scale or table)");
  if (v.payload_words < 0) format_error("negative payload size " + s(v.payload_words));
  for (int64_t i = 0; i < g.n_groups(); ++i)
    if (v.depth[i] > kMaxDepth)
      format_error("depth of group (cluster " + s(i / g.cols) + ", column " + s(i % g.cols) +
                   ") is " + s(v.depth[i]) + ", above 8: the depth map is corrupt");
  walk_tiles(g, v.depth, [&](int64_t c, int64_t t, uint64_t at) {
    const uint32_t got = v.tile_offset[c * g.n_tiles + t];
    if (c == g.n_clusters) {
      if (got != at)
        format_error("the last tile offset is " + s(got) + ", expected " + s((int64_t)at) +
                     " from the depth map: the offsets or the depth map are corrupt");
      if ((uint64_t)v.payload_words != at)
        format_error("the payload has " + s(v.payload_words) + " words but the depth map needs " +
                     s((int64_t)at) + ": the payload is truncated or does not belong to it");
    } else if (got != at) {
      format_error("tile offset " + s(t) + " of cluster " + s(c) + " is " + s(got) +
                   ", expected " + s((int64_t)at) +
                   ": the payload is corrupt or the depth map does not belong to it");
    }
  });
  for (int i = 0; i < kTableSize; ++i)
    if (!std::isfinite(v.table[i]))
      format_error("table entry " + s(i) + " is not finite");
  if (v.perm) {
    std::vector<uint8_t> seen((size_t)g.rows, 0);
    for (int64_t i = 0; i < g.rows; ++i) {
      const int32_t r = v.perm[i];
      if (r < 0 || r >= g.rows)
        format_error("perm[" + s(i) + "] = " + s(r) + " is outside [0, " + s(g.rows) +
                     "): perm must be a permutation of the rows");
      if (seen[(size_t)r]++)
        format_error("perm[" + s(i) + "] = " + s(r) +
                     " repeats an earlier entry: perm must be a permutation of the rows");
    }
  }
}

void unpack_indices(const PackedView& v, uint8_t* idx, const Control& ctl) {
  validate(v);
  const Geometry& g = v.geom;
  for_each_slab(g, ctl, "unpack", [&](int64_t c, int64_t s0, int64_t s1) {
    std::vector<TileBlock> blocks;
    fill_cluster(v, c, blocks);
    uint8_t cols_buf[kTileCols][kSliceRows];
    for (int64_t sl = s0; sl < s1; ++sl) {
      const int64_t r0 = c * g.group_rows + sl * kSliceRows;
      for (int64_t t = 0; t < g.n_tiles; ++t) {
        const TileBlock& b = blocks[(size_t)t];
        for (int jj = 0; jj < b.ncols; ++jj)
          decode_slice(b.group[jj] + sl * b.bits[jj], b.bits[jj], cols_buf[jj]);
        for (int i = 0; i < kSliceRows; ++i) {
          uint8_t* dst = idx + (r0 + i) * g.cols + t * kTileCols;
          for (int jj = 0; jj < b.ncols; ++jj) dst[jj] = cols_buf[jj][i];
        }
      }
    }
  });
}

void dequantize(const PackedView& v, float* out, const Control& ctl) {
  validate(v);
  const Geometry& g = v.geom;
  std::vector<float*> rows((size_t)g.rows_pad, nullptr);
  for (int64_t r = 0; r < g.rows; ++r) rows[(size_t)r] = out + (v.perm ? v.perm[r] : r) * g.cols;
  const detail::DequantizeSliceFn kernel = dequantize_kernel();
  for_each_slab(g, ctl, "dequantize", [&](int64_t c, int64_t s0, int64_t s1) {
    std::vector<TileBlock> blocks;
    fill_cluster(v, c, blocks);
    for (int64_t sl = s0; sl < s1; ++sl)
      kernel(blocks.data(), g.n_tiles, sl, rows.data() + c * g.group_rows + sl * kSliceRows);
  });
}

void matmul(const PackedView& v, const float* x, int64_t batch, float* y, const Control& ctl) {
  validate(v);
  if (batch < 1) throw ShapeError("matmul: batch must be >= 1, got " + s(batch));
  const Geometry& g = v.geom;
  constexpr int kBatchBlock = 16;
  const detail::MatmulBlockFn kernel = matmul_kernel();
  // With few clusters, split each cluster's tiles into parts (summed afterwards) so every
  // thread has work.
  const int64_t threads = max_threads();
  int64_t parts = 1;
  if (threads > 1 && g.n_clusters < 2 * threads)
    parts = std::min(g.n_tiles, (2 * threads + g.n_clusters - 1) / g.n_clusters);
  const int64_t units = g.n_clusters * parts;
  const int64_t tiles_per_part = (g.n_tiles + parts - 1) / parts;

  // Accumulator rows of the batch are padded apart: a stride of rows_pad floats (a multiple
  // of 128 bytes, often of 4 KiB) makes the kernel's loads alias its earlier stores.
  const int64_t stride = g.rows_pad + 16;
  for (int64_t b0 = 0; b0 < batch; b0 += kBatchBlock) {
    const int nb = (int)std::min<int64_t>(kBatchBlock, batch - b0);
    // acc[part][v][storage row]; cst[part][cluster][v] = sum_j x_j * loc_j in double.
    std::vector<float> acc((size_t)(parts * nb * stride), 0.0f);
    std::vector<double> cst((size_t)(parts * g.n_clusters * nb), 0.0);
    const bool small = g.rows_pad * g.cols * nb < (int64_t)1 << 17;
    // Progress counts batch vectors (below), not the units of each block.
    parallel_chunks(units, 1, small ? units : 0, ctl, nullptr, [&](int64_t u0, int64_t u1) {
      TileBlock b;
      alignas(32) float xs[kBatchBlock * kTileCols];
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t c = u / parts, part = u % parts;
        float* a = acc.data() + part * nb * stride + c * g.group_rows;
        double* cs = cst.data() + (part * g.n_clusters + c) * nb;
        const int64_t t1 = std::min(g.n_tiles, (part + 1) * tiles_per_part);
        for (int64_t t = part * tiles_per_part; t < t1; ++t) {
          fill_block(v, c, t, b);
          for (int vv = 0; vv < nb; ++vv) {
            const float* xr = x + (b0 + vv) * g.cols + t * kTileCols;
            double lsum = 0;
            for (int jj = 0; jj < b.ncols; ++jj) {
              xs[vv * kTileCols + jj] = xr[jj] * b.scale[jj];
              lsum += (double)xr[jj] * b.loc[jj];
            }
            cs[vv] += lsum;
          }
          kernel(b, xs, nb, a, stride);
        }
      }
    });
    for (int64_t r = 0; r < g.rows; ++r) {
      const int64_t c = r / g.group_rows;
      const int64_t out_row = v.perm ? v.perm[r] : r;
      for (int vv = 0; vv < nb; ++vv) {
        double sum = 0;
        for (int64_t part = 0; part < parts; ++part)
          sum += (double)acc[(size_t)((part * nb + vv) * stride + r)] +
                 cst[(size_t)((part * g.n_clusters + c) * nb + vv)];
        y[(b0 + vv) * g.rows + out_row] = (float)sum;
      }
    }
    ctl.report("matmul", b0 + nb, batch);
  }
}

void unpack_indices_reference(const PackedView& v, uint8_t* idx) {
  validate(v);
  const Geometry& g = v.geom;
  std::memset(idx, 0, (size_t)(g.rows_pad * g.cols));
  const uint32_t* w = v.payload;
  for (int64_t c = 0; c < g.n_clusters; ++c)
    for (int64_t j = 0; j < g.cols; ++j) {
      const int bits = v.depth[c * g.cols + j];
      for (int64_t sl = 0; sl < g.cluster_slices(c); ++sl)
        for (int p = 0; p < bits; ++p, ++w)
          for (int i = 0; i < kSliceRows; ++i) {
            const int64_t r = c * g.group_rows + sl * kSliceRows + i;
            idx[r * g.cols + j] |= (uint8_t)(((*w >> i) & 1u) << p);
          }
    }
}

void dequantize_reference(const PackedView& v, float* out) {
  const Geometry& g = v.geom;
  std::vector<uint8_t> idx((size_t)(g.rows_pad * g.cols));
  unpack_indices_reference(v, idx.data());
  for (int64_t r = 0; r < g.rows; ++r) {
    const int64_t c = r / g.group_rows;
    float* row = out + (v.perm ? v.perm[r] : r) * g.cols;
    for (int64_t j = 0; j < g.cols; ++j) {
      const int64_t gi = c * g.cols + j;
      const float l = half_to_float(v.loc[gi]), sc = half_to_float(v.scale[gi]);
      const float t = v.table[table_offset(v.depth[gi]) + idx[(size_t)(r * g.cols + j)]];
      const float w = l + sc * t;
      row[j] = w;
    }
  }
}

void matmul_reference(const PackedView& v, const float* x, int64_t batch, float* y) {
  if (batch < 1) throw ShapeError("matmul: batch must be >= 1, got " + s(batch));
  const Geometry& g = v.geom;
  std::vector<float> w((size_t)(g.rows * g.cols));
  dequantize_reference(v, w.data());
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t r = 0; r < g.rows; ++r) {
      double sum = 0;
      for (int64_t j = 0; j < g.cols; ++j)
        sum += (double)w[(size_t)(r * g.cols + j)] * x[b * g.cols + j];
      y[b * g.rows + r] = (float)sum;
    }
}

void pack_nibbles(const uint8_t* depth, int64_t n, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i)
    if (depth[i] > 15)
      throw ValueError("pack_nibbles: value " + s(depth[i]) + " at " + s(i) +
                       " does not fit in 4 bits");
  for (int64_t i = 0; i < n; i += 2)
    out[i / 2] = (uint8_t)(depth[i] | (i + 1 < n ? depth[i + 1] << 4 : 0));
}

void unpack_nibbles(const uint8_t* in, int64_t n, uint8_t* depth) {
  for (int64_t i = 0; i < n; ++i) depth[i] = (in[i / 2] >> (4 * (i & 1))) & 0xfu;
}

}  // namespace cvxq
