#include "cvxq/dispatch.hpp"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace cvxq {

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

static Isa detect() {
  Isa best = cpu_has_avx2() ? Isa::AVX2 : Isa::Scalar;
  const char* env = std::getenv("CVXQ_ISA");
  if (env && (std::strcmp(env, "scalar") == 0 || std::strcmp(env, "SCALAR") == 0))
    return Isa::Scalar;
  return best;
}

static std::atomic<int> g_isa{-1};

Isa active_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = (int)detect();
    g_isa.store(v);
  }
  return (Isa)v;
}

void set_isa(Isa isa) {
  if (isa == Isa::AVX2 && !cpu_has_avx2()) isa = Isa::Scalar;
  g_isa.store((int)isa);
}

const char* isa_name(Isa isa) { return isa == Isa::AVX2 ? "avx2" : "scalar"; }

}  // namespace cvxq
