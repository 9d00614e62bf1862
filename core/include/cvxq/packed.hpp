// Packing, unpacking, validation, dequantization and matrix products on the layout of
// format.hpp. Every fast path has a scalar reference twin selected by dispatch.hpp.
#pragma once
#include <cstdint>

#include "cvxq/common.hpp"
#include "cvxq/format.hpp"

namespace cvxq {

// Word offsets of every tile for the given depth map; returns the total word count.
// depth: [n_clusters, cols]; offsets: [geom.n_offsets()]. Throws ValueError for depth > 8.
int64_t compute_tile_offsets(const Geometry& g, const uint8_t* depth, uint32_t* offsets);

// idx: [rows_pad, cols] uint8 in permuted (storage) row order; each value must be < 2^B of
// its group (ValueError otherwise). payload must hold offsets[n_offsets - 1] words.
void pack_indices(const Geometry& g, const uint8_t* depth, const uint32_t* offsets,
                  const uint8_t* idx, uint32_t* payload, const Control& ctl = {});

// Checks everything a reader depends on: depths in 0..8, offsets equal to those the depth
// map implies and total == payload_words, perm a permutation of [0, rows), table finite.
// Throws FormatError naming the first problem. Cheap (one pass over the depth map/perm).
void validate(const PackedView& v);

// Inverse of pack_indices: idx [rows_pad, cols].
void unpack_indices(const PackedView& v, uint8_t* idx, const Control& ctl = {});

// Dense reconstruction in original row order: out [rows, cols] float32.
void dequantize(const PackedView& v, float* out, const Control& ctl = {});

// y = W^ x for a batch: x [batch, cols], y [batch, rows] (row-major), any batch >= 1
// (processed in blocks of up to 16 vectors sharing one decode of W).
void matmul(const PackedView& v, const float* x, int64_t batch, float* y,
            const Control& ctl = {});

// Plain references: bit-by-bit decoding, no SIMD, no tiles. For tests.
void unpack_indices_reference(const PackedView& v, uint8_t* idx);
void dequantize_reference(const PackedView& v, float* out);
// dequantize_reference followed by dot products accumulated in double.
void matmul_reference(const PackedView& v, const float* x, int64_t batch, float* y);

// Depth maps on disk: two depths per byte (low nibble first). pack_nibbles throws
// ValueError for a value above 15 (it would not fit in a nibble).
void pack_nibbles(const uint8_t* depth, int64_t n, uint8_t* out /* [(n + 1) / 2] */);
void unpack_nibbles(const uint8_t* in, int64_t n, uint8_t* depth /* [n] */);

// Shared by packed.cpp and the per-ISA kernel files; not part of the public API.
namespace detail {

// The 32 indices (bytes) of one group's slice from its `bits` plane words.
void decode_slice_indices(const uint32_t* words, int bits, uint8_t* idx32);

// One (cluster, column tile) block of a validated layer, resolved so that a kernel only
// streams words: where each column's group starts, its depth, its table and parameters.
struct TileBlock {
  int ncols = 0;        // columns in this tile (<= kTileCols)
  int64_t slices = 0;   // 32-row slices in the cluster
  const uint32_t* group[kTileCols];  // first payload word of each column's group
  int bits[kTileCols];
  const float* table[kTileCols];     // table + table_offset(bits)
  float loc[kTileCols], scale[kTileCols];
};

// Dequantizes one 32-row slice across a cluster's tiles (blocks[t] covers columns
// t * kTileCols...): rows[i] (i < 32) points at the output row of the slice's row i, or is
// null for a padding row. Values: loc + scale * T[k], rounded exactly like that expression.
using DequantizeSliceFn = void (*)(const TileBlock* blocks, int64_t n_blocks, int64_t slice,
                                   float* const* rows);
// acc[v * acc_stride + i] += sum_j xs[v * kTileCols + j] * T_j[k(i, j)] for v < nb and the
// cluster rows i (xs already holds x * scale; loc is handled by the caller).
using MatmulBlockFn = void (*)(const TileBlock& b, const float* xs, int nb, float* acc,
                               int64_t acc_stride);

void dequantize_slice_avx2(const TileBlock* blocks, int64_t n_blocks, int64_t slice,
                           float* const* rows);
void matmul_block_avx2(const TileBlock& b, const float* xs, int nb, float* acc,
                       int64_t acc_stride);

}  // namespace detail

}  // namespace cvxq
