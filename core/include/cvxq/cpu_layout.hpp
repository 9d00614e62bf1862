// The CPU tiling of a packed layer: the same index bits as format.hpp, re-ordered once at
// load time so that the AVX2 product reads each weight's index with one table permute.
//
// Within a cluster c the columns are listed by depth (then column): a run of columns of
// depth d = 0..8. A run of depth B >= 1 is padded to a multiple of P(B) = 32 / B columns
// (slots with column 0, scale 0, loc 0, index 0). Slot s of the layer has col[s] and
// sl[s] = scale | loc << 16 (float16 bits); run d of cluster c is slots
// [run[10 c + d], run[10 c + d + 1]) and n_real[9 c + d] of them are real columns.
//
// Payload: for cluster c, 32-row slice s (cluster row 32 s + r, r < 32), run B >= 1 and
// word group w of that run (its slots [P w, P w + P)), one 32-word line
//     words[word_off[c] + (s * line_count[c] + line(B, w)) * 32 + r]
// holding in bits [B i, B i + B) the index of row r for slot P w + i, low bits first; the
// lines of a slice follow run by run (depth 1 first), line_count[c] of them per slice.
// Word r of a line is lane r % 8 of ymm r / 8, so one 256-bit load gives 8 rows' words and
// vpermps (which reads the low 3 bits) + vpsrld by B steps through them; depths 1 and 2 use
// tables repeated to 8 entries, so the next index's bits above B do not matter.
// Depth-0 columns have no payload: their weight loc + scale * T0[0] is the same for every
// row of the cluster and goes into the per-cluster constant with the loc terms.
#pragma once
#include <cstdint>
#include <vector>

#include "cvxq/common.hpp"
#include "cvxq/format.hpp"

namespace cvxq {
namespace cpu {

constexpr int kLineRows = kSliceRows;  // rows per line: one word per row
constexpr int kRuns = 9;               // depths 0..8
// Indices per 32-bit word at depth B >= 1.
inline constexpr int per_word(int depth) { return 32 / depth; }
static_assert(per_word(3) == 10 && per_word(8) == 4, "indices per word");

struct CpuLayout {
  Geometry geom;
  std::vector<uint32_t> words;
  std::vector<uint32_t> col;      // per slot
  std::vector<uint32_t> sl;       // per slot: float16 scale | float16 loc << 16
  std::vector<int64_t> run;       // [n_clusters * 10]: slot where run d of cluster c starts
  std::vector<int32_t> n_real;    // [n_clusters * 9]: real columns of each run
  std::vector<int64_t> word_off;  // [n_clusters + 1]
  std::vector<int32_t> line_count;  // [n_clusters]: lines per slice
  std::vector<float> table;       // the 511-float table + 16 zeros (whole-register loads)
  std::vector<int32_t> perm;      // [rows], or empty for the identity

  // Bytes held by this object's arrays.
  int64_t nbytes() const;
  int64_t cluster_words(int64_t c) const { return word_off[(size_t)c + 1] - word_off[(size_t)c]; }
};

// Builds the tiling of a packed layer (validated first: FormatError when corrupt).
CpuLayout build_layout(const PackedView& v, const Control& ctl = {});

// Dense reconstruction [rows, cols] in original row order, rounded exactly as
// cvxq::dequantize rounds (loc + scale * T[k] in float).
void dequantize(const CpuLayout& L, float* out, const Control& ctl = {});

// y = W^ x for x [batch, cols], y [batch, rows], any batch >= 1 (vectors in blocks of up to
// 8 sharing each lookup). Float accumulation per row, the loc terms in double.
void matmul(const CpuLayout& L, const float* x, int64_t batch, float* y, const Control& ctl = {});

// The indices back, idx [rows_pad, cols] uint8 in storage row order (padding rows 0):
// pack_indices of them gives the packed payload again.
void unpack_indices(const CpuLayout& L, uint8_t* idx);

// Plain reference decode of the tiling to [rows, cols] (original row order): reads every
// index bit by bit from the line layout above. For tests.
void dense_reference(const CpuLayout& L, float* out);

namespace detail {

// Per-ISA kernel: for cluster c, slices [s0, s1) and nv <= 8 vectors, acc[v * stride + r]
// (r = cluster row, from 32 * s0) = sum over the cluster's slots of depth >= 1 of
// xs[slot * nv + v] * T_B[k(r, slot)], where xs holds the padded slots of depths 1..8 of c
// in order (x * scale, 0 for padding).
// Per-ISA preparation of cluster c for nv <= 8 vectors x[v * x_stride + j] (also given
// transposed, xt[8 j + v], zero for v >= nv, when nv > 1): xs as above (written with up to
// 8 floats of slack past its end), and cst[v] = sum over every column of c of x * loc
// (depth 0: x * (loc + scale * T0[0])), in double.
using PrepareFn = void (*)(const CpuLayout& L, int64_t c, const float* x, int64_t x_stride,
                           int nv, const float* xt, float* xs, double* cst);
void prepare_avx2(const CpuLayout& L, int64_t c, const float* x, int64_t x_stride, int nv,
                  const float* xt, float* xs, double* cst);
using SliceKernelFn = void (*)(const CpuLayout& L, int64_t c, int64_t s0, int64_t s1,
                               const float* xs, int nv, float* acc, int64_t stride);
void slices_avx2(const CpuLayout& L, int64_t c, int64_t s0, int64_t s1, const float* xs, int nv,
                 float* acc, int64_t stride);

}  // namespace detail

}  // namespace cpu
}  // namespace cvxq
