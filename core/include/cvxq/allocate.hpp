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
  // Optional per-group bounds: pinned[g] >= 0 fixes the depth; min/max clamp it.
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
  double log2_lambda = 0;     // slope of the Lagrangian at the solution
  double total_bits = 0;      // payload + side information of the result
  double distortion = 0;      // modelled distortion of the result
  double min_bits = 0;        // feasible range of the problem
  double max_bits = 0;
};

// Throws InfeasibleError (naming the feasible range) when the budget is below the
// smallest or above the largest achievable total; ShapeError/ValueError on bad input.
AllocResult allocate_bits(const AllocProblem& p, const Control& ctl = {});

// Plain reference: bisection on lambda over each group's full depth list (no hulls, no
// histogram tricks), then the same greedy fix-up. Slow; used by the tests.
AllocResult allocate_bits_reference(const AllocProblem& p);

}  // namespace cvxq
