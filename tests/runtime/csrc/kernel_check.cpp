// The vector path of sensiquant/runtime/csrc/packed_core.h against its portable loops, without libtorch: built
// with -DSQ_STANDALONE for this CPU, or cross-compiled (aarch64: NEON) and run under an emulator, by
// tests/runtime/test_kernel_isas.py. Seeded random layers of 2/3/4/8-bit codes in the kernel layout, FP16 and 8-bit
// scales/zeros, CSR outliers, 1-4 rows of x (and x rounded to int8, act8): GEMV within the fp32 rounding bound of
// the portable result, dense dequantization to fp32/fp16/bf16 bit-equal. Prints "isa: NAME", one line per failure, then "N passed, M failed".

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "packed_core.h"

namespace {

int passed = 0, failed = 0;

void report(bool ok, const std::string& what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAILED %s\n", what.c_str());
  }
}

// 32 codes -> 4 * bits bytes, the layout documented in packed_kernels.cpp
void pack_block(int bits, const int* c, uint8_t* out) {
  if (bits == 8) {
    for (int i = 0; i < 32; ++i) out[i] = static_cast<uint8_t>(c[i]);
  } else if (bits == 4) {
    for (int i = 0; i < 16; ++i) out[i] = static_cast<uint8_t>(c[i] | c[i + 16] << 4);
  } else {
    for (int i = 0; i < 8; ++i)
      out[i] = static_cast<uint8_t>((c[i] & 3) | (c[i + 8] & 3) << 2 | (c[i + 16] & 3) << 4 | (c[i + 24] & 3) << 6);
    if (bits == 3) {
      uint32_t h = 0;
      for (int i = 0; i < 32; ++i) h |= static_cast<uint32_t>((c[i] >> 2) & 1) << i;
      std::memcpy(out + 8, &h, 4);
    }
  }
}

struct Layer {
  Geometry geo;
  int bits;
  std::vector<uint8_t> codes;
  std::vector<int> q;  // (N, K) codes, for the bound
  std::vector<at::Half> scale, zero, qscale, qzero;
  std::vector<uint8_t> scale8, zero8;
  std::vector<float> out_delta;  // outlier corrections (see Outliers)
  std::vector<int32_t> out_col;
  std::vector<int64_t> out_ptr;
  std::vector<float> bias;
  Meta s, z;
  Outliers out;
  Layer(int64_t n, int64_t k, int64_t gs, int b) : geo(n, k, gs), bits(b) {}
  Layer(const Layer&) = delete;  // s, z and out point into the vectors above
};

