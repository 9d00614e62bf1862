// Integer bit allocation by a Lagrangian over each group's lower convex hull, plus a greedy
// fix-up that spends what the Lagrangian point leaves of the budget.
//
// The fast solver never bisects over all groups: every hull increment has a slope
// (distortion saved per bit); the Lagrangian point for lambda takes exactly the increments
// steeper than lambda, so the smallest fitting lambda is found from one histogram of slopes
// weighted by bits (built from a sample of the groups when there are many), refined inside
// the bin that crosses the budget. The fix-up then visits only the increments just below
// that slope. Hulls are recomputed per pass instead of being stored, which keeps memory at
// one byte per group plus the increments near the crossing.
#include "cvxq/allocate.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <queue>
#include <string>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace cvxq {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int64_t kChunk = 1 << 15;
constexpr int64_t kSerialBelow = 1 << 15;
// 2^-2B, exact in binary, so the model's distortions do not depend on evaluation order.
constexpr double kQuarterPow[kNumDepths] = {1.0,           0.25,           0.0625,
                                            0.015625,      0.00390625,     0.0009765625,
                                            0.000244140625, 6.103515625e-05, 1.52587890625e-05};

std::string fmt(const char* f, double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, x);
  return buf;
}

std::string at(const char* field, int64_t g) {
  return std::string(field) + "[" + std::to_string(g) + "]";
}

// A group's allowed depths as (bits, distortion) points, later reduced in place to the
// lower convex hull; slope[k] is the distortion saved per bit from point k-1 to k.
struct Points {
  int n = 0;
  int8_t depth[kNumDepths];
  double bits[kNumDepths];
  double dist[kNumDepths];
  double slope[kNumDepths];
};

void check_problem(const AllocProblem& p) {
  if (p.n_groups < 1)
    throw ValueError("allocate_bits: n_groups must be >= 1, got " + std::to_string(p.n_groups));
  if (!p.count) throw ValueError("allocate_bits: count is required (weights per group)");
  if (!p.curve && (!p.log2_var || !p.log2_sens))
    throw ValueError(
        "allocate_bits: give either curve (measured distortion per depth) or both log2_var "
        "and log2_sens (the 2^(-2B) model)");
  if (!p.curve && !(std::isfinite(p.kappa) && p.kappa > 0))
    throw ValueError("allocate_bits: kappa must be finite and > 0, got " + fmt("%g", p.kappa));
  if (p.global_min_depth < 0 || p.global_max_depth > kMaxDepth ||
      p.global_min_depth > p.global_max_depth)
    throw ValueError("allocate_bits: need 0 <= global_min_depth <= global_max_depth <= 8, got " +
                     std::to_string(p.global_min_depth) + " and " +
                     std::to_string(p.global_max_depth));
  if (!std::isfinite(p.budget_bits))
    throw ValueError("allocate_bits: budget_bits must be finite, got " + fmt("%g", p.budget_bits));
  if (p.side_bits && !p.side_bits_per_group)
    for (int b = 0; b < kNumDepths; ++b)
      if (!(std::isfinite(p.side_bits[b]) && p.side_bits[b] >= 0))
        throw ValueError(at("allocate_bits: side_bits", b) + " = " + fmt("%g", p.side_bits[b]) +
                         " must be finite and >= 0");
}

