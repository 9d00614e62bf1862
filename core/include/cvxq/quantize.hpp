// Scalar quantizers with per-group parameter search. Every codebook here has the form
//     w^ = loc + scale * T_B[k],   k in [0, 2^B)
// with a table T_B that depends only on the quantizer kind and depth (and, for Lloyd, on
// the layer): the packed format stores (loc, scale) per group and T once per layer, and
// the kernels decode every kind the same way.
#pragma once
#include <cstdint>

#include "cvxq/common.hpp"

namespace cvxq {

enum class QuantKind : int { Laplace = 0, Uniform = 1, Lloyd = 2 };

// Offsets of depth B's table inside a flat table of 511 floats (2^0 + ... + 2^8).
constexpr int kTableSize = 511;
inline constexpr int table_offset(int depth) { return (1 << depth) - 1; }

// The built-in tables for Laplace (standard Laplace inverse CDF at (k + 0.5) / 2^B,
// in units of the Laplace scale b) and Uniform (k - (2^B - 1) / 2). B = 0 is {0}.
void builtin_table(QuantKind kind, float* table /* [kTableSize] */);

struct QuantSpec {
  QuantKind kind = QuantKind::Laplace;
  // Laplace: scale b = (3 / sqrt 2) * sigma * 2^mult, loc = mu + shift * sigma * 2^mult,
  // mult and shift on the grid [-grid_range, grid_range] in steps of grid_step.
  // Uniform/Lloyd: scale = sigma * 2^mult on the same mult grid (uniform's min/max start is
  // always a candidate), loc = mu + shift * sigma * 2^mult.
  float grid_range = 2.0f;
  float grid_step = 0.125f;
  // Rounds of coordinate search (mult, then shift, then mult ...). 0 = no search: the
  // starting point (mult = shift = 0; uniform: min/max) is used as is.
  int search_rounds = 2;
  // Round loc/scale to float16 before the final assignment, so what is stored reproduces
  // the reconstruction exactly.
  bool fp16_params = true;
};

// Quantize n_groups groups of len weights each (row-major [n_groups, len]) at per-group
// depths. table: [kTableSize] (null = builtin_table(kind); required for Lloyd).
// Outputs (all caller-allocated; any may be null except idx):
//   idx [n_groups, len] uint8, recon [n_groups, len], loc/scale/err [n_groups].
// err is the sum of squared errors of the group. Indices are assigned to the nearest level.
void quantize_groups(const float* x, int64_t n_groups, int64_t len, const uint8_t* depth,
                     const QuantSpec& spec, const float* table, uint8_t* idx, float* recon,
                     float* loc, float* scale, float* err, const Control& ctl = {});

// Measured error curve: curve[g, B] = least squared error of group g at depth B after the
// same parameter search, for B = 0..8 (row-major [n_groups, 9]).
void error_curves(const float* x, int64_t n_groups, int64_t len, const QuantSpec& spec,
                  const float* table, float* curve, const Control& ctl = {});

// Lloyd-Max: fit the table for depths 1..8 by 1-D k-means on standardised samples z
// (z = (w - mu) / sigma of each group). table[kTableSize] is written (B = 0 entry is 0).
void fit_lloyd_table(const float* z, int64_t n, int iters, float* table, const Control& ctl = {});

// Group statistics: mu = median, sigma = RMS of (w - mu) (floored at a tiny positive value).
void group_stats(const float* x, int64_t n_groups, int64_t len, float* mu, float* sigma);

// Plain reference of quantize_groups: scalar, one group at a time, the search written
// out literally. Used by the tests.
void quantize_groups_reference(const float* x, int64_t n_groups, int64_t len,
                               const uint8_t* depth, const QuantSpec& spec, const float* table,
                               uint8_t* idx, float* recon, float* loc, float* scale, float* err);

}  // namespace cvxq