void fill_layer(Layer& L, std::mt19937& rng, bool meta8, double outlier_rate) {
  const Geometry& geo = L.geo;
  const int64_t N = geo.N, K = geo.K;
  const int bits = L.bits;
  std::uniform_int_distribution<int> code(0, (1 << bits) - 1);
  std::uniform_real_distribution<float> unit(0.f, 1.f);
  std::normal_distribution<float> normal(0.f, 1.f);
  const int64_t row_bytes = geo.blocks * 4 * bits;
  L.codes.assign(N * row_bytes, 0);
  L.q.assign(N * K, 0);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < geo.G; ++g) {
      for (int64_t b = 0; b < geo.nblocks(g); ++b) {
        int c[32] = {};
        for (int i = 0; i < 32; ++i) {
          const int64_t col = g * geo.gs + b * kBlock + i;
          if (b * kBlock + i < geo.width(g)) {
            c[i] = code(rng);
            L.q[n * K + col] = c[i];
          }
        }
        pack_block(bits, c, L.codes.data() + n * row_bytes + (geo.block_start(g) + b) * 4 * bits);
      }
    }
  }
  const int64_t entries = N * geo.G;
  const float levels = static_cast<float>((1 << bits) - 1);
  if (meta8) {
    const int64_t group = 16, n_meta = (entries + group - 1) / group;
    L.scale8.resize(entries);
    L.zero8.resize(entries);
    for (auto& v : L.scale8) v = static_cast<uint8_t>(rng() % 256);
    for (auto& v : L.zero8) v = static_cast<uint8_t>(rng() % 256);
    for (int64_t j = 0; j < 2 * n_meta; ++j) {
      L.qscale.push_back(at::Half(0.02f / 255.f * (0.5f + unit(rng))));  // scales in (0.01, 0.03)
      L.qzero.push_back(at::Half(-20.f * unit(rng)));                    // >= 0 after decoding
    }
    // scale metadata first half of qscale/qzero, zero metadata second half
    L.s.codes = L.scale8.data();
    L.s.qscale = L.qscale.data();
    L.s.qzero = L.qzero.data();
    L.s.group = group;
    L.z.codes = L.zero8.data();
    L.z.qscale = L.qscale.data() + n_meta;
    L.z.qzero = L.qzero.data() + n_meta;
    L.z.group = group;
    for (int64_t j = 0; j < n_meta; ++j) L.qscale[n_meta + j] = at::Half(levels / 255.f);  // zeros in [0, levels]
    for (int64_t j = 0; j < n_meta; ++j) L.qzero[n_meta + j] = at::Half(0.f);
  } else {
    for (int64_t j = 0; j < entries; ++j) {
      L.scale.push_back(at::Half(0.01f + 0.02f * unit(rng)));
      L.zero.push_back(at::Half(levels * unit(rng)));
    }
    L.s.half = L.scale.data();
    L.z.half = L.zero.data();
  }
  L.out_ptr.push_back(0);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      if (unit(rng) < outlier_rate) {
        L.out_col.push_back(static_cast<int32_t>(k));
        L.out_delta.push_back(normal(rng));
      }
    }
    L.out_ptr.push_back(static_cast<int64_t>(L.out_col.size()));
  }
  if (!L.out_delta.empty()) {
    L.out.delta = L.out_delta.data();
    L.out.col = Index{L.out_col.data(), at::kInt};
    L.out.ptr = Index{L.out_ptr.data(), at::kLong};
  }
  for (int64_t n = 0; n < N; ++n) L.bias.push_back(normal(rng));
}

// act8: x rounded to int8 per block (prepare_x_q8); both paths then compute the GEMV of that rounded x
void check_gemv(std::mt19937& rng, const Layer& L, int64_t M, const std::string& name, bool act8 = false) {
  const Geometry& geo = L.geo;
  const int64_t Kp = geo.padded(), N = geo.N, K = geo.K;
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(M * K), xp(M * Kp, 0.f), xsum(M * geo.G), y_gen(M * N), y_vec(M * N), xd(M * geo.blocks);
  std::vector<int8_t> xq(M * Kp);
  for (auto& v : x) v = normal(rng);
  if (act8) {
    prepare_x_q8(x.data(), M, geo, xp.data(), xsum.data(), xq.data(), xd.data());
    for (int64_t m = 0; m < M; ++m)  // the bound below reads x: the rounded x the kernels compute with
      for (int64_t k = 0; k < K; ++k) x[m * K + k] = xp[m * Kp + geo.position(k)];
  } else {
    prepare_x(x.data(), M, geo, xp.data(), xsum.data());
  }
  for (int generic = 1; generic >= 0; --generic) {
    g_force_generic.store(generic == 1);
    GemvCtx c{geo, L.codes.data(), geo.blocks * 4 * L.bits, L.s, L.z, L.out, xp.data(), nullptr,
              xsum.data(), L.bias.data(), generic ? y_gen.data() : y_vec.data(), M,
              act8 ? xq.data() : nullptr, act8 ? xd.data() : nullptr};
    gemv_dispatch(L.bits, c, 0, N);
  }
  g_force_generic.store(false);
  // both sum the same terms in another order: within 2 gamma_(K+8) sum |terms| (see tests/runtime/test_kernels.py)
  std::vector<float> s(geo.G), z(geo.G);
  double worst = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    L.s.decode_range(n * geo.G, geo.G, s.data());
    L.z.decode_range(n * geo.G, geo.G, z.data());
    for (int64_t m = 0; m < M; ++m) {
      double bound = std::fabs(L.bias[n]);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t g = std::min(k / geo.gs, geo.G - 1);
        bound += std::fabs(x[m * K + k]) * ((L.q[n * K + k] + std::fabs(z[g]) + 16.0) * std::fabs(s[g]));
      }
      for (int64_t j = L.out_ptr[n]; j < L.out_ptr[n + 1]; ++j)
        bound += std::fabs(x[m * K + L.out_col[j]]) * std::fabs(L.out_delta[j]);
      const double u = std::ldexp(1.0, -24), nk = static_cast<double>(K + 8);
      const double tol = 2 * 2 * (nk * u / (1 - nk * u)) * bound;
      const double err = std::fabs(static_cast<double>(y_vec[m * N + n]) - y_gen[m * N + n]);
      worst = std::max(worst, err / tol);
    }
  }
  report(worst <= 1.0, name + (act8 ? " act8" : "") + " gemv M=" + std::to_string(M) + " error/bound " +
                          std::to_string(worst));
}

