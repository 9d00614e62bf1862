// Per-group quantizers (see quantize.hpp): tables, the parameter search shared by the fast
// and reference paths, the final float16-exact assignment, and the Lloyd table fit.
//
// Contraction is off in this file: decode() must round the product and the sum separately,
// exactly like a decoder evaluating `loc + scale * t`, and the scalar search must sum in
// the same order as the reference so the two agree bit for bit.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "cvxq/quantize.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cvxq/dispatch.hpp"
#include "cvxq/format.hpp"

namespace cvxq {
namespace detail {
#ifdef CVXQ_HAVE_AVX2_SOURCES
// quantize_avx2.cpp: same contract as search_err_scalar below.
float search_err_avx2(const float* w, int64_t len, int depth, const float* levels,
                      const float* th, float loc, float inv_scale);
#endif
}  // namespace detail

namespace {

constexpr int kDepths = 9;  // B = 0..8
constexpr float kSigmaFloor = 1e-30f;
constexpr float kInf = std::numeric_limits<float>::infinity();

std::string s(int64_t v) { return std::to_string(v); }

inline float decode(float loc, float scale, float t) { return loc + scale * t; }

double laplace_icdf(double u) { return u < 0.5 ? std::log(2.0 * u) : -std::log(2.0 - 2.0 * u); }

// Number of thresholds th[j] < z among the first n - 1 (th sorted, th[n - 1] = +inf):
// branch-free binary search.
inline int bin_of(const float* th, int n, float z) {
  int pos = 0;
  for (int step = n >> 1; step > 0; step >>= 1)
    if (th[pos + step - 1] < z) pos += step;
  return pos;
}

// Search error in units of scale^2: sum (z - T[k])^2, z = (w - loc) * inv_scale, k = the
// number of thresholds below z. Tables are padded to >= 8 entries (th with +inf).
using SearchErrFn = float (*)(const float* w, int64_t len, int depth, const float* levels,
                              const float* th, float loc, float inv_scale);

// The search error's summation order is fixed so the scalar, AVX2 and reference paths
// agree bit for bit (a near-tie between two candidates must break the same way on every
// path): term i goes to partial sum i % 16, and the 16 partials are combined pairwise as
// an AVX2 reduction of two 8-lane accumulators does.
struct Sum16 {
  float s[16] = {};
  void add(int64_t i, float v) { s[i & 15] += v; }
  float total() const {
    float p[8], q[4];
    for (int j = 0; j < 8; ++j) p[j] = s[j] + s[j + 8];
    for (int j = 0; j < 4; ++j) q[j] = p[j] + p[j + 4];
    return (q[0] + q[2]) + (q[1] + q[3]);
  }
};

float search_err_scalar(const float* w, int64_t len, int depth, const float* levels,
                        const float* th, float loc, float inv_scale) {
  const int n = 1 << depth;
  Sum16 acc;
  for (int64_t i = 0; i < len; ++i) {
    const float z = (w[i] - loc) * inv_scale;
    const float d = z - levels[bin_of(th, n, z)];
    acc.add(i, d * d);
  }
  return acc.total();
}

float search_err_literal(const float* w, int64_t len, int depth, const float* levels,
                         const float* th, float loc, float inv_scale) {
  const int n = 1 << depth;
  Sum16 acc;
  for (int64_t i = 0; i < len; ++i) {
    const float z = (w[i] - loc) * inv_scale;
    int k = 0;
    for (int j = 0; j < n - 1; ++j)
      if (th[j] < z) ++k;
    const float d = z - levels[k];
    acc.add(i, d * d);
  }
  return acc.total();
}

// Index of the level of least |w - decode(loc, scale, T[k])|, lowest k on ties.
using AssignFn = int (*)(float w, const float* levels, const float* mids, int n, float loc,
                         float scale);

int assign_literal(float w, const float* levels, const float* mids, int n, float loc,
                   float scale) {
  int best = 0;
  float best_d = std::fabs(w - decode(loc, scale, levels[0]));
  for (int k = 1; k < n; ++k) {
    const float d = std::fabs(w - decode(loc, scale, levels[k]));
    if (d < best_d) best_d = d, best = k;
  }
  return best;
}

// Start at the bin the midpoints give, then walk: the distance to monotone levels is a
// valley in k, so walking down while not worse and up while strictly better lands on the
// lowest-index minimum even where rounding made the midpoint bin off by one or levels equal.
int assign_fast(float w, const float* levels, const float* mids, int n, float loc,
                float scale) {
  int k = scale > 0.0f ? bin_of(mids, n, (w - loc) * (1.0f / scale)) : 0;
  auto dist = [&](int j) { return std::fabs(w - decode(loc, scale, levels[j])); };
  float dk = dist(k);
  while (k > 0) {
    const float dl = dist(k - 1);
    if (dl > dk) break;
    --k, dk = dl;
  }
  while (k < n - 1) {
    const float dr = dist(k + 1);
    if (!(dr < dk)) break;
    ++k, dk = dr;
  }
  return k;
}

struct Kernels {
  SearchErrFn search_err;
  AssignFn assign;
};

Kernels fast_kernels() {
#ifdef CVXQ_HAVE_AVX2_SOURCES
  if (active_isa() == Isa::AVX2) return {detail::search_err_avx2, assign_fast};
#endif
  return {search_err_scalar, assign_fast};
}

constexpr Kernels kReferenceKernels{search_err_literal, assign_literal};

// One depth's tables, padded to >= 8 entries so SIMD code can load whole vectors.
struct DepthTables {
  int n = 1;
  std::vector<float> levels;  // T_B, padded with its last value
  std::vector<float> mids;    // midpoints of T_B, padded with +inf
  std::vector<float> cdf;     // Laplace only: standard Laplace quantiles j / 2^B, +inf pad
  float c = 1.0f;             // scale = c * u
  float d = 1.0f;             // loc = mu + shift * d * u
};

struct Setup {
  QuantKind kind = QuantKind::Laplace;
  int half = 0;                          // index of 0 in the grid
  std::vector<float> grid, pow2;         // grid values and 2^grid
  int rounds = 0;
  bool fp16 = true;
  DepthTables dt[kDepths];
};

std::vector<float> padded(std::vector<float> v, float pad) {
  v.resize(std::max<size_t>(v.size(), 8), pad);
  return v;
}

void check_table(const float* table) {
  for (int b = 0; b < kDepths; ++b) {
    const float* t = table + table_offset(b);
    for (int k = 0; k < (1 << b); ++k) {
      if (!std::isfinite(t[k]))
        throw ValueError("table: entry " + s(k) + " of depth " + s(b) +
                         " is not finite; every table entry must be a finite number");
      if (k > 0 && t[k] < t[k - 1])
        throw ValueError("table: the levels of depth " + s(b) +
                         " must be non-decreasing (entry " + s(k) + " < entry " + s(k - 1) +
                         "); sort each depth's levels");
    }
  }
}

Setup make_setup(const QuantSpec& spec, const float* table) {
  if (!(spec.grid_step > 0.0f) || !std::isfinite(spec.grid_step) ||
      !(spec.grid_range >= 0.0f) || !std::isfinite(spec.grid_range))
    throw ValueError("grid_step must be > 0 and grid_range >= 0 (both finite)");
  const long half = std::lround((double)spec.grid_range / spec.grid_step);
  if (half > 1024)
    throw ValueError("grid_range / grid_step = " + s(half) +
                     " is too fine (at most 1024 steps each side); raise grid_step");
  if (spec.search_rounds < 0 || spec.search_rounds > 64)
    throw ValueError("search_rounds must be in 0..64, got " + s(spec.search_rounds));
  Setup st;
  st.kind = spec.kind;
  st.half = (int)half;
  st.rounds = spec.search_rounds;
  st.fp16 = spec.fp16_params;
  for (int i = -st.half; i <= st.half; ++i) {
    st.grid.push_back((float)i * spec.grid_step);
    st.pow2.push_back(std::exp2(st.grid.back()));
  }
  float builtin[kTableSize];
  if (!table) {
    builtin_table(spec.kind, builtin);  // throws for Lloyd
    table = builtin;
  }
  check_table(table);
  for (int b = 0; b < kDepths; ++b) {
    DepthTables& t = st.dt[b];
    t.n = 1 << b;
    const float* tb = table + table_offset(b);
    std::vector<float> mids, cdf;
    for (int k = 0; k + 1 < t.n; ++k) {
      mids.push_back(0.5f * (tb[k] + tb[k + 1]));
      cdf.push_back((float)laplace_icdf((double)(k + 1) / t.n));
    }
    t.levels = padded(std::vector<float>(tb, tb + t.n), tb[t.n - 1]);
    t.mids = padded(std::move(mids), kInf);
    t.mids.push_back(kInf);  // bin_of may read th[n - 1]
    if (spec.kind == QuantKind::Laplace) {
      t.cdf = padded(std::move(cdf), kInf);
      t.cdf.push_back(kInf);
    }
    switch (spec.kind) {
      case QuantKind::Laplace: t.c = (float)(3.0 / std::sqrt(2.0)); t.d = 1.0f; break;
      case QuantKind::Lloyd: t.c = 1.0f; t.d = 1.0f; break;
      case QuantKind::Uniform:
        t.c = (float)(2.0 * std::sqrt(3.0) / t.n);
        t.d = 0.25f * t.c;  // quarter steps: the default grid spans half a step each way
        break;
    }
  }
  return st;
}

// Non-finite check on the raw bits (vectorises); returns the first bad group or -1.
int64_t first_bad_group(const float* x, int64_t n_groups, int64_t len) {
  for (int64_t g = 0; g < n_groups; ++g) {
    const float* w = x + g * len;
    uint32_t bad = 0;
    for (int64_t i = 0; i < len; ++i) {
      uint32_t b;
      std::memcpy(&b, w + i, 4);
      bad |= (uint32_t)((b & 0x7f800000u) == 0x7f800000u);
    }
    if (bad) return g;
  }
  return -1;
}

void check_inputs(const char* fn, const float* x, int64_t n_groups, int64_t len,
                  const uint8_t* depth) {
  if (n_groups < 0 || len < 1)
    throw ShapeError(std::string(fn) + ": need n_groups >= 0 and len >= 1, got " +
                     s(n_groups) + " x " + s(len));
  if (depth)
    for (int64_t g = 0; g < n_groups; ++g)
      if (depth[g] > kDepths - 1)
        throw ValueError(std::string(fn) + ": depth of group " + s(g) + " is " + s(depth[g]) +
                         "; depths must be in 0..8");
  const int64_t bad = first_bad_group(x, n_groups, len);
  if (bad >= 0)
    throw ValueError(std::string(fn) + ": group " + s(bad) +
                     " contains NaN or Inf; clean the weights before quantizing");
}

struct Stats {
  float mu, sigma;
};

Stats stats_of(const float* w, int64_t len, std::vector<float>& scratch) {
  scratch.assign(w, w + len);
  const int64_t mid = len / 2;
  std::nth_element(scratch.begin(), scratch.begin() + mid, scratch.end());
  double mu = scratch[mid];
  if (len % 2 == 0) mu = 0.5 * (mu + *std::max_element(scratch.begin(), scratch.begin() + mid));
  double ss = 0.0;
  for (int64_t i = 0; i < len; ++i) ss += ((double)w[i] - mu) * ((double)w[i] - mu);
  return {(float)mu, std::max((float)std::sqrt(ss / len), kSigmaFloor)};
}

struct Params {
  float loc, scale;
};

Params grid_params(const Setup& st, const DepthTables& t, Stats gs, int mi, int si) {
  const float u = gs.sigma * st.pow2[mi];
  return {gs.mu + st.grid[si] * (t.d * u), t.c * u};
}

// The coordinate search of quantize.hpp; returns the chosen (loc, scale) before rounding.
Params search(const float* w, int64_t len, int b, Stats gs, const Setup& st, SearchErrFn fn) {
  const DepthTables& t = st.dt[b];
  auto err_at = [&](Params p, const float* th) {
    return fn(w, len, b, t.levels.data(), th, p.loc, 1.0f / p.scale) * (p.scale * p.scale);
  };
  const int n_grid = (int)st.grid.size();
  int cur_m = st.half, cur_s = st.half;
  float cur_e = kInf;
  auto line = [&](bool along_mult, int fixed) {
    for (int i = 0; i < n_grid; ++i) {
      const int mi = along_mult ? i : fixed, si = along_mult ? fixed : i;
      if (mi == cur_m && si == cur_s && cur_e < kInf) continue;  // the incumbent
      const float e = err_at(grid_params(st, t, gs, mi, si), t.mids.data());
      if (e < cur_e) cur_e = e, cur_m = mi, cur_s = si;
    }
  };
  if (st.rounds == 0) {
    cur_e = err_at(grid_params(st, t, gs, cur_m, cur_s), t.mids.data());
  } else {
    line(true, st.half);
    int m2 = cur_m;
    if (st.kind == QuantKind::Laplace) {  // the CVXQ reference's own pick on line 1
      float ref_e = kInf;
      for (int i = 0; i < n_grid; ++i) {
        const float e = err_at(grid_params(st, t, gs, i, st.half), t.cdf.data());
        if (e < ref_e) ref_e = e, m2 = i;
      }
    }
    line(false, m2);
    for (int l = 3; l <= st.rounds + 1; ++l) line(l % 2 == 1, l % 2 == 1 ? cur_s : cur_m);
  }
  Params best = grid_params(st, t, gs, cur_m, cur_s);
  if (st.kind == QuantKind::Uniform) {
    const auto mm = std::minmax_element(w, w + len);
    const Params p{0.5f * (*mm.first + *mm.second), (*mm.second - *mm.first) / (float)(t.n - 1)};
    if (p.scale > 0.0f && (st.rounds == 0 || err_at(p, t.mids.data()) <= cur_e)) best = p;
  }
  return best;
}

float round_param(float v, bool fp16, int64_t g, const char* what) {
  if (!fp16) return v;
  const float r = half_to_float(float_to_half(v));
  if (!std::isfinite(r))
    throw ValueError("group " + s(g) + ": " + what + " = " + std::to_string(v) +
                     " overflows float16, the packed format's parameter type; rescale the "
                     "weights or pass fp16_params=False");
  return r;
}

// Quantizes one group: search, rounding, final assignment. idx/recon may be null.
struct GroupOut {
  float loc, scale, err;
};

GroupOut quantize_group(const float* w, int64_t len, int b, int64_t g, const Setup& st,
                        const Kernels& kr, std::vector<float>& scratch, uint8_t* idx,
                        float* recon) {
  const Stats gs = stats_of(w, len, scratch);
  Params p;
  if (b == 0) {
    double sum = 0.0;
    for (int64_t i = 0; i < len; ++i) sum += w[i];
    p = {(float)(sum / len), gs.sigma};
  } else {
    p = search(w, len, b, gs, st, kr.search_err);
  }
  p.loc = round_param(p.loc, st.fp16, g, "loc");
  p.scale = round_param(p.scale, st.fp16, g, "scale");
  const DepthTables& t = st.dt[b];
  double err = 0.0;
  for (int64_t i = 0; i < len; ++i) {
    const int k = b == 0 ? 0 : kr.assign(w[i], t.levels.data(), t.mids.data(), t.n, p.loc, p.scale);
    const float r = decode(p.loc, p.scale, t.levels[k]);
    if (idx) idx[i] = (uint8_t)k;
    if (recon) recon[i] = r;
    err += ((double)w[i] - r) * ((double)w[i] - r);
  }
  return {p.loc, p.scale, (float)err};
}

// Groups per parallel work unit: about 16k weights, so progress and cancel stay responsive.
int64_t groups_per_chunk(int64_t len) { return std::max<int64_t>(1, 16384 / len); }

}  // namespace

void builtin_table(QuantKind kind, float* table) {
  if (kind == QuantKind::Lloyd)
    throw ValueError("the Lloyd quantizer has no built-in table; fit one with "
                     "fit_lloyd_table and pass it as `table`");
  for (int b = 0; b < kDepths; ++b) {
    const int n = 1 << b;
    float* t = table + table_offset(b);
    for (int k = 0; k < n; ++k)
      t[k] = b == 0 ? 0.0f
             : kind == QuantKind::Laplace ? (float)laplace_icdf((k + 0.5) / n)
                                          : (float)(k - 0.5 * (n - 1));
  }
}

void group_stats(const float* x, int64_t n_groups, int64_t len, float* mu, float* sigma) {
  check_inputs("group_stats", x, n_groups, len, nullptr);
  std::vector<float> scratch;
  for (int64_t g = 0; g < n_groups; ++g) {
    const Stats st = stats_of(x + g * len, len, scratch);
    if (mu) mu[g] = st.mu;
    if (sigma) sigma[g] = st.sigma;
  }
}

void quantize_groups(const float* x, int64_t n_groups, int64_t len, const uint8_t* depth,
                     const QuantSpec& spec, const float* table, uint8_t* idx, float* recon,
                     float* loc, float* scale, float* err, const Control& ctl) {
  check_inputs("quantize_groups", x, n_groups, len, depth);
  const Setup st = make_setup(spec, table);
  const Kernels kr = fast_kernels();
  parallel_chunks(n_groups, groups_per_chunk(len), 2, ctl, "quantize", [&](int64_t g0, int64_t g1) {
    std::vector<float> scratch;
    for (int64_t g = g0; g < g1; ++g) {
      const GroupOut o = quantize_group(x + g * len, len, depth[g], g, st, kr, scratch,
                                        idx ? idx + g * len : nullptr,
                                        recon ? recon + g * len : nullptr);
      if (loc) loc[g] = o.loc;
      if (scale) scale[g] = o.scale;
      if (err) err[g] = o.err;
    }
  });
}

void quantize_groups_reference(const float* x, int64_t n_groups, int64_t len,
                               const uint8_t* depth, const QuantSpec& spec, const float* table,
                               uint8_t* idx, float* recon, float* loc, float* scale,
                               float* err) {
  check_inputs("quantize_groups_reference", x, n_groups, len, depth);
  const Setup st = make_setup(spec, table);
  std::vector<float> scratch;
  for (int64_t g = 0; g < n_groups; ++g) {
    const GroupOut o = quantize_group(x + g * len, len, depth[g], g, st, kReferenceKernels,
                                      scratch, idx ? idx + g * len : nullptr,
                                      recon ? recon + g * len : nullptr);
    if (loc) loc[g] = o.loc;
    if (scale) scale[g] = o.scale;
    if (err) err[g] = o.err;
  }
}

void quantize_feedback(const float* w, int64_t rows, int64_t cols, int64_t group_rows,
                       const float* u, const uint8_t* depth, const QuantSpec& spec,
                       const float* table, uint8_t* idx, float* recon, float* loc, float* scale,
                       float* err, const Control& ctl) {
  if (rows < 1 || cols < 1 || group_rows < 1)
    throw ShapeError("quantize_feedback: need rows, cols, group_rows >= 1, got " + s(rows) +
                     ", " + s(cols) + ", " + s(group_rows));
  const int64_t n_clusters = (rows + group_rows - 1) / group_rows;
  const int64_t bad = first_bad_group(w, rows, cols);
  if (bad >= 0)
    throw ValueError("quantize_feedback: row " + s(bad) +
                     " contains NaN or Inf; clean the weights before quantizing");
  for (int64_t g = 0; g < n_clusters * cols; ++g)
    if (depth[g] > kDepths - 1)
      throw ValueError("quantize_feedback: depth of group " + s(g) + " is " + s(depth[g]) +
                       "; depths must be in 0..8");
  for (int64_t j = 0; j < cols; ++j) {
    const float d = u[j * cols + j];
    if (!(d > 0.0f) || !std::isfinite(d))
      throw ValueError("quantize_feedback: u[" + s(j) + ", " + s(j) +
                       "] must be positive and finite (an upper Cholesky factor of H^-1)");
    for (int64_t k = j + 1; k < cols; ++k)
      if (!std::isfinite(u[j * cols + k]))
        throw ValueError("quantize_feedback: u[" + s(j) + ", " + s(k) + "] is not finite");
  }
  const Setup st = make_setup(spec, table);
  const Kernels kr = fast_kernels();
  parallel_chunks(n_clusters, 1, 1, ctl, "quantize", [&](int64_t c0, int64_t c1) {
    std::vector<float> scratch, wt, q(group_rows), e(group_rows);
    std::vector<uint8_t> k8(group_rows);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * group_rows, size = std::min(group_rows, rows - r0);
      // The cluster transposed, [cols, size]: column j of the cluster is contiguous.
      wt.assign(cols * size, 0.0f);
      for (int64_t r = 0; r < size; ++r)
        for (int64_t j = 0; j < cols; ++j) wt[j * size + r] = w[(r0 + r) * cols + j];
      for (int64_t j = 0; j < cols; ++j) {
        const int64_t g = c * cols + j;
        float* col = wt.data() + j * size;
        const GroupOut o = quantize_group(col, size, depth[g], g, st, kr, scratch, k8.data(),
                                          q.data());
        if (loc) loc[g] = o.loc;
        if (scale) scale[g] = o.scale;
        if (err) err[g] = o.err;
        const float inv_d = 1.0f / u[j * cols + j];
        for (int64_t r = 0; r < size; ++r) {
          idx[(r0 + r) * cols + j] = k8[r];
          if (recon) recon[(r0 + r) * cols + j] = q[r];
          e[r] = (col[r] - q[r]) * inv_d;
        }
        const float* urow = u + j * cols;
        for (int64_t k = j + 1; k < cols; ++k) {
          const float a = urow[k];
          if (a == 0.0f) continue;
          float* dst = wt.data() + k * size;
          for (int64_t r = 0; r < size; ++r) dst[r] -= e[r] * a;
        }
      }
    }
  });
}

