// Run-time choice of instruction set. AVX2+FMA code lives in *_avx2.cpp files compiled
// with per-file flags; everything else is portable. CVXQ_ISA=scalar forces the reference
// path (the tests run both).
#pragma once
#include <string>

namespace cvxq {

enum class Isa { Scalar = 0, AVX2 = 1 };

// Highest level the CPU supports, capped by the CVXQ_ISA environment variable and by
// set_isa(); read once, then cached.
Isa active_isa();
// Force a level (for tests and benchmarks). Asking for more than the CPU has is clamped.
void set_isa(Isa isa);
bool cpu_has_avx2();
const char* isa_name(Isa isa);

}  // namespace cvxq
