// Bit allocation: choose an integer depth B in [0, 8] per group so that the modelled output
// distortion is least for a total size (all-in: payload plus side information) that does
// not exceed the budget.
#pragma once
#include <cstdint>
#include <vector>

#include "cvxq/common.hpp"

namespace cvxq {

constexpr int kMaxDepth = 8;
constexpr int kNumDepths = kMaxDepth + 1;  // B = 0..8

struct AllocProblem {
  int64_t n_groups = 0;
  // Weights in each group (P[g]); payload bits of depth B are P[g] * B. Required.
  const int64_t* count = nullptr;
  // Either the model D[g, B] = P * 2^(log2_var + log2_sens) * kappa * 2^(-2B) ...
  const float* log2_var = nullptr;   // [n_groups]
  const float* log2_sens = nullptr;  // [n_groups]
  double kappa = 1.0;
  // ... or a measured curve D[g, B] (row-major [n_groups, 9], already weighted by
  // sensitivity). When given, log2_var/log2_sens are ignored. Non-convex curves are
  // replaced by their lower convex hull in (bits, distortion).
  const float* curve = nullptr;
  // Side-information bits per group as a function of depth: either shared [9] or, when
  // side_bits_per_group is set, [n_groups, 9]. Null means zero side information.
  const double* side_bits = nullptr;
  bool side_bits_per_group = false;
  // Optional per-group bounds: pinned[g] >= 0 fixes the depth (overriding every other
  // bound; negative means free); otherwise the allowed depths are
  // [max(global_min_depth, min_depth[g]), min(global_max_depth, max_depth[g])].
  // Inputs are read (and validated) only at allowed depths.
  const int8_t* pinned = nullptr;
  const int8_t* min_depth = nullptr;
  const int8_t* max_depth = nullptr;
  int global_min_depth = 0;
  int global_max_depth = kMaxDepth;
  // Total budget in bits for all groups together, payload + side information.
  double budget_bits = 0;
};

struct AllocResult {
  std::vector<int8_t> depth;  // [n_groups]
  // log2 of the smallest multiplier whose Lagrangian point fits the budget: the slope
  // (distortion saved per bit) of the steepest hull increment that point leaves out.
  // -inf when every group is at its least-distortion depth.
  double log2_lambda = 0;
  double total_bits = 0;      // payload + side information of the result
  double distortion = 0;      // modelled distortion of the result
  // Feasible range: every group at its fewest-bits allowed depth, and every group at its
  // least-distortion allowed depth (the end of its hull; for the model, its maximum depth).
  double min_bits = 0;
  double max_bits = 0;
  // The Lagrangian point before the greedy fix-up. It is optimal for its own size: no
  // allocation of at most lagrangian_bits has less distortion than lagrangian_distortion.
  double lagrangian_bits = 0;
  double lagrangian_distortion = 0;
};

// Guarantees: total_bits <= budget_bits; distortion <= lagrangian_distortion; and
// budget_bits - total_bits is less than the next hull increment of every group not at its
// least-distortion depth (so less than one group's step). When every increment has the
// same size (equal counts, side bits constant in B) and the curves are convex, the result
// is optimal for the budget.
// Throws InfeasibleError (naming the feasible range in bits and bits/weight) when the
// budget is below min_bits or above max_bits; ValueError on bad input, naming the field.
AllocResult allocate_bits(const AllocProblem& p, const Control& ctl = {});

// Plain reference: bisection on lambda over each group's full depth list (no hulls, no
// histogram tricks), then the same greedy fix-up. Slow; used by the tests.
AllocResult allocate_bits_reference(const AllocProblem& p);

}  // namespace cvxq