// The allowed depths of group g and their points. Validates that group's inputs, so a bad
// value is reported wherever it is first read.
void group_points(const AllocProblem& p, int64_t g, Points& out) {
  const int64_t count = p.count[g];
  if (count < 0)
    throw ValueError("allocate_bits: " + at("count", g) + " = " + std::to_string(count) +
                     " is negative (weights per group)");
  int lo = p.global_min_depth, hi = p.global_max_depth;
  if (p.pinned && p.pinned[g] >= 0) {
    if (p.pinned[g] > kMaxDepth)
      throw ValueError("allocate_bits: " + at("pinned", g) + " = " + std::to_string(p.pinned[g]) +
                       " is outside 0..8 (use -1 for a free group)");
    lo = hi = p.pinned[g];
  } else {
    if (p.min_depth) {
      const int m = p.min_depth[g];
      if (m < 0 || m > kMaxDepth)
        throw ValueError("allocate_bits: " + at("min_depth", g) + " = " + std::to_string(m) +
                         " is outside 0..8");
      lo = std::max(lo, m);
    }
    if (p.max_depth) {
      const int m = p.max_depth[g];
      if (m < 0 || m > kMaxDepth)
        throw ValueError("allocate_bits: " + at("max_depth", g) + " = " + std::to_string(m) +
                         " is outside 0..8");
      hi = std::min(hi, m);
    }
    if (lo > hi)
      throw ValueError("allocate_bits: group " + std::to_string(g) +
                       " has no allowed depth: its minimum " + std::to_string(lo) +
                       " (global_min_depth, min_depth) exceeds its maximum " +
                       std::to_string(hi) + " (global_max_depth, max_depth)");
  }
  static constexpr double kNoSide[kNumDepths] = {};
  const double* side =
      p.side_bits ? p.side_bits + (p.side_bits_per_group ? g * kNumDepths : 0) : kNoSide;
  const double c = (double)count;
  // Bad values are flagged in the loops and reported afterwards, keeping the loops free
  // of throwing branches.
  bool bad_side = false, bad_dist = false;
  out.n = hi - lo + 1;
  if (p.curve) {
    const float* row = p.curve + g * kNumDepths;
    for (int b = lo; b <= hi; ++b) {
      const double d = row[b];
      bad_dist |= !(d >= 0 && d < kInf);
      out.dist[b - lo] = d;
    }
  } else {
    const float lv = p.log2_var[g], ls = p.log2_sens[g];
    if (std::isnan(lv) || lv == kInf)
      throw ValueError("allocate_bits: " + at("log2_var", g) + " = " + fmt("%g", lv) +
                       " (must be finite or -inf)");
    if (std::isnan(ls) || ls == kInf)
      throw ValueError("allocate_bits: " + at("log2_sens", g) + " = " + fmt("%g", ls) +
                       " (must be finite or -inf)");
    const double scale = c * p.kappa * std::exp2((double)lv + (double)ls);
    if (!std::isfinite(scale))
      throw ValueError("allocate_bits: group " + std::to_string(g) +
                       ": distortion overflows (log2_var + log2_sens too large)");
    for (int b = lo; b <= hi; ++b) out.dist[b - lo] = scale * kQuarterPow[b];
  }
  for (int b = lo; b <= hi; ++b) {
    bad_side |= !(side[b] >= 0 && side[b] < kInf);
    out.depth[b - lo] = (int8_t)b;
    out.bits[b - lo] = c * b + side[b];
  }
  if (bad_side || bad_dist)
    for (int b = lo; b <= hi; ++b) {
      const double v = bad_side ? side[b] : p.curve[g * kNumDepths + b];
      if (!(v >= 0 && v < kInf))
        throw ValueError("allocate_bits: " + std::string(bad_side ? "side_bits" : "curve") + "[" +
                         std::to_string(g) + ", " + std::to_string(b) + "] = " + fmt("%g", v) +
                         " must be finite and >= 0");
    }
}

