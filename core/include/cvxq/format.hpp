// The packed layout of one quantized linear layer, defined once for the CPU and CUDA code.
//
// A layer W (rows x cols, rows = out_features) is stored with its rows permuted (perm[i] is
// the original row at position i) and padded to rows_pad = roundup(rows, 32) (padding rows
// have index 0 and are never output). Positions are cut into clusters of group_rows rows
// (a multiple of 32; the last cluster may be shorter, still a multiple of 32). A group is
// (cluster c, column j): its rows_c weights get one depth B = depth[c, j] in 0..8, and
//     w^ = loc[c, j] + scale[c, j] * table[table_offset(B) + k]
// where k is the group's B-bit index of that row (B = 0: w^ = loc).
//
// Payload: a stream of uint32 words. Group (c, j) holds B * slices_c words, slices_c =
// rows_c / 32, ordered slice-major then bit plane: word [s * B + p] has in its bit i the bit
// p of the index of row s * 32 + i of the cluster. Groups follow each other cluster-major,
// then by column. Columns are cut into tiles of kTileCols; tile_offset[c * n_tiles + t] is
// the word offset where tile t of cluster c starts, and tile_offset[n_clusters * n_tiles]
// is the total word count. A GPU block (or CPU thread) decoding a tile finds its start
// without scanning the stream: the offset of group j inside its tile is the sum of
// B * slices_c over the tile's earlier columns (at most kTileCols - 1 depths to add).
#pragma once
#include <cstdint>
#include <cstring>

namespace cvxq {

constexpr int kFormatVersion = 1;
constexpr int kSliceRows = 32;   // rows per payload word
constexpr int kTileCols = 32;    // columns per offset-table entry
constexpr int kMaxGroupRows = 4096;
// Codebook tables of depths 0..8 stored back to back: 2^0 + ... + 2^8 = 511 floats.
constexpr int kTableSize = 511;
inline constexpr int table_offset(int depth) { return (1 << depth) - 1; }
static_assert(table_offset(9) == kTableSize, "tables of depths 0..8 fill the flat table");
static_assert(kSliceRows == 8 * sizeof(uint32_t), "one payload word covers one 32-row slice");
static_assert(kTileCols > 0 && (kTileCols & (kTileCols - 1)) == 0, "tile width is a power of 2");

struct Geometry {
  int64_t rows = 0, cols = 0;
  int64_t group_rows = 0;
  int64_t rows_pad = 0;    // roundup(rows, 32)
  int64_t n_clusters = 0;  // ceil(rows_pad / group_rows)
  int64_t n_tiles = 0;     // ceil(cols / kTileCols)

  int64_t cluster_rows(int64_t c) const {
    const int64_t r = rows_pad - c * group_rows;
    return r < group_rows ? r : group_rows;
  }
  int64_t cluster_slices(int64_t c) const { return cluster_rows(c) / kSliceRows; }
  int64_t n_groups() const { return n_clusters * cols; }
  int64_t n_offsets() const { return n_clusters * n_tiles + 1; }
};

// Throws ShapeError for rows/cols < 1 or group_rows not a positive multiple of 32 <= 4096.
Geometry make_geometry(int64_t rows, int64_t cols, int64_t group_rows);

// Read-only view of a packed layer (arrays owned by the caller).
struct PackedView {
  Geometry geom;
  const uint8_t* depth = nullptr;         // [n_clusters, cols], 0..8
  const uint32_t* tile_offset = nullptr;  // [n_clusters * n_tiles + 1]
  const uint32_t* payload = nullptr;      // [payload_words]
  int64_t payload_words = 0;
  const uint16_t* loc = nullptr;          // float16 bits [n_clusters, cols]
  const uint16_t* scale = nullptr;        // float16 bits [n_clusters, cols]
  const float* table = nullptr;           // [511]
  const int32_t* perm = nullptr;          // [rows]; null = identity
};

// IEEE float16 <-> float32 (round to nearest even; overflow -> inf).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) { mant <<= 1; --exp; }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0));
  if (absx >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (absx < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    if (absx < 0x33000000u) return (uint16_t)sign;
    const uint32_t e = absx >> 23;
    const uint32_t m = (absx & 0x7fffffu) | 0x800000u;
    const uint32_t total = 126 - e;  // half subnormal unit is 2^-24
    uint32_t r = m >> total;
    const uint32_t rem = m & ((1u << total) - 1);
    const uint32_t half = 1u << (total - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return (uint16_t)(sign | r);
  }
  uint32_t r = absx - 0x38000000u;  // rebias exponent 127 -> 15
  const uint32_t rem = r & 0x1fffu;
  r >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return (uint16_t)(sign | r);
}

}  // namespace cvxq
