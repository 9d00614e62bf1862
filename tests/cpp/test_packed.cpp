// The packed format: round trips, kernels against their references under both ISAs, and
// validation of corrupted layers.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "check.hpp"
#include "cvxq/cpu_layout.hpp"
#include "cvxq/dispatch.hpp"
#include "cvxq/packed.hpp"
#include "cvxq/quantize.hpp"

namespace {

using namespace cvxq;

// A random packed layer that owns its arrays.
struct Layer {
  Geometry g;
  std::vector<uint8_t> depth, idx;
  std::vector<uint32_t> offsets, payload;
  std::vector<uint16_t> loc, scale;
  std::vector<float> table;
  std::vector<int32_t> perm;

  Layer(int64_t rows, int64_t cols, int64_t group_rows, unsigned seed, int max_depth = 8) {
    std::mt19937 rng(seed);
    g = make_geometry(rows, cols, group_rows);
    depth.resize(g.n_groups());
    for (auto& d : depth) d = (uint8_t)(rng() % (max_depth + 1));
    idx.assign(g.rows_pad * g.cols, 0);
    for (int64_t r = 0; r < g.rows; ++r)
      for (int64_t j = 0; j < g.cols; ++j)
        idx[r * g.cols + j] = (uint8_t)(rng() & ((1u << depth[(r / group_rows) * cols + j]) - 1));
    offsets.resize(g.n_offsets());
    payload.resize(compute_tile_offsets(g, depth.data(), offsets.data()));
    pack_indices(g, depth.data(), offsets.data(), idx.data(), payload.data());
    std::normal_distribution<float> nd;
    for (int64_t i = 0; i < g.n_groups(); ++i) {
      loc.push_back(float_to_half(0.1f * nd(rng)));
      scale.push_back(float_to_half(std::fabs(0.05f * nd(rng))));
    }
    table.resize(kTableSize);
    for (auto& t : table) t = nd(rng);
    perm.resize(rows);
    for (int64_t i = 0; i < rows; ++i) perm[i] = (int32_t)i;
    std::shuffle(perm.begin(), perm.end(), rng);
  }

  PackedView view() const {
    PackedView v;
    v.geom = g;
    v.depth = depth.data();
    v.tile_offset = offsets.data();
    v.payload = payload.data();
    v.payload_words = (int64_t)payload.size();
    v.loc = loc.data();
    v.scale = scale.data();
    v.table = table.data();
    v.perm = perm.data();
    return v;
  }
};

template <class F>
void for_each_isa(F&& f) {
  const Isa saved = active_isa();
  for (Isa isa : {Isa::Scalar, Isa::AVX2}) {
    if (isa == Isa::AVX2 && !cpu_has_avx2()) continue;
    set_isa(isa);
    f();
  }
  set_isa(saved);
}

bool throws_format_error(const PackedView& v, const char* needle) {
  try {
    validate(v);
  } catch (const FormatError& e) {
    return std::string(e.what()).find(needle) != std::string::npos;
  }
  return false;
}

}  // namespace

CVXQ_TEST(packed_geometry) {
  const Geometry g = make_geometry(100, 33, 64);
  CHECK(g.rows_pad == 128 && g.n_clusters == 2 && g.n_tiles == 2);
  CHECK(g.cluster_rows(0) == 64 && g.cluster_rows(1) == 64);
  CHECK(make_geometry(200, 1, 96).cluster_rows(2) == 32);
  CHECK_THROWS(make_geometry(0, 4, 32), ShapeError);
  CHECK_THROWS(make_geometry(4, 4, 48), ShapeError);
  CHECK_THROWS(make_geometry(4, 4, 8192), ShapeError);
}

CVXQ_TEST(packed_offsets_follow_the_depths) {
  const Geometry g = make_geometry(64, 40, 32);  // 2 clusters x 2 tiles (32 + 8 columns)
  std::vector<uint8_t> depth(g.n_groups(), 1);
  depth[0] = 3;      // cluster 0, column 0
  depth[40 + 39] = 8;  // cluster 1, column 39
  std::vector<uint32_t> off(g.n_offsets());
  const int64_t total = compute_tile_offsets(g, depth.data(), off.data());
  CHECK(off[0] == 0 && off[1] == 34 && off[2] == 42 && off[3] == 74);
  CHECK(total == 74 + 7 + 8 && off[4] == total);
  depth[5] = 9;
  CHECK_THROWS(compute_tile_offsets(g, depth.data(), off.data()), ValueError);
}

CVXQ_TEST(packed_bit_planes_match_the_layout) {
  // One 32-row group at depth 2: word p bit i = bit p of row i's index.
  const Geometry g = make_geometry(32, 1, 32);
  std::vector<uint8_t> depth{2}, idx(32);
  for (int i = 0; i < 32; ++i) idx[i] = (uint8_t)(i % 4);
  std::vector<uint32_t> off(2), payload(2);
  CHECK(compute_tile_offsets(g, depth.data(), off.data()) == 2);
  pack_indices(g, depth.data(), off.data(), idx.data(), payload.data());
  CHECK(payload[0] == 0xaaaaaaaau && payload[1] == 0xccccccccu);
}

