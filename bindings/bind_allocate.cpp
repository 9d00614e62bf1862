#include "common.hpp"

namespace cvxq::py {

void bind_allocate(nb::module_& m) {}

}  // namespace cvxq::py