// Keeps the points on the lower-left convex hull in (bits, distortion): bits strictly
// increasing, distortion strictly decreasing, slopes strictly decreasing. Collinear middle
// points are dropped, so each slope names one increment.
void reduce_to_hull(Points& p) {
  // Usual case (the model, most measured curves): the points already form the hull.
  bool hull = true;
  for (int k = 1; k < p.n; ++k) {
    const double db = p.bits[k] - p.bits[k - 1], dd = p.dist[k - 1] - p.dist[k];
    p.slope[k] = dd / db;
    hull &= (db > 0) & (dd > 0) & (k == 1 || p.slope[k] < p.slope[k - 1]);
  }
  if (hull) return;
  for (int i = 1; i < p.n; ++i)  // insertion sort by (bits, dist); usually already sorted
    for (int j = i; j > 0 && (p.bits[j] < p.bits[j - 1] ||
                              (p.bits[j] == p.bits[j - 1] && p.dist[j] < p.dist[j - 1]));
         --j) {
      std::swap(p.bits[j], p.bits[j - 1]);
      std::swap(p.dist[j], p.dist[j - 1]);
      std::swap(p.depth[j], p.depth[j - 1]);
    }
  int h = 0;
  for (int i = 0; i < p.n; ++i) {
    // A point with no less distortion than a cheaper kept one is never worth its bits.
    if (h > 0 && !(p.dist[i] < p.dist[h - 1])) continue;
    while (h >= 2 && (p.dist[h - 2] - p.dist[h - 1]) * (p.bits[i] - p.bits[h - 1]) <=
                         (p.dist[h - 1] - p.dist[i]) * (p.bits[h - 1] - p.bits[h - 2]))
      --h;
    p.bits[h] = p.bits[i];
    p.dist[h] = p.dist[i];
    p.depth[h] = p.depth[i];
    ++h;
  }
  p.n = h;
  for (int k = 1; k < h; ++k)
    p.slope[k] = (p.dist[k - 1] - p.dist[k]) / (p.bits[k] - p.bits[k - 1]);
}

void group_hull(const AllocProblem& p, int64_t g, Points& out) {
  group_points(p, g, out);
  reduce_to_hull(out);
}

void check_budget(const AllocProblem& p, double min_bits, double max_bits, double weights) {
  if (p.budget_bits >= min_bits && p.budget_bits <= max_bits) return;
  auto per_weight = [&](double bits) {
    return weights > 0 ? fmt("%.3f", bits / weights) : std::string("n/a");
  };
  auto bpw = [&](double bits) { return per_weight(bits) + " bits/weight"; };
  const std::string range = "; reachable: " + per_weight(min_bits) + " .. " + bpw(max_bits) +
                            " (" + fmt("%.6g", min_bits) + " .. " + fmt("%.6g", max_bits) +
                            " bits)";
  const std::string head = "budget " + fmt("%.6g", p.budget_bits) + " bits (" +
                           bpw(p.budget_bits) + ")";
  if (p.budget_bits < min_bits)
    throw InfeasibleError(head + " is below the smallest reachable size " +
                          fmt("%.6g", min_bits) + " bits (" + bpw(min_bits) +
                          ", every group at its minimum depth plus side information)" + range +
                          "; raise the budget or lower the minimum depths");
  throw InfeasibleError(head + " is above the largest useful size " + fmt("%.6g", max_bits) +
                        " bits (" + bpw(max_bits) +
                        ", every group at its least-distortion allowed depth plus side "
                        "information)" + range + "; lower the budget or raise the maximum depths");
}

double log2_or_minus_inf(double lambda) { return lambda > 0 ? std::log2(lambda) : -kInf; }

// ---- fast solver -------------------------------------------------------------------------

// Positive doubles order like their bit patterns, so the top bits are a monotone
// logarithmic bin index: 11 exponent bits and 5 mantissa bits, 32 bins per octave.
constexpr int kBinShift = 47;
constexpr int kBins = 1 << 16;
inline int slope_bin(double s) {
  uint64_t u;
  std::memcpy(&u, &s, sizeof u);
  return (int)(u >> kBinShift);
}

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// One increment a fix-up may take: group g from hull point k-1 (depth `from`) to k.
struct Step {
  double slope;
  double dbits;
  int64_t g;
  int8_t k, from, to;
};
// Heap order: steepest first; ties by group, then along the group's hull.
bool after(const Step& a, const Step& b) {
  if (a.slope != b.slope) return a.slope < b.slope;
  if (a.g != b.g) return a.g > b.g;
  return a.k > b.k;
}

