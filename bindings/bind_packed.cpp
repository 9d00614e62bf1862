#include "common.hpp"

namespace cvxq::py {

void bind_packed(nb::module_& m) {}

}  // namespace cvxq::py
