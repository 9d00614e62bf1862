// The GPU tiling of gpu_layout.hpp: built on the host from a validated packed layer.
#include "cvxq/gpu_layout.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "cvxq/common.hpp"
#include "cvxq/packed.hpp"

namespace cvxq {
namespace gpu {

namespace {

struct Job {
  uint64_t payload_off;
  uint64_t rec_off;
  int64_t row0;
  int units, ns, depth;
};

// Row chunks of a cluster of `slices` slices: 4 while at least 4 remain, then 2, then 1.
template <class F>
void for_each_chunk(int64_t slices, F&& f) {
  int64_t s = 0;
  for (int ns : {4, 2, 1})
    while (slices - s >= ns) {
      f(s, ns);
      s += ns;
    }
}

// Word offset of every group (c, j) of the layer.
std::vector<uint64_t> group_offsets(const PackedView& v) {
  const Geometry& g = v.geom;
  std::vector<uint64_t> off((size_t)g.n_groups());
  for (int64_t c = 0; c < g.n_clusters; ++c) {
    const uint64_t slices = (uint64_t)g.cluster_slices(c);
    for (int64_t t = 0; t < g.n_tiles; ++t) {
      uint64_t at = v.tile_offset[c * g.n_tiles + t];
      for (int64_t j = t * kTileCols; j < std::min(g.cols, (t + 1) * kTileCols); ++j) {
        off[(size_t)(c * g.cols + j)] = at;
        at += v.depth[c * g.cols + j] * slices;
      }
    }
  }
  return off;
}

}  // namespace

GpuLayout build_layout(const PackedView& v, int64_t units_per_job) {
  const Geometry& g = v.geom;
  if (units_per_job < 1) units_per_job = 1;
  GpuLayout L;
  L.singles.resize(kTableSize);
  for (int i = 0; i < kTableSize; ++i) L.singles[i] = float_to_half(v.table[i]);
  L.pairs.resize(kPairTableSize);
  for (int B = 1; B <= kPairDepths; ++B)
    for (int e = 0; e < (1 << (2 * B)); ++e) {
      const int k0 = e & ((1 << B) - 1), k1 = e >> B;
      L.pairs[pair_offset(B) + e] =
          L.singles[table_offset(B) + k0] | (uint32_t)L.singles[table_offset(B) + k1] << 16;
    }

  // Columns of each (depth, cluster), in column order; records and jobs in (depth, cluster,
  // row chunk) order.
  std::vector<Job> jobs;
  std::vector<std::vector<int64_t>> cols_of((size_t)(9 * g.n_clusters));
  for (int64_t c = 0; c < g.n_clusters; ++c)
    for (int64_t j = 0; j < g.cols; ++j) cols_of[(size_t)(v.depth[c * g.cols + j] * g.n_clusters + c)].push_back(j);
  uint64_t rec = 0, words = 0;
  std::vector<uint64_t> seg_rec((size_t)(9 * g.n_clusters));
  for (int d = 0; d <= 8; ++d)
    for (int64_t c = 0; c < g.n_clusters; ++c) {
      const auto& cols = cols_of[(size_t)(d * g.n_clusters + c)];
      seg_rec[(size_t)(d * g.n_clusters + c)] = rec;
      rec += (cols.size() + 31) / 32 * 32;
    }
  for (int d = 0; d <= 8; ++d) {
    L.job_begin[d] = (int64_t)jobs.size();
    for (int si = 0; si < 3; ++si) {  // segments of 4-, 2- and 1-slice chunks
      const int want_ns = 4 >> si;
      L.seg_begin[3 * d + si] = (int64_t)jobs.size();
      for (int64_t c = 0; c < g.n_clusters; ++c) {
        const auto& cols = cols_of[(size_t)(d * g.n_clusters + c)];
        if (cols.empty()) continue;
        const uint64_t rec0 = seg_rec[(size_t)(d * g.n_clusters + c)];
        for_each_chunk(g.cluster_slices(c), [&](int64_t s0, int ns) {
          if (ns != want_ns) return;
          const int bpu = d == 0 ? 1 : 4 / ns;  // blocks per unit
          const int64_t units = ((int64_t)cols.size() + 8 * bpu - 1) / (8 * bpu);
          const int64_t n = (units + units_per_job - 1) / units_per_job;
          for (int64_t k = 0; k < n; ++k) {
            const int64_t u0 = units * k / n, u1 = units * (k + 1) / n;
            Job jb;
            jb.payload_off = words;
            jb.rec_off = rec0 + (uint64_t)(u0 * bpu * 8);
            jb.row0 = c * g.group_rows + s0 * kSliceRows;
            jb.units = (int)(u1 - u0);
            jb.ns = ns;
            jb.depth = d;
            words += (uint64_t)(u1 - u0) * 32 * d;
            jobs.push_back(jb);
          }
        });
      }
    }
  }
  L.seg_begin[27] = (int64_t)jobs.size();
  L.job_begin[9] = (int64_t)jobs.size();
  if (words > std::numeric_limits<uint32_t>::max() || rec > std::numeric_limits<uint32_t>::max() / 2 ||
      g.rows_pad > std::numeric_limits<int32_t>::max() || g.cols > std::numeric_limits<int32_t>::max())
    throw ValueError("layer too large for the GPU tiling (" + std::to_string(words) +
                     " payload words): split the layer");

  L.records.assign(2 * rec, 0);
  for (int64_t i = 0; i < (int64_t)rec; ++i) L.records[2 * i] = 0xffffffffu;  // empty slots
  for (int d = 0; d <= 8; ++d)
    for (int64_t c = 0; c < g.n_clusters; ++c) {
      const auto& cols = cols_of[(size_t)(d * g.n_clusters + c)];
      const uint64_t r0 = seg_rec[(size_t)(d * g.n_clusters + c)];
      for (size_t i = 0; i < cols.size(); ++i) {
        const int64_t gi = c * g.cols + cols[i];
        L.records[2 * (r0 + i)] = (uint32_t)cols[i];
        L.records[2 * (r0 + i) + 1] = v.scale[gi] | (uint32_t)v.loc[gi] << 16;
      }
    }

  L.jobs.resize(4 * jobs.size());
  for (size_t i = 0; i < jobs.size(); ++i) {
    const Job& jb = jobs[i];
    L.jobs[4 * i] = (uint32_t)jb.payload_off;
    L.jobs[4 * i + 1] = (uint32_t)jb.rec_off;
    L.jobs[4 * i + 2] = (uint32_t)jb.row0;
    L.jobs[4 * i + 3] = (uint32_t)jb.units | (uint32_t)jb.ns << 16 | (uint32_t)jb.depth << 24;
  }

  // The payload: every job's units, lane streams as gpu_layout.hpp describes.
  L.payload.assign(words + kPayloadPad, 0);
  const std::vector<uint64_t> goff = group_offsets(v);
  const int64_t n_jobs = (int64_t)jobs.size();
  Control ctl;
  parallel_chunks(n_jobs, 16, 64, ctl, "gpu layout", [&](int64_t j0, int64_t j1) {
    uint8_t idx[32][4 * kSliceRows];  // [slot in unit][row in chunk]
    for (int64_t ji = j0; ji < j1; ++ji) {
      const Job& jb = jobs[(size_t)ji];
      const int B = jb.depth, ns = jb.ns;
      if (B == 0) continue;
      const int bpu = 4 / ns;
      const int64_t c = jb.row0 / g.group_rows;
      const int64_t s0 = (jb.row0 - c * g.group_rows) / kSliceRows;
      for (int u = 0; u < jb.units; ++u) {
        // Indices of the unit's slots, rows of the chunk.
        for (int slot = 0; slot < 8 * bpu; ++slot) {
          const uint32_t col = L.records[2 * (jb.rec_off + (uint64_t)u * bpu * 8 + slot)];
          std::fill(idx[slot], idx[slot] + 4 * kSliceRows, 0);
          if (col == 0xffffffffu) continue;
          const uint64_t base = goff[(size_t)(c * g.cols + col)];
          for (int s = 0; s < ns; ++s)
            for (int p = 0; p < B; ++p) {
              const uint32_t w = v.payload[base + (uint64_t)(s0 + s) * B + p];
              for (int i = 0; i < kSliceRows; ++i) idx[slot][s * kSliceRows + i] |= ((w >> i) & 1u) << p;
            }
        }
        uint32_t* out = L.payload.data() + jb.payload_off + (uint64_t)u * 32 * B;
        for (int lane = 0; lane < 32; ++lane) {
          const int gq = lane >> 2, t = lane & 3;
          uint32_t w[9] = {};
          for (int m = 0; m < 4; ++m)
            for (int f = 0; f < 4; ++f) {
              const int slot = (m / ns) * 8 + t + 4 * (f >> 1);
              const int r = (m % ns) * kSliceRows + 4 * gq + 2 * (f & 1);
              const uint32_t val = idx[slot][r] | (uint32_t)idx[slot][r + 1] << B;
              const int P = 2 * B * (4 * m + f);
              w[P >> 5] |= val << (P & 31);
              if ((P & 31) + 2 * B > 32) w[(P >> 5) + 1] |= val >> (32 - (P & 31));
            }
          for (int p = 0; p < B; ++p) out[32 * p + lane] = w[p];
        }
      }
    }
  });
  return L;
}

void layout_dense_reference(const GpuLayout& L, const Geometry& g, const int32_t* perm, float* out) {
  for (int64_t ji = 0; ji < L.n_jobs(); ++ji) {
    const uint32_t* jw = L.jobs.data() + 4 * ji;
    const int units = (int)(jw[3] & 0xffff), ns = (int)((jw[3] >> 16) & 0xff), B = (int)(jw[3] >> 24);
    const int64_t row0 = jw[2];
    auto put = [&](int64_t row, uint32_t slot, int k) {
      const uint32_t col = L.records[2 * slot];
      if (col == 0xffffffffu || row >= g.rows) return;
      const uint32_t sl = L.records[2 * slot + 1];
      const float scale = half_to_float((uint16_t)(sl & 0xffff)), loc = half_to_float((uint16_t)(sl >> 16));
      const float t = half_to_float(L.singles[table_offset(B) + k]);
      const int64_t orig = perm ? perm[row] : row;
      out[orig * g.cols + col] = loc + scale * t;
    };
    if (B == 0) {
      for (int u = 0; u < units; ++u)
        for (int slot = 0; slot < 8; ++slot)
          for (int r = 0; r < ns * kSliceRows; ++r) put(row0 + r, jw[1] + (uint32_t)(u * 8 + slot), 0);
      continue;
    }
    const int bpu = 4 / ns;
    for (int u = 0; u < units; ++u)
      for (int lane = 0; lane < 32; ++lane) {
        const int gq = lane >> 2, t = lane & 3;
        uint64_t w[9] = {};
        for (int p = 0; p < B; ++p) w[p] = L.payload[jw[0] + (uint64_t)u * 32 * B + 32 * p + lane];
        for (int m = 0; m < 4; ++m)
          for (int f = 0; f < 4; ++f) {
            const int P = 2 * B * (4 * m + f);
            const uint64_t both = w[P >> 5] | w[(P >> 5) + 1] << 32;
            const uint32_t val = (uint32_t)(both >> (P & 31)) & ((1u << (2 * B)) - 1);
            const uint32_t slot = jw[1] + (uint32_t)((u * bpu + m / ns) * 8 + t + 4 * (f >> 1));
            const int64_t r = row0 + (m % ns) * kSliceRows + 4 * gq + 2 * (f & 1);
            put(r, slot, (int)(val & ((1u << B) - 1)));
            put(r + 1, slot, (int)(val >> B));
          }
      }
  }
}

}  // namespace gpu
}  // namespace cvxq