void error_curves(const float* x, int64_t n_groups, int64_t len, const QuantSpec& spec,
                  const float* table, float* curve, const Control& ctl,
                  int measured_max_depth) {
  check_inputs("error_curves", x, n_groups, len, nullptr);
  if (measured_max_depth < 0 || measured_max_depth >= kDepths)
    throw ValueError("error_curves: measured_max_depth must be in 0..8, got " + s(measured_max_depth));
  const Setup st = make_setup(spec, table);
  const Kernels kr = fast_kernels();
  const int64_t chunk = std::max<int64_t>(1, groups_per_chunk(len) / kDepths);
  parallel_chunks(n_groups, chunk, 2, ctl, "error_curves", [&](int64_t g0, int64_t g1) {
    std::vector<float> scratch;
    for (int64_t g = g0; g < g1; ++g) {
      float* c = curve + g * kDepths;
      for (int b = 0; b <= measured_max_depth; ++b)
        c[b] = quantize_group(x + g * len, len, b, g, st, kr, scratch, nullptr, nullptr).err;
      // Above it, high-rate theory: each further bit divides the error by 4.
      for (int b = measured_max_depth + 1; b < kDepths; ++b) c[b] = c[b - 1] * 0.25f;
    }
  });
}

void fit_lloyd_table(const float* z, int64_t n, int iters, float* table, const Control& ctl) {
  if (n < 1) throw ShapeError("fit_lloyd_table: need at least one sample");
  if (iters < 0) throw ValueError("fit_lloyd_table: iters must be >= 0, got " + s(iters));
  if (first_bad_group(z, 1, n) >= 0)
    throw ValueError("fit_lloyd_table: the samples contain NaN or Inf; standardise finite "
                     "weights only");
  std::vector<float> zs(z, z + n);
  std::sort(zs.begin(), zs.end());
  // With sorted samples each cell is a contiguous range, so a Lloyd step is exact and
  // costs O(levels log n): cell edges by binary search, means from prefix sums.
  std::vector<double> prefix(n + 1, 0.0);
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + zs[i];
  table[0] = 0.0f;
  for (int b = 1; b < kDepths; ++b) {
    ctl.check();
    const int m = 1 << b;
    std::vector<double> c(m);
    for (int k = 0; k < m; ++k)
      c[k] = zs[std::min<int64_t>(n - 1, (int64_t)((k + 0.5) / m * n))];
    std::vector<int64_t> edge(m + 1, 0), prev;
    edge[m] = n;
    for (int it = 0; it < iters; ++it) {
      for (int k = 1; k < m; ++k) {  // a sample on a midpoint goes to the lower level
        const float mid = (float)(0.5 * (c[k - 1] + c[k]));
        edge[k] = std::upper_bound(zs.begin(), zs.end(), mid) - zs.begin();
      }
      if (edge == prev) break;
      for (int k = 0; k < m; ++k)
        if (edge[k + 1] > edge[k])
          c[k] = (prefix[edge[k + 1]] - prefix[edge[k]]) / (double)(edge[k + 1] - edge[k]);
      std::sort(c.begin(), c.end());  // an empty cell keeps its level; keep the order
      prev = edge;
    }
    for (int k = 0; k < m; ++k) table[table_offset(b) + k] = (float)c[k];
    ctl.report("lloyd", b, kDepths - 1);
  }
}

}  // namespace cvxq
