// Scalar quantizers with per-group parameter search. Every codebook here has the form
//     w^ = loc + scale * T_B[k],   k in [0, 2^B)
// with a table T_B that depends only on the quantizer kind and depth (and, for Lloyd, on
// the layer): the packed format stores (loc, scale) per group and T once per layer, and
// the kernels decode every kind the same way.
//
// Decoding is defined as `loc + scale * T[k]` in float32 with two roundings (a product,
// then a sum): NO fused multiply-add. The core computes every reconstruction it returns in
// one portable function compiled with contraction off, so a decoder that evaluates the
// same expression without FMA (CUDA: __fadd_rn(loc, __fmul_rn(scale, t))) reproduces
// `recon` bit for bit.
//
// Search. For a group with mu (median), sigma (RMS about mu) and depth B >= 1, a grid
// point (mult, shift) gives, with u = sigma * 2^mult,
//     Laplace: scale = (3 / sqrt 2) * u   loc = mu + shift * u          (CVXQ)
//     Lloyd:   scale = u                  loc = mu + shift * u
//     Uniform: scale = (2 sqrt 3 / 2^B) * u   loc = mu + shift * scale / 4
// (the uniform step is relative to a unit-variance uniform spread over 2^B levels, so one
// grid covers B = 1..8; its shift is in quarter steps, so the default grid spans half a
// step each way instead of revisiting the same level lattice a whole step over). Uniform also always has the min/max
// candidate loc = (min + max) / 2, scale = (max - min) / (2^B - 1), kept unless a grid
// point is strictly better.
// The grid is {i * grid_step : |i| <= round(grid_range / grid_step)} for mult and shift.
// A candidate's search error is scale^2 * sum_i (z_i - T[k_i])^2 with
// z_i = (w_i - loc) * (1 / scale) and k_i the number of thresholds th_j < z_i, where th
// are the midpoints of T (nearest-level assignment), summed in a fixed order (term i into
// partial sum i % 16, then a fixed pairwise tree) so every path (scalar, AVX2, reference)
// computes the same float and breaks near-ties the same way: results are bit-identical. The search is a coordinate search,
// each step keeping the incumbent unless a candidate is strictly better (first on ties):
//     line 1: mult over the grid at shift = 0
//     line 2: shift over the grid at mult = m2
//     line 3, 4, ...: mult at the incumbent's shift, shift at the incumbent's mult, ...
// with search_rounds + 1 lines in all (search_rounds = 0: the start point only).
// m2 is the incumbent's mult, except for Laplace, where m2 is the mult the CVXQ reference
// picks on line 1 with its CDF-bin assignment (thresholds at the Laplace quantiles k/2^B).
// So the CVXQ reference's final point (its best shift at that mult) is among our
// candidates, and for any fixed levels nearest-level assignment never does worse than CDF
// bins: the result is at least as good as the reference's on the same grid (up to float
// rounding and the float16 rounding of loc/scale).
// After the search loc/scale are rounded to float16 (fp16_params), then every weight is
// assigned to the level of least |w - (loc + scale * T[k])| (lowest k on exact ties), and
// err is the exact squared error of that reconstruction.
// B = 0: loc = the group mean (it minimises the squared error; the median never beats
// it), scale = sigma (irrelevant to the decode, stored for completeness), idx = 0.
#pragma once
#include <cstdint>

#include "cvxq/common.hpp"
#include "cvxq/format.hpp"

