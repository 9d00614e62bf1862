// A tiny test harness for the C++ core tests (run under sanitizers by ctest).
#pragma once
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace cvxq_test {

struct Case {
  const char* name;
  std::function<void()> fn;
};
inline std::vector<Case>& registry() {
  static std::vector<Case> r;
  return r;
}
struct Register {
  Register(const char* n, std::function<void()> f) { registry().push_back({n, std::move(f)}); }
};
struct Failure {
  std::string what;
};

}  // namespace cvxq_test

#define CVXQ_TEST(name)                                                    \
  static void name();                                                      \
  static cvxq_test::Register reg_##name(#name, name);                      \
  static void name()

#define CHECK(cond)                                                                    \
  do {                                                                                 \
    if (!(cond))                                                                       \
      throw cvxq_test::Failure{std::string(__FILE__) + ":" + std::to_string(__LINE__) + \
                               ": CHECK(" #cond ") failed"};                           \
  } while (0)

#define CHECK_THROWS(expr, Type)          \
  do {                                    \
    bool thrown_ = false;                 \
    try {                                 \
      expr;                               \
    } catch (const Type&) {               \
      thrown_ = true;                     \
    }                                     \
    CHECK(thrown_ && #expr " throws " #Type); \
  } while (0)
