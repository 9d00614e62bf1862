#include "cvxq/cluster.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "cvxq/common.hpp"

namespace cvxq {

void cluster_rows(const float* key, int64_t rows, int32_t* perm) {
  if (rows < 0 || rows > INT32_MAX)
    throw ShapeError("cluster_rows: row count " + std::to_string(rows) +
                     " is outside 0..2^31-1");
  // A NaN breaks the sort's ordering (undefined behaviour), so it is refused up front.
  for (int64_t r = 0; r < rows; ++r)
    if (std::isnan(key[r]))
      throw ValueError("cluster_rows: key of row " + std::to_string(r) +
                       " is NaN; compute the key from finite statistics");
  std::iota(perm, perm + rows, 0);
  std::stable_sort(perm, perm + rows, [key](int32_t a, int32_t b) { return key[a] < key[b]; });
}

}  // namespace cvxq