// Per-pass progress: two passes over the groups make up one "allocate" stage.
Control pass_control(const Control& ctl, int pass, int64_t n) {
  Control c;
  c.cancel = ctl.cancel;
  if (ctl.progress) {
    auto f = ctl.progress;
    c.progress = [f, pass, n](const Progress& pr) {
      f(Progress{"allocate", pass * n + pr.done, 2 * n});
    };
  }
  return c;
}

template <class T>
std::vector<T> concat(std::vector<std::vector<T>>& parts) {
  size_t total = 0;
  for (auto& v : parts) total += v.size();
  std::vector<T> out;
  out.reserve(total);
  for (auto& v : parts) {
    out.insert(out.end(), v.begin(), v.end());
    std::vector<T>().swap(v);
  }
  return out;
}

// Increments a fix-up window aims to hold; later windows double it.
constexpr int64_t kWindow = int64_t(1) << 16;
// From this many groups on, the histogram is built from 1 in kSampleRate groups, and the
// pass collects kSampleSpread bins either side of the estimated crossing.
constexpr int64_t kSampleFrom = int64_t(1) << 20;
constexpr int kSampleRate = 16;
constexpr int kSampleSpread = 2;

class FastSolver {
 public:
  FastSolver(const AllocProblem& p, const Control& ctl)
      : p_(p), ctl_(ctl), n_(p.n_groups), n_chunks_((n_ + kChunk - 1) / kChunk) {}

  AllocResult run() {
    AllocResult r;
    r.depth.assign(n_, 0);
    depth_ = r.depth.data();
    // Large problems first build the histogram from a sample of the groups, which also
    // estimates the feasible range; the pass below measures the range exactly.
    bool sampled = n_ >= kSampleFrom;
    scan_pass(sampled, true);
    if (!sampled) check_budget(p_, min_bits_, max_bits_, weights_);

    // The Lagrangian point for the budget takes every increment steeper than s*, the
    // largest slope at which taking all increments at least as steep would overflow. The
    // histogram names the bin holding s*; one pass takes every steeper bin and collects
    // that bin (a few around it when the histogram is sampled, and a window below, for the
    // fix-up) to finish in slope order. The histogram is only a guide: when the crossing
    // is not in the collected bins, an exact histogram is built and the pass repeated.
    int bin = crossing_bin();
    int spread = sampled ? kSampleSpread : 0;
    double s_star = -1.0;  // -1: every increment fits
    int lo_bin = 0;
    std::vector<Step> steps;
    bool moved_down = false;  // after a move down, a move up could only oscillate
    for (int pass = 0;; ++pass) {
      const int hi = std::min(bin + spread, kBins - 1), keep = std::max(bin - spread, 0);
      lo_bin = bin < 0 ? 0 : window_floor(keep, kWindow);
      steps = lagrangian_pass(bin < 0 ? -1 : hi, keep, lo_bin, pass == 0);
      if (pass == 0 && sampled) check_budget(p_, min_bits_, max_bits_, weights_);
      const bool too_low = total_ > p_.budget_bits;  // the crossing is in a steeper bin
      if (bin < 0 && (!too_low || !sampled)) break;
      if (bin >= 0 && (!too_low || moved_down) && finish_lagrangian(steps, keep, hi, s_star))
        break;
      if (sampled) {
        sampled = false;
        spread = 0;
        scan_pass(false, false);
        bin = crossing_bin();
      } else if (too_low && !moved_down) {
        bin = nonempty_bin(bin, +1);
      } else {
        bin = nonempty_bin(bin, -1);
        moved_down = true;
      }
    }
    r.min_bits = min_bits_;
    r.max_bits = max_bits_;
    r.log2_lambda = log2_or_minus_inf(s_star);
    r.lagrangian_bits = total_;
    r.lagrangian_distortion = dist_;

    int64_t window = kWindow;
    std::make_heap(steps.begin(), steps.end(), after);
    for (;;) {
      fix_up(steps);
      if (lo_bin <= 0 || p_.budget_bits - total_ < min_step_) break;
      const int hi_bin = lo_bin - 1;
      window *= 2;
      lo_bin = window_floor(hi_bin, window);
      steps = window_pass(lo_bin, hi_bin);
      std::make_heap(steps.begin(), steps.end(), after);
    }
    r.total_bits = total_;
    r.distortion = dist_;
    ctl_.report("allocate", 2 * n_, 2 * n_);
    return r;
  }