CVXQ_TEST(packed_round_trip_all_shapes) {
  for (int64_t rows : {1, 31, 33, 100, 300})
    for (int64_t cols : {1, 5, 32, 70})
      for (int64_t gr : {32, 96, 256}) {
        Layer L(rows, cols, gr, (unsigned)(rows * 1000 + cols * 10 + gr));
        std::vector<uint8_t> a(L.idx.size(), 0xff), b(L.idx.size(), 0xff);
        unpack_indices(L.view(), a.data());
        unpack_indices_reference(L.view(), b.data());
        CHECK(a == L.idx && b == L.idx);
      }
}

CVXQ_TEST(packed_pack_rejects_out_of_range_index) {
  Layer L(64, 8, 32, 7);
  L.depth[3] = 2;
  compute_tile_offsets(L.g, L.depth.data(), L.offsets.data());
  L.idx[5 * 8 + 3] = 4;
  bool named = false;
  try {
    pack_indices(L.g, L.depth.data(), L.offsets.data(), L.idx.data(), L.payload.data());
  } catch (const ValueError& e) {
    named = std::string(e.what()).find("(cluster 0, column 3)") != std::string::npos;
  }
  CHECK(named);
}

CVXQ_TEST(packed_dequantize_is_bitwise_reference) {
  for (int max_depth : {3, 8}) {
    Layer L(300, 77, 64, 11 + max_depth, max_depth);
    const PackedView v = L.view();
    std::vector<float> ref(300 * 77), fast(300 * 77);
    dequantize_reference(v, ref.data());
    // Recompute one weight literally from the layout definition.
    const int64_t r = 250, j = 70, c = r / 64;
    const float expect = half_to_float(L.loc[c * 77 + j]) +
                         half_to_float(L.scale[c * 77 + j]) *
                             L.table[table_offset(L.depth[c * 77 + j]) + L.idx[r * 77 + j]];
    CHECK(ref[L.perm[r] * 77 + j] == expect);
    for_each_isa([&] {
      dequantize(v, fast.data());
      CHECK(std::memcmp(ref.data(), fast.data(), ref.size() * 4) == 0);
    });
  }
}

CVXQ_TEST(packed_matmul_matches_reference) {
  Layer L(200, 100, 64, 5);
  const PackedView v = L.view();
  for (int64_t batch : {1, 3, 16, 17}) {
    std::mt19937 rng((unsigned)batch);
    std::normal_distribution<float> nd;
    std::vector<float> x(batch * 100), ref(batch * 200), y(batch * 200);
    for (auto& e : x) e = nd(rng);
    matmul_reference(v, x.data(), batch, ref.data());
    for_each_isa([&] {
      matmul(v, x.data(), batch, y.data());
      for (size_t i = 0; i < y.size(); ++i)
        CHECK(std::fabs(y[i] - ref[i]) <= 1e-4f * (1 + std::fabs(ref[i])));
    });
  }
}

CVXQ_TEST(packed_validate_rejects_corruption) {
  Layer L(100, 40, 32, 3);
  validate(L.view());
  {
    PackedView v = L.view();
    v.payload_words -= 1;
    CHECK(throws_format_error(v, "truncated"));
  }
  {
    Layer M = L;
    M.offsets[3] += 1;
    CHECK(throws_format_error(M.view(), "tile offset 1 of cluster 1"));
  }
  {
    Layer M = L;
    M.depth[7] = 9;
    CHECK(throws_format_error(M.view(), "above 8"));
    std::vector<float> out(100 * 40);
    CHECK_THROWS(dequantize(M.view(), out.data()), FormatError);
  }
  {
    Layer M = L;
    M.depth[7] = (uint8_t)(M.depth[7] == 8 ? 7 : M.depth[7] + 1);
    CHECK(throws_format_error(M.view(), "expected"));
  }
  {
    Layer M = L;
    M.perm[4] = M.perm[9];
    CHECK(throws_format_error(M.view(), "repeats"));
    M.perm[4] = 100;
    CHECK(throws_format_error(M.view(), "outside"));
  }
  {
    Layer M = L;
    M.table[300] = NAN;
    CHECK(throws_format_error(M.view(), "table entry 300"));
  }
  {
    PackedView v = L.view();
    v.geom.n_clusters += 1;
    CHECK(throws_format_error(v, "inconsistent geometry"));
    v = L.view();
    v.geom.group_rows = 40;
    CHECK(throws_format_error(v, "group_rows"));
  }
}

