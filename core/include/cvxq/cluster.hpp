// Row clustering: sort rows by a key (e.g. log2 var + log2 sensitivity) and cut the sorted
// order into clusters of group_rows rows, so rows of similar sensitivity share depths.
#pragma once
#include <cstdint>

namespace cvxq {

// perm[i] = original row placed at position i (stable sort by key, ascending; equal keys
// keep their row order). +-inf keys sort to the ends (a zero-variance row has log2 var =
// -inf); a NaN key is a ValueError.
// Clusters are positions [c * group_rows, (c + 1) * group_rows).
void cluster_rows(const float* key, int64_t rows, int32_t* perm);

}  // namespace cvxq