 private:
  // Pass 1: the feasible range and the slope histogram weighted by bits, from every group
  // or estimated from a pseudo-random 1 in kSampleRate of them.
  void scan_pass(bool sample, bool report) {
    const int nt = std::max(1, max_threads());
    const double scale = sample ? kSampleRate : 1;
    std::vector<std::vector<Bin>> th(nt, std::vector<Bin>(kBins));
    std::vector<double> lo(n_chunks_), hi(n_chunks_), w(n_chunks_);
    parallel_chunks(n_, kChunk, kSerialBelow, pass_control(ctl_, 0, n_),
                    report ? "allocate" : nullptr, [&](int64_t b, int64_t e) {
                      Bin* hist = th[std::min(thread_id(), nt - 1)].data();
                      double s_lo = 0, s_hi = 0, s_w = 0;
                      Points h;
                      for (int64_t g = b; g < e; ++g) {
                        if (sample && !in_sample(g)) continue;
                        group_hull(p_, g, h);
                        s_lo += scale * h.bits[0];
                        s_hi += scale * h.bits[h.n - 1];
                        s_w += scale * (double)p_.count[g];
                        for (int k = 1; k < h.n; ++k) {
                          Bin& bin = hist[slope_bin(h.slope[k])];
                          bin.bits += scale * (h.bits[k] - h.bits[k - 1]);
                          bin.count += 1;
                        }
                      }
                      const int64_t c = b / kChunk;
                      lo[c] = s_lo, hi[c] = s_hi, w[c] = s_w;
                    });
    hist_.assign(kBins, Bin{});
    for (int t = 0; t < nt; ++t)
      for (int i = 0; i < kBins; ++i) {
        hist_[i].bits += th[t][i].bits;
        hist_[i].count += th[t][i].count * (int64_t)scale;
      }
    min_bits_ = max_bits_ = weights_ = 0;
    for (int64_t c = 0; c < n_chunks_; ++c) {
      min_bits_ += lo[c];
      max_bits_ += hi[c];
      weights_ += w[c];
    }
  }

  static bool in_sample(int64_t g) {
    return ((uint64_t)g * 0x9E3779B97F4A7C15ull) >> 60 == 0;  // 1 in 16, unpatterned
  }

  // The bin where taking increments steepest first crosses the budget; -1 when all fit.
  int crossing_bin() {
    if (p_.budget_bits >= max_bits_) return -1;
    double acc = min_bits_;
    for (int bin = kBins - 1; bin >= 0; --bin) {
      acc += hist_[bin].bits;
      if (acc > p_.budget_bits) return bin;
    }
    return nonempty_bin(0, -1);
  }

  // The nearest bin above (dir +1) or below (dir -1) that holds increments; -1 below all.
  int nonempty_bin(int bin, int dir) const {
    for (bin += dir; bin >= 0 && bin < kBins; bin += dir)
      if (hist_[bin].count) return bin;
    return dir > 0 ? kBins - 1 : -1;
  }

  // Lowest bin such that bins [lo, hi] hold at least `want` increments (or 0).
  int window_floor(int hi, int64_t want) const {
    int64_t have = 0;
    int lo = hi;
    for (; lo > 0; --lo) {
      have += hist_[lo].count;
      if (have >= want) break;
    }
    return std::max(lo, 0);
  }

  // Candidates are filtered against the slack with a small margin: admitting a few extra
  // costs nothing, since every step is checked exactly when it is taken.
  double filter_slack(double slack) const {
    return slack + 1e-9 * (std::abs(p_.budget_bits) + 1.0);
  }