namespace cvxq {

enum class QuantKind : int { Laplace = 0, Uniform = 1, Lloyd = 2 };

// Offsets of depth B's table inside a flat table of 511 floats (2^0 + ... + 2^8).

// The built-in tables for Laplace (standard Laplace inverse CDF at (k + 0.5) / 2^B,
// in units of the Laplace scale b) and Uniform (k - (2^B - 1) / 2). B = 0 is {0}.
// Lloyd has no built-in table (ValueError): fit one with fit_lloyd_table.
void builtin_table(QuantKind kind, float* table /* [kTableSize] */);

struct QuantSpec {
  QuantKind kind = QuantKind::Laplace;
  // mult and shift grid (see above); grid_step > 0, grid_range >= 0.
  float grid_range = 2.0f;
  float grid_step = 0.125f;
  // search_rounds + 1 line searches (mult, shift, mult, ...); 0 = no search: the start
  // point (mult = shift = 0; uniform: min/max) is used as is. 1 = the CVXQ reference path.
  int search_rounds = 2;
  // Round loc/scale to float16 before the final assignment, so what is stored reproduces
  // the reconstruction exactly. A group whose loc/scale overflows float16 is a ValueError.
  bool fp16_params = true;
};

// Quantize n_groups groups of len weights each (row-major [n_groups, len]) at per-group
// depths (0..8). table: [kTableSize] (null = builtin_table(kind); required for Lloyd;
// each depth's entries must be finite and non-decreasing).
// Outputs (all caller-allocated; any may be null except idx):
//   idx [n_groups, len] uint8, recon [n_groups, len], loc/scale/err [n_groups].
// err is the sum of squared errors of the group. Throws ValueError for a depth > 8 or a
// non-finite weight (naming the first bad group), Cancelled when ctl's flag is set.
// Progress stage: "quantize".
void quantize_groups(const float* x, int64_t n_groups, int64_t len, const uint8_t* depth,
                     const QuantSpec& spec, const float* table, uint8_t* idx, float* recon,
                     float* loc, float* scale, float* err, const Control& ctl = {});

// GPTQ-style error feedback (Frantar et al. 2022) for CVXQ's groups, a cluster of rows x
// one column. w: [rows, cols] row-major in storage order, cut into clusters of group_rows
// consecutive rows (the last may be shorter). u: [cols, cols] row-major upper Cholesky
// factor of H^-1 (only u[j, k] with k >= j is read; the diagonal must be positive).
// depth: [n_clusters, cols]. Columns are quantized in order, each group exactly as
// quantize_groups does it (search on the error-updated weights); the column's error
// e = (w_j - q_j) / u[j, j] is pushed onto the later columns, w_k -= e * u[j, k].
// Feedback only mixes the columns of one row, so clusters are independent: one work unit
// per cluster, in parallel. Outputs: idx/recon [rows, cols] (storage order), loc/scale/err
// [n_clusters, cols] (err: squared error against the error-updated weights); any but idx
// may be null. Progress stage: "quantize".
void quantize_feedback(const float* w, int64_t rows, int64_t cols, int64_t group_rows,
                       const float* u, const uint8_t* depth, const QuantSpec& spec,
                       const float* table, uint8_t* idx, float* recon, float* loc, float* scale,
                       float* err, const Control& ctl = {});

// Measured error curve: curve[g, B] = least squared error of group g at depth B after the
// same parameter search, for B = 0..8 (row-major [n_groups, 9]). Progress: "error_curves".
void error_curves(const float* x, int64_t n_groups, int64_t len, const QuantSpec& spec,
                  const float* table, float* curve, const Control& ctl = {},
                  int measured_max_depth = 8);

// Lloyd-Max: fit the table for depths 1..8 by 1-D k-means on standardised samples z
// (z = (w - mu) / sigma of each group). table[kTableSize] is written (B = 0 entry is 0).
// Deterministic: init at the quantiles (k + 0.5) / 2^B, then up to `iters` exact Lloyd
// iterations (ties go to the lower level). Levels come out non-decreasing.
void fit_lloyd_table(const float* z, int64_t n, int iters, float* table, const Control& ctl = {});

// Group statistics: mu = median (mean of the two middle values for even len),
// sigma = RMS of (w - mu) (floored at a tiny positive value).
void group_stats(const float* x, int64_t n_groups, int64_t len, float* mu, float* sigma);

// Plain reference of quantize_groups: serial, one group at a time, literal linear scans
// for the level of each weight (search and final assignment). Used by the tests.
void quantize_groups_reference(const float* x, int64_t n_groups, int64_t len,
                               const uint8_t* depth, const QuantSpec& spec, const float* table,
                               uint8_t* idx, float* recon, float* loc, float* scale, float* err);

}  // namespace cvxq
