// The GPU tiling of a packed layer: the same index bits as format.hpp, re-ordered on load so
// that the CUDA product kernel (core/cuda) reads them with coalesced loads and decodes each
// pair of weights with two integer instructions and one shared-memory lookup, feeding
// tensor-core MMAs (m16n8k16, fp16 inputs, fp32 accumulation).
//
// Plain C++ (no CUDA): built and tested on every machine; the kernel only reads it.
//
// Work is cut into jobs. A job covers NS (1, 2 or 4) consecutive 32-row slices of one
// cluster c, starting at storage row row0, and a run of that cluster's columns of one depth
// B. Within a cluster the columns of each depth are listed in column order and padded to a
// multiple of 32 with empty slots (column -1, scale 0, loc 0); `records` holds one slot per
// listed column: {column, scale | loc << 16} (float16 bits). A block is 8 slots; a unit is
// 4 MMAs = 4 / NS blocks x NS slices. Lane l of a warp (g = l / 4, t = l % 4) takes, in
// MMA m of a unit (block m / NS, slice m % NS), the index pairs
//     f = 0: column t,     rows 4g, 4g+1     f = 1: column t,     rows 4g+2, 4g+3
//     f = 2: column t + 4, rows 4g, 4g+1     f = 3: column t + 4, rows 4g+2, 4g+3
// of its block, each pair as k(even row) | k(odd row) << B (2B bits), at bit 2B (4m + f) of
// the lane's 32B-bit stream for the unit. The lane's B words of unit u are at
//     payload[payload_off + 32 B u + 32 p + l],  p < B,
// so every warp load reads 128 consecutive bytes. Padding slots hold index 0.
// Depth-0 columns have no payload: their jobs only add loc * x (units = blocks).
//
// Jobs are sorted by depth, then by NS (4, 2, 1): those of depth d are jobs
// [job_begin[d], job_begin[d + 1]), and segment 3 d + i (NS = 4 >> i) of them is
// [seg_begin[3 d + i], seg_begin[3 d + i + 1]). Within a segment, the jobs of one row chunk
// (same cluster, same row0) are consecutive and their payload and records are contiguous:
// job k + 1 starts where job k ends (payload_off + 32 B units, rec_off + 8 (4 / NS) units),
// so the kernel can stream a run of jobs with equal row0 as one sequence of units.
// Job record (4 words): payload_off, rec_off (first slot of the job's first block), row0,
// units | NS << 16 | B << 24.
#pragma once
#include <cstdint>
#include <vector>

#include "cvxq/format.hpp"

namespace cvxq {
namespace gpu {

constexpr int kPairDepths = 4;
// Zero words after the last job's payload: the kernel's decode path reads up to 7 units past
// the end of a run (3 to finish its last batch of 4 units, 4 of prefetch) and discards
// them, so no load needs a bounds check: 7 units x 8 words x 32 lanes fit.
constexpr int kPayloadPad = 2048;  // depths 1..4 use pair tables, deeper ones single tables
// Offset of depth B's pair table in GpuLayout::pairs: 4 + 16 + ... + 4^(B-1).
inline constexpr int pair_offset(int depth) { return ((1 << (2 * depth)) - 4) / 3; }
constexpr int kPairTableSize = pair_offset(kPairDepths + 1);  // 340

struct GpuLayout {
  std::vector<uint32_t> payload;
  std::vector<uint32_t> jobs;     // 4 words per job
  std::vector<uint32_t> records;  // 2 words per column slot
  // Pair tables of depths 1..4: entry (k0 | k1 << B) is float16 T[k0] | float16 T[k1] << 16.
  std::vector<uint32_t> pairs;
  // float16 bits of the whole table (format.hpp's 511 entries, depths 0..8).
  std::vector<uint16_t> singles;
  int64_t job_begin[10] = {};
  int64_t seg_begin[28] = {};
  int64_t n_jobs() const { return (int64_t)jobs.size() / 4; }
};

// Builds the tiling of a validated layer. Jobs get about units_per_job units (a unit is
// 1024 weights), >= 1. Throws ValueError if the result needs offsets beyond 32 bits.
GpuLayout build_layout(const PackedView& v, int64_t units_per_job);

// Plain reference decode of a tiling back to a dense matrix [rows, cols] in original row
// order (perm applied): loc + scale * T with T the float16 table values, rounded as
// dequantize() rounds. Visits every payload bit through the job list, so it checks the
// tiling end to end. For tests.
void layout_dense_reference(const GpuLayout& L, const Geometry& g, const int32_t* perm, float* out);

}  // namespace gpu
}  // namespace cvxq