  // Appends group g's steps after hull point `k`: all of those with bins down to keep_bin,
  // then those with bins down to lo_bin while, taken in order from k, they fit in `slack`
  // (later ones can never be taken).
  static void collect(const Points& h, int64_t g, int k, int keep_bin, int lo_bin,
                      double slack, std::vector<Step>& out) {
    double cum = 0;
    for (++k; k < h.n; ++k) {
      const int bin = slope_bin(h.slope[k]);
      const double db = h.bits[k] - h.bits[k - 1];
      cum += db;
      if (bin < lo_bin || (bin < keep_bin && cum > slack)) break;
      out.push_back({h.slope[k], db, g, (int8_t)k, h.depth[k - 1], h.depth[k]});
    }
  }

  // Pass 2: every group at the end of its increments with bins above `bin` (exact totals),
  // plus the candidates with bins in [lo_bin, bin] for finishing the Lagrangian point
  // (those down to keep_bin) and the fix-up. Also measures the feasible range exactly and
  // finds the smallest increment.
  std::vector<Step> lagrangian_pass(int bin, int keep_bin, int lo_bin, bool report) {
    std::vector<std::vector<Step>> steps(n_chunks_);
    std::vector<double> bits(n_chunks_), dist(n_chunks_), mn(n_chunks_);
    std::vector<double> lo(n_chunks_), hi(n_chunks_), w(n_chunks_);
    parallel_chunks(n_, kChunk, kSerialBelow, pass_control(ctl_, 1, n_),
                    report ? "allocate" : nullptr, [&](int64_t b, int64_t e) {
                      const int64_t c = b / kChunk;
                      double s_bits = 0, s_dist = 0, s_mn = kInf, s_lo = 0, s_hi = 0, s_w = 0;
                      Points h;
                      for (int64_t g = b; g < e; ++g) {
                        group_hull(p_, g, h);
                        s_lo += h.bits[0];
                        s_hi += h.bits[h.n - 1];
                        s_w += (double)p_.count[g];
                        int k = 0;
                        while (k + 1 < h.n && slope_bin(h.slope[k + 1]) > bin) ++k;
                        depth_[g] = h.depth[k];
                        s_bits += h.bits[k];
                        s_dist += h.dist[k];
                        for (int i = 1; i < h.n; ++i) s_mn = std::min(s_mn, h.bits[i] - h.bits[i - 1]);
                        // The window is bounded by its size, so no slack filter here.
                        if (bin >= 0) collect(h, g, k, keep_bin, lo_bin, kInf, steps[c]);
                      }
                      bits[c] = s_bits, dist[c] = s_dist, mn[c] = s_mn;
                      lo[c] = s_lo, hi[c] = s_hi, w[c] = s_w;
                    });
    total_ = dist_ = min_bits_ = max_bits_ = weights_ = 0;
    min_step_ = kInf;
    for (int64_t c = 0; c < n_chunks_; ++c) {
      total_ += bits[c], dist_ += dist[c];
      min_step_ = std::min(min_step_, mn[c]);
      min_bits_ += lo[c], max_bits_ += hi[c], weights_ += w[c];
    }
    return concat(steps);
  }

