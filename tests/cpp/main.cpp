#include <cstdio>
#include <exception>

#include "check.hpp"

int main() {
  int failed = 0, passed = 0;
  for (auto& c : cvxq_test::registry()) {
    try {
      c.fn();
      ++passed;
    } catch (const cvxq_test::Failure& f) {
      ++failed;
      std::fprintf(stderr, "FAIL %s: %s\n", c.name, f.what.c_str());
    } catch (const std::exception& e) {
      ++failed;
      std::fprintf(stderr, "FAIL %s: unexpected exception: %s\n", c.name, e.what());
    }
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
