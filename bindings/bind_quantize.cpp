#include "common.hpp"

namespace cvxq::py {

void bind_quantize(nb::module_& m) {}

}  // namespace cvxq::py