  // Finishes the Lagrangian point from the collected steps with bins in [keep_bin, hi_bin]
  // (all of them present, in group and hull order): takes whole bins while they fit, then
  // the crossing bin steepest first, a slope at a time (ties go together), until a slope no
  // longer fits: that slope is s*. Leaves the rest in `steps` for the fix-up. False when
  // everything collected fits.
  bool finish_lagrangian(std::vector<Step>& steps, int keep_bin, int hi_bin, double& s_star) {
    std::vector<double> bin_bits(hi_bin - keep_bin + 1, 0.0);
    for (const Step& s : steps) {
      const int bin = slope_bin(s.slope);
      if (bin >= keep_bin) bin_bits[bin - keep_bin] += s.dbits;
    }
    int cross = hi_bin;
    for (double t = total_; cross >= keep_bin; --cross) {
      if (t + bin_bits[cross - keep_bin] > p_.budget_bits) break;
      t += bin_bits[cross - keep_bin];
    }
    if (cross < keep_bin) return false;
    // Steeper bins are taken whole; group and hull order leaves each group at its last step.
    std::vector<Step> crossing;
    size_t kept = 0;
    for (const Step& s : steps) {
      const int bin = slope_bin(s.slope);
      if (bin > cross) take(s);
      else if (bin == cross) crossing.push_back(s);
      else steps[kept++] = s;
    }
    steps.resize(kept);
    std::sort(crossing.begin(), crossing.end(), [](const Step& a, const Step& b) { return after(b, a); });
    size_t i = 0;
    while (i < crossing.size()) {
      size_t j = i;
      double add = 0;
      while (j < crossing.size() && crossing[j].slope == crossing[i].slope) add += crossing[j++].dbits;
      if (total_ + add > p_.budget_bits) break;
      for (; i < j; ++i) take(crossing[i]);
    }
    if (i == crossing.size()) return false;  // only by rounding of the bins' sums
    s_star = crossing[i].slope;
    steps.insert(steps.end(), crossing.begin() + i, crossing.end());
    return true;
  }

  // A later fix-up window: increments with slope bins in [lo_bin, hi_bin] that continue a
  // group's current hull point.
  std::vector<Step> window_pass(int lo_bin, int hi_bin) {
    const double slack = filter_slack(p_.budget_bits - total_);
    std::vector<std::vector<Step>> steps(n_chunks_);
    parallel_chunks(n_, kChunk, kSerialBelow, ctl_, nullptr, [&](int64_t b, int64_t e) {
      const int64_t c = b / kChunk;
      Points h;
      for (int64_t g = b; g < e; ++g) {
        group_hull(p_, g, h);
        int k = 0;
        while (h.depth[k] != depth_[g]) ++k;
        if (k + 1 < h.n && slope_bin(h.slope[k + 1]) <= hi_bin)
          collect(h, g, k, -1, lo_bin, slack, steps[c]);
      }
    });
    return concat(steps);
  }

  void take(const Step& s) {
    Points h;
    group_points(p_, s.g, h);  // allowed depths run consecutively from h.depth[0]
    dist_ += h.dist[s.to - h.depth[0]] - h.dist[s.from - h.depth[0]];
    total_ += s.dbits;
    depth_[s.g] = s.to;
  }

  // Takes candidates from the heap steepest first while they fit. A step is live only while
  // its group still sits at the step's starting point, so a group whose next step did not
  // fit stays where it is.
  void fix_up(std::vector<Step>& heap) {
    int64_t polled = 0;
    while (!heap.empty() && p_.budget_bits - total_ >= min_step_) {
      if ((++polled & 0xFFFF) == 0) ctl_.check();
      std::pop_heap(heap.begin(), heap.end(), after);
      const Step s = heap.back();
      heap.pop_back();
      if (depth_[s.g] == s.from && total_ + s.dbits <= p_.budget_bits) take(s);
    }
  }

  struct Bin {
    double bits = 0;
    int64_t count = 0;
  };

  const AllocProblem& p_;
  const Control& ctl_;
  const int64_t n_, n_chunks_;
  int8_t* depth_ = nullptr;
  std::vector<Bin> hist_;
  double min_bits_ = 0, max_bits_ = 0, weights_ = 0, min_step_ = kInf;
  double total_ = 0, dist_ = 0;
};

// ---- reference solver --------------------------------------------------------------------

struct ReferenceSolver {
  const AllocProblem& p;
  std::vector<Points> pts;

  // Index of the point minimising D + lambda * bits; ties (also those made by rounding a
  // tiny distortion away) go to fewer bits, then less distortion. lambda = +inf means
  // "fewest bits".
  int choose(const Points& q, double lambda) const {
    int best = 0;
    for (int i = 1; i < q.n; ++i) {
      const bool better_tie = q.bits[i] < q.bits[best] ||
                              (q.bits[i] == q.bits[best] && q.dist[i] < q.dist[best]);
      if (lambda == kInf) {
        if (better_tie) best = i;
        continue;
      }
      const double vi = q.dist[i] + lambda * q.bits[i], vb = q.dist[best] + lambda * q.bits[best];
      if (vi < vb || (vi == vb && better_tie)) best = i;
    }
    return best;
  }