CVXQ_TEST(packed_half_conversion) {
  // Every half that is not NaN survives half -> float -> half.
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = half_to_float((uint16_t)h);
    if (std::isnan(f)) {
      CHECK(std::isnan(half_to_float(float_to_half(f))));
      continue;
    }
    CHECK(float_to_half(f) == h);
  }
  CHECK(float_to_half(65520.0f) == 0x7c00);           // tie at the top rounds to inf
  CHECK(float_to_half(65519.0f) == 0x7bff);
  CHECK(float_to_half(std::ldexp(1.0f, -25)) == 0);   // tie between 0 and 2^-24 -> even
  CHECK(float_to_half(std::ldexp(1.5f, -25)) == 1);
}

CVXQ_TEST(packed_nibbles) {
  const std::vector<uint8_t> d{1, 8, 0, 15, 3};
  std::vector<uint8_t> packed(3), back(5);
  pack_nibbles(d.data(), 5, packed.data());
  CHECK(packed[0] == 0x81 && packed[1] == 0xf0 && packed[2] == 0x03);
  unpack_nibbles(packed.data(), 5, back.data());
  CHECK(back == d);
  const uint8_t bad = 16;
  CHECK_THROWS(pack_nibbles(&bad, 1, packed.data()), ValueError);
}

CVXQ_TEST(packed_mutations_are_rejected_not_read) {
  // Run under CVXQ_SANITIZE: any out-of-bounds read of a corrupted layer fails here.
  const Layer L(90, 70, 64, 21, 5);
  std::mt19937 rng(3);
  std::vector<float> out(90 * 70), x(2 * 70, 1.0f), y(2 * 90);
  std::vector<uint8_t> idx(L.idx.size());
  int rejected = 0;
  for (int it = 0; it < 200; ++it) {
    Layer M = L;
    switch (it % 4) {
      case 0: M.depth[rng() % M.depth.size()] = (uint8_t)rng(); break;
      case 1: M.offsets[rng() % M.offsets.size()] = (uint32_t)rng() % 2000; break;
      case 2:  // exact-size copy so the sanitizer sees the end of the allocation
        M.payload = std::vector<uint32_t>(L.payload.begin(),
                                          L.payload.begin() + rng() % L.payload.size());
        break;
      default: M.perm[rng() % 90] = (int32_t)(rng() % 100) - 5; break;
    }
    try {
      dequantize(M.view(), out.data());
      matmul(M.view(), x.data(), 2, y.data());
      unpack_indices(M.view(), idx.data());
      dequantize_reference(M.view(), out.data());
    } catch (const FormatError&) {
      ++rejected;
    }
  }
  CHECK(rejected >= 150);  // only a perm mutation to a value it already had can pass
}

// The CPU tiling (cpu_layout.hpp): decodes bit for bit to the reference and its products
// match the reference on both ISAs, for ragged shapes and every depth (run under the
// sanitizers too: the kernels read whole registers at run and buffer ends).
CVXQ_TEST(cpu_layout_matches_the_references) {
  struct Shape { int64_t rows, cols, group_rows; int max_depth; };
  for (const Shape& sh : {Shape{1, 1, 32, 0}, Shape{33, 5, 32, 8}, Shape{300, 77, 96, 8},
                          Shape{200, 301, 64, 4}, Shape{100, 9, 4096, 8}, Shape{64, 1000, 64, 2}}) {
    Layer L(sh.rows, sh.cols, sh.group_rows, (unsigned)(sh.rows + sh.cols), sh.max_depth);
    const PackedView v = L.view();
    const cpu::CpuLayout T = cpu::build_layout(v);
    const size_t n = (size_t)(sh.rows * sh.cols);
    std::vector<float> ref(n), got(n, -1.0f), dense(n, -1.0f);
    dequantize_reference(v, ref.data());
    cpu::dequantize(T, got.data());
    cpu::dense_reference(T, dense.data());
    CHECK(std::memcmp(ref.data(), got.data(), n * 4) == 0);
    CHECK(std::memcmp(ref.data(), dense.data(), n * 4) == 0);
    for (int64_t batch : {1, 2, 5, 8, 9, 17}) {
      std::mt19937 rng((unsigned)batch);
      std::normal_distribution<float> nd;
      std::vector<float> x(batch * sh.cols), yr(batch * sh.rows), y(batch * sh.rows);
      for (auto& e : x) e = nd(rng);
      matmul_reference(v, x.data(), batch, yr.data());
      for_each_isa([&] {
        cpu::matmul(T, x.data(), batch, y.data());
        for (size_t i = 0; i < y.size(); ++i)
          CHECK(std::fabs(y[i] - yr[i]) <= 1e-4f * (1 + std::fabs(yr[i])));
      });
    }
  }
}

CVXQ_TEST(cpu_layout_rejects_corrupt_layers) {
  Layer L(100, 40, 32, 3);
  PackedView v = L.view();
  v.payload_words -= 1;
  CHECK_THROWS(cpu::build_layout(v), FormatError);
  std::vector<float> x(40), y(100);
  const cpu::CpuLayout T = cpu::build_layout(L.view());
  CHECK_THROWS(cpu::matmul(T, x.data(), 0, y.data()), ShapeError);
}
