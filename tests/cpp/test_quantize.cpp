// Quantizers and row clustering: fast paths against the plain reference, decode exactness,
// table shapes, and the error paths.
#include <atomic>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "check.hpp"
#include "cvxq/cluster.hpp"
#include "cvxq/dispatch.hpp"
#include "cvxq/format.hpp"
#include "cvxq/quantize.hpp"

using namespace cvxq;

namespace {

std::vector<float> laplace_data(int64_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::exponential_distribution<float> ex(1.0f);
  std::bernoulli_distribution coin;
  std::vector<float> x(n);
  for (auto& v : x) v = 0.01f * (coin(rng) ? ex(rng) : -ex(rng));
  return x;
}

struct Result {
  std::vector<uint8_t> idx;
  std::vector<float> recon, loc, scale, err;
  Result(int64_t g, int64_t len) : idx(g * len), recon(g * len), loc(g), scale(g), err(g) {}
};

Result run(bool reference, const std::vector<float>& x, int64_t len, const std::vector<uint8_t>& d,
           const QuantSpec& spec, const float* table = nullptr) {
  const int64_t g = (int64_t)d.size();
  Result r(g, len);
  if (reference)
    quantize_groups_reference(x.data(), g, len, d.data(), spec, table, r.idx.data(),
                              r.recon.data(), r.loc.data(), r.scale.data(), r.err.data());
  else
    quantize_groups(x.data(), g, len, d.data(), spec, table, r.idx.data(), r.recon.data(),
                    r.loc.data(), r.scale.data(), r.err.data());
  return r;
}

}  // namespace

CVXQ_TEST(quantize_builtin_tables) {
  float lap[kTableSize], uni[kTableSize];
  builtin_table(QuantKind::Laplace, lap);
  builtin_table(QuantKind::Uniform, uni);
  CHECK(lap[0] == 0.0f && uni[0] == 0.0f);
  CHECK(std::fabs(lap[table_offset(1)] + std::log(2.0f)) < 1e-6f);  // ICDF(1/4) = -ln 2
  for (int b = 1; b <= 8; ++b) {
    const int n = 1 << b;
    for (int k = 0; k < n; ++k) {
      CHECK(lap[table_offset(b) + k] == -lap[table_offset(b) + n - 1 - k]);
      CHECK(uni[table_offset(b) + k] == (float)k - 0.5f * (float)(n - 1));
      if (k) CHECK(lap[table_offset(b) + k] > lap[table_offset(b) + k - 1]);
    }
  }
  CHECK_THROWS(builtin_table(QuantKind::Lloyd, lap), ValueError);
}

// Both fast paths must match the reference bit for bit (fixed summation order).
CVXQ_TEST(quantize_fast_matches_reference) {
  const Isa saved = active_isa();
  const int64_t len = 37;  // not a multiple of 8: exercises the vector tail
  std::vector<uint8_t> d;
  for (int i = 0; i < 45; ++i) d.push_back((uint8_t)(i % 9));
  const auto x = laplace_data((int64_t)d.size() * len, 1);
  for (QuantKind kind : {QuantKind::Laplace, QuantKind::Uniform}) {
    QuantSpec spec;
    spec.kind = kind;
    const Result ref = run(true, x, len, d, spec);
    for (Isa isa : {Isa::Scalar, Isa::AVX2}) {
      set_isa(isa);
      const Result f = run(false, x, len, d, spec);
      CHECK(f.idx == ref.idx && f.recon == ref.recon && f.err == ref.err);
      CHECK(f.loc == ref.loc && f.scale == ref.scale);
    }
  }
  set_isa(saved);
}

CVXQ_TEST(quantize_recon_is_decode_of_fp16_params) {
  const int64_t len = 64;
  std::vector<uint8_t> d = {0, 1, 2, 3, 4, 5, 6, 7, 8};
  const auto x = laplace_data((int64_t)d.size() * len, 2);
  float table[kTableSize];
  builtin_table(QuantKind::Laplace, table);
  const Result r = run(false, x, len, d, QuantSpec{});
  for (size_t g = 0; g < d.size(); ++g) {
    CHECK(half_to_float(float_to_half(r.loc[g])) == r.loc[g]);
    CHECK(half_to_float(float_to_half(r.scale[g])) == r.scale[g]);
    double e = 0.0;
    for (int64_t i = 0; i < len; ++i) {
      const size_t at = g * len + i;
      CHECK(r.idx[at] < (1 << d[g]));
      const volatile float prod = r.scale[g] * table[table_offset(d[g]) + r.idx[at]];
      CHECK(r.recon[at] == r.loc[g] + prod);
      e += ((double)x[at] - r.recon[at]) * ((double)x[at] - r.recon[at]);
    }
    CHECK(std::fabs(e - r.err[g]) <= 1e-5 * e);
  }
}

CVXQ_TEST(quantize_lloyd_table_fits_two_clusters) {
  std::vector<float> z;
  for (int i = 0; i < 100; ++i) z.push_back(i % 2 ? 3.0f : -1.0f);
  float t[kTableSize];
  fit_lloyd_table(z.data(), (int64_t)z.size(), 20, t, {});
  CHECK(t[table_offset(1)] == -1.0f && t[table_offset(1) + 1] == 3.0f);
  for (int b = 2; b <= 8; ++b)
    for (int k = 1; k < (1 << b); ++k) CHECK(t[table_offset(b) + k] >= t[table_offset(b) + k - 1]);
}

CVXQ_TEST(quantize_rejects_bad_input) {
  const int64_t len = 8;
  std::vector<float> x = laplace_data(3 * len, 3);
  std::vector<uint8_t> d = {3, 3, 3};
  Result r(3, len);
  auto q = [&](const QuantSpec& spec, const float* table, const Control& ctl) {
    quantize_groups(x.data(), 3, len, d.data(), spec, table, r.idx.data(), nullptr, nullptr,
                    nullptr, nullptr, ctl);
  };
  QuantSpec lloyd;
  lloyd.kind = QuantKind::Lloyd;
  CHECK_THROWS(q(lloyd, nullptr, {}), ValueError);
  std::atomic<bool> stop{true};
  Control ctl;
  ctl.cancel = &stop;
  CHECK_THROWS(q(QuantSpec{}, nullptr, ctl), Cancelled);
  d[1] = 9;
  CHECK_THROWS(q(QuantSpec{}, nullptr, {}), ValueError);
  d[1] = 3;
  x[2 * len + 5] = std::nanf("");
  try {
    q(QuantSpec{}, nullptr, {});
    CHECK(false);
  } catch (const ValueError& e) {
    CHECK(std::string(e.what()).find("group 2") != std::string::npos);
  }
}

CVXQ_TEST(cluster_rows_is_stable_argsort) {
  const float key[] = {2.0f, -1.0f, 2.0f, -INFINITY, 0.5f, -1.0f};
  int32_t perm[6];
  cluster_rows(key, 6, perm);
  const int32_t want[] = {3, 1, 5, 4, 0, 2};
  for (int i = 0; i < 6; ++i) CHECK(perm[i] == want[i]);
  const float bad[] = {1.0f, NAN};
  CHECK_THROWS(cluster_rows(bad, 2, perm), ValueError);
}