  double total_at(double lambda) const {
    double t = 0;
    for (const Points& q : pts) t += q.bits[choose(q, lambda)];
    return t;
  }

  // The move with the most distortion saved per bit from point i (ties: the larger move);
  // -1 when no point saves distortion for more bits.
  int best_move(const Points& q, int i, double& slope) const {
    int best = -1;
    for (int j = 0; j < q.n; ++j) {
      if (!(q.bits[j] > q.bits[i] && q.dist[j] < q.dist[i])) continue;
      const double s = (q.dist[i] - q.dist[j]) / (q.bits[j] - q.bits[i]);
      if (best < 0 || s > slope || (s == slope && q.bits[j] > q.bits[best])) best = j, slope = s;
    }
    return best;
  }

  AllocResult run() {
    const int64_t n = p.n_groups;
    pts.resize(n);
    double weights = 0;
    AllocResult r;
    for (int64_t g = 0; g < n; ++g) {
      group_points(p, g, pts[g]);
      weights += (double)p.count[g];
      r.min_bits += pts[g].bits[choose(pts[g], kInf)];
      r.max_bits += pts[g].bits[choose(pts[g], 0.0)];
    }
    check_budget(p, r.min_bits, r.max_bits, weights);
    // Bisection on log2(lambda): total bits fall as lambda grows. hi always fits.
    double lo = -1100, hi = 1100;
    auto lambda_of = [](double x) { return x > 1023 ? kInf : std::exp2(x); };
    if (total_at(0.0) <= p.budget_bits) {
      hi = -kInf;
    } else {
      for (int it = 0; it < 200; ++it) {
        const double mid = 0.5 * (lo + hi);
        if (mid == lo || mid == hi) break;
        (total_at(lambda_of(mid)) <= p.budget_bits ? hi : lo) = mid;
      }
    }
    const double lambda = hi == -kInf ? 0.0 : lambda_of(hi);
    r.log2_lambda = hi;
    std::vector<int> cur(n);
    for (int64_t g = 0; g < n; ++g) {
      cur[g] = choose(pts[g], lambda);
      r.lagrangian_bits += pts[g].bits[cur[g]];
      r.lagrangian_distortion += pts[g].dist[cur[g]];
    }
    // Greedy fix-up: each group's best next move in a priority queue, steepest first.
    struct Move {
      double slope;
      int64_t g;
      int to;
      bool operator<(const Move& o) const {
        return slope < o.slope || (slope == o.slope && g > o.g);
      }
    };
    std::priority_queue<Move> queue;
    auto push = [&](int64_t g) {
      double s = 0;
      const int j = best_move(pts[g], cur[g], s);
      if (j >= 0) queue.push({s, g, j});
    };
    for (int64_t g = 0; g < n; ++g) push(g);
    double total = r.lagrangian_bits;
    while (!queue.empty()) {
      const Move m = queue.top();
      queue.pop();
      const double db = pts[m.g].bits[m.to] - pts[m.g].bits[cur[m.g]];
      if (total + db > p.budget_bits) continue;
      total += db;
      cur[m.g] = m.to;
      push(m.g);
    }
    r.depth.resize(n);
    for (int64_t g = 0; g < n; ++g) {
      r.depth[g] = pts[g].depth[cur[g]];
      r.total_bits += pts[g].bits[cur[g]];
      r.distortion += pts[g].dist[cur[g]];
    }
    return r;
  }
};

}  // namespace

AllocResult allocate_bits(const AllocProblem& p, const Control& ctl) {
  check_problem(p);
  return FastSolver(p, ctl).run();
}

AllocResult allocate_bits_reference(const AllocProblem& p) {
  check_problem(p);
  return ReferenceSolver{p, {}}.run();
}

}  // namespace cvxq