template <typename T>
void check_dequant(const Layer& L, const std::string& name, const char* dtype) {
  const Geometry& geo = L.geo;
  std::vector<T> w_gen(geo.N * geo.K), w_vec(geo.N * geo.K);
  const int64_t rb = geo.blocks * 4 * L.bits;
  for (int generic = 1; generic >= 0; --generic) {
    g_force_generic.store(generic == 1);
    T* w = generic ? w_gen.data() : w_vec.data();
    switch (L.bits) {
      case 2: dequant_rows<2, T>(geo, L.codes.data(), rb, L.s, L.z, L.out, w, 0, geo.N); break;
      case 3: dequant_rows<3, T>(geo, L.codes.data(), rb, L.s, L.z, L.out, w, 0, geo.N); break;
      case 4: dequant_rows<4, T>(geo, L.codes.data(), rb, L.s, L.z, L.out, w, 0, geo.N); break;
      default: dequant_rows<8, T>(geo, L.codes.data(), rb, L.s, L.z, L.out, w, 0, geo.N); break;
    }
  }
  g_force_generic.store(false);
  report(std::memcmp(w_gen.data(), w_vec.data(), w_gen.size() * sizeof(T)) == 0,
         name + " dequant " + dtype + " bit-equal");
}

}  // namespace

int main() {
  std::printf("isa: %s\n", kIsa);
  std::mt19937 rng(1234);
  struct Shape {
    int64_t N, K, gs;
  };
  // full groups, a group width not a multiple of 32 (zero-padded blocks), a tail group, one group per row
  const Shape shapes[] = {{37, 192, 64}, {16, 200, 80}, {9, 130, 64}, {5, 96, 1 << 20}};
  for (int bits : {2, 3, 4, 8}) {
    for (const Shape& sh : shapes) {
      for (bool meta8 : {false, true}) {
        const std::string name = std::to_string(bits) + "-bit " + std::to_string(sh.N) + "x" + std::to_string(sh.K) +
                                 " g" + std::to_string(sh.gs) + (meta8 ? " meta8" : " fp16 meta");
        Layer L(sh.N, sh.K, sh.gs, bits);
        fill_layer(L, rng, meta8, 0.03);
        for (int64_t M = 1; M <= 4; ++M) check_gemv(rng, L, M, name);
        if (bits <= 4) check_gemv(rng, L, 2, name, true);
        check_dequant<float>(L, name, "fp32");
        check_dequant<at::Half>(L, name, "fp16");
        check_dequant<at::BFloat16>(L, name, "bf16");
      }
    }
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
