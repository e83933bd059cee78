// The numeric core of the packed kernels (sensiquant/runtime/csrc/packed_kernels.cpp holds the PyTorch ops): code
// unpacking, the GEMV loops and dense dequantization on raw pointers, one vector path per ISA (AVX-512, AVX2 + FMA
// + F16C, NEON) next to the portable loops. No libtorch here beyond c10's Half/BFloat16 and ScalarType, so that
// tests can compile it alone (SQ_STANDALONE, with tests/runtime/csrc/standalone.h) for another architecture and
// check each vector path against the portable loops under an emulator.
#pragma once

#ifdef SQ_STANDALONE
#include "standalone.h"
#else
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#define SQ_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SQ_AVX2 1  // AVX2 machines without AVX-512 (many AMD EPYC and desktop CPUs): 8-wide fp32 FMAs
#elif defined(__ARM_NEON) && defined(__aarch64__)
#define SQ_NEON 1  // every aarch64 CPU: 4-wide fp32 FMAs
#include <arm_neon.h>
#endif

namespace {

// the vector path compiled in (isa() reports it unless the portable loops are forced)
constexpr const char* kIsa =
#if defined(SQ_AVX512) && defined(__AVX512BW__) && defined(__AVX512BF16__)
    "avx512+bf16";
#elif defined(SQ_AVX512)
    "avx512";
#elif defined(SQ_AVX2)
    "avx2";
#elif defined(SQ_NEON)
    "neon";
#else
    "generic";
#endif

constexpr int64_t kBlock = 32;
std::atomic<bool> g_force_generic{false};

// ---------------------------------------------------------------------------------------------------------------
// Geometry: groups along the input dimension, blocks of 32 codes per group.
struct Geometry {
  int64_t N = 0, K = 0, gs = 1, n_full = 0, tail = 0, G = 0, nb_full = 0, nb_tail = 0, blocks = 0;
  Geometry(int64_t n, int64_t k, int64_t group_size) : N(n), K(k) {
    TORCH_CHECK(k > 0 && group_size > 0, "bad geometry");
    gs = std::min(group_size, k);
    n_full = k / gs;
    tail = k % gs;
    G = n_full + (tail > 0 ? 1 : 0);
    nb_full = (gs + kBlock - 1) / kBlock;
    nb_tail = (tail + kBlock - 1) / kBlock;
    blocks = n_full * nb_full + nb_tail;
  }
  int64_t block_start(int64_t g) const { return g * nb_full; }
  int64_t nblocks(int64_t g) const { return g < n_full ? nb_full : nb_tail; }
  int64_t width(int64_t g) const { return g < n_full ? gs : tail; }
  int64_t padded() const { return blocks * kBlock; }
  // groups of whole blocks (or one group): every column sits at its own index in the padded layout
  bool unpadded() const { return gs % kBlock == 0 || G == 1; }
  int64_t group_of(int64_t k) const { return std::min(k / gs, G - 1); }
  // padded position of input column k
  int64_t position(int64_t k) const {
    const int64_t g = group_of(k);
    return block_start(g) * kBlock + (k - g * gs);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Scales / zeros as stored.
inline float half_to_float(at::Half h) {
#if defined(__F16C__)
  return _cvtsh_ss(h.x);  // exact IEEE conversion in one instruction
#else
  return static_cast<float>(h);
#endif
}

struct Meta {
  const at::Half* half = nullptr;
  const uint8_t* codes = nullptr;
  const at::Half* qscale = nullptr;
  const at::Half* qzero = nullptr;
  int64_t group = 1;
  inline float get(int64_t i) const {
    if (half != nullptr) return half_to_float(half[i]);
    const int64_t j = i / group;
    return (static_cast<float>(codes[i]) - half_to_float(qzero[j])) * half_to_float(qscale[j]);
  }
  // entries i0 .. i0 + count - 1 into out (one division, not one per entry)
  inline void decode_range(int64_t i0, int64_t count, float* out) const {
    if (half != nullptr) {
      int64_t g = 0;
#ifdef SQ_AVX512
      for (; g + 16 <= count; g += 16) {
        _mm512_storeu_ps(out + g, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(half + i0 + g))));
      }
#elif defined(SQ_AVX2)
      for (; g + 8 <= count; g += 8) {
        _mm256_storeu_ps(out + g, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(half + i0 + g))));
      }
#endif
      for (; g < count; ++g) out[g] = half_to_float(half[i0 + g]);
      return;
    }
    int64_t j = i0 / group, r = i0 - j * group;
    float qs = half_to_float(qscale[j]), qz = half_to_float(qzero[j]);
    for (int64_t g = 0; g < count; ++g) {
      out[g] = (static_cast<float>(codes[i0 + g]) - qz) * qs;
      if (++r == group) {
        r = 0;
        ++j;
        if (g + 1 < count) {
          qs = half_to_float(qscale[j]);
          qz = half_to_float(qzero[j]);
        }
      }
    }
  }
};
// ---------------------------------------------------------------------------------------------------------------
// Index tensors keep their stored dtype (uint8 / int16 / int32 / int64).
struct Index {
  const void* data = nullptr;
  at::ScalarType type = at::kLong;
  inline int64_t operator[](int64_t i) const {
    switch (type) {
      case at::kByte: return static_cast<const uint8_t*>(data)[i];
      case at::kShort: return static_cast<const int16_t*>(data)[i];
      case at::kInt: return static_cast<const int32_t*>(data)[i];
      default: return static_cast<const int64_t*>(data)[i];
    }
  }
};

// Outliers as corrections, computed once per layer (outlier_delta): per outlier, its value minus the dequantized
// code it replaces, in fp32, chosen so that replaced + delta rounds to the value exactly. The GEMV adds delta * x
// (nothing to decode per call); dequantization writes replaced + delta, which is the outlier value.
struct Outliers {
  const float* delta = nullptr;  // nullptr: none
  Index col, ptr;
  inline bool any() const { return delta != nullptr; }
};

// ---------------------------------------------------------------------------------------------------------------
// Unpacking one block of 32 codes.
template <int BITS>
inline void unpack_block_u8(const uint8_t* p, uint8_t* q) {
  if constexpr (BITS == 8) {
    std::memcpy(q, p, 32);
  } else if constexpr (BITS == 4) {
    for (int i = 0; i < 16; ++i) {
      q[i] = p[i] & 15;
      q[i + 16] = p[i] >> 4;
    }
  } else {
    for (int s = 0; s < 4; ++s)
      for (int i = 0; i < 8; ++i) q[i + 8 * s] = (p[i] >> (2 * s)) & 3;
    if constexpr (BITS == 3) {
      uint32_t h;
      std::memcpy(&h, p + 8, 4);
      for (int i = 0; i < 32; ++i) q[i] |= static_cast<uint8_t>(((h >> i) & 1u) << 2);
    }
  }
}

template <int BITS>
inline int code_at(const uint8_t* blk, int i) {
  if constexpr (BITS == 8) {
    return blk[i];
  } else if constexpr (BITS == 4) {
    return i < 16 ? (blk[i] & 15) : (blk[i - 16] >> 4);
  } else {
    const int lo = (blk[i & 7] >> (2 * (i >> 3))) & 3;
    if constexpr (BITS == 2) return lo;
    return lo | (((blk[8 + (i >> 3)] >> (i & 7)) & 1) << 2);
  }
}

#ifdef SQ_AVX512
inline __m512 u8_to_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }

// codes 0..15 -> lo, 16..31 -> hi, as fp32
template <int BITS>
inline void unpack_block_ps(const uint8_t* p, __m512& lo, __m512& hi) {
  if constexpr (BITS == 8) {
    lo = u8_to_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    hi = u8_to_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
  } else if constexpr (BITS == 4) {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(d, _mm512_set1_epi32(15)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(d, 4));
  } else {
    // bytes 0..7 twice -> 16 dwords; byte i holds codes i, i+8, i+16, i+24 at shifts 0, 2, 4, 6
    const __m512i d = _mm512_cvtepu8_epi32(_mm_castpd_si128(_mm_loaddup_pd(reinterpret_cast<const double*>(p))));
    const __m512i three = _mm512_set1_epi32(3);
    const __m512i s01 = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i s23 = _mm512_set_epi32(6, 6, 6, 6, 6, 6, 6, 6, 4, 4, 4, 4, 4, 4, 4, 4);
    __m512i ia = _mm512_and_si512(_mm512_srlv_epi32(d, s01), three);
    __m512i ib = _mm512_and_si512(_mm512_srlv_epi32(d, s23), three);
    if constexpr (BITS == 3) {
      uint32_t h;
      std::memcpy(&h, p + 8, 4);
      const __m512i four = _mm512_set1_epi32(4);
      ia = _mm512_mask_add_epi32(ia, static_cast<__mmask16>(h & 0xFFFFu), ia, four);
      ib = _mm512_mask_add_epi32(ib, static_cast<__mmask16>(h >> 16), ib, four);
    }
    lo = _mm512_cvtepi32_ps(ia);
    hi = _mm512_cvtepi32_ps(ib);
  }
}
#endif

#ifdef SQ_AVX2
inline __m256 u8x8_to_ps(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// codes 8j .. 8j + 7 -> v[j], as fp32
template <int BITS>
inline void unpack_block_ps8(const uint8_t* p, __m256 v[4]) {
  if constexpr (BITS == 8) {
    for (int j = 0; j < 4; ++j) v[j] = u8x8_to_ps(p + 8 * j);
  } else if constexpr (BITS == 4) {
    // low nibbles of bytes 0..7 / 8..15 are codes 0..7 / 8..15, their high nibbles codes 16..23 / 24..31
    const __m256i d0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i d1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
    const __m256i m15 = _mm256_set1_epi32(15);
    v[0] = _mm256_cvtepi32_ps(_mm256_and_si256(d0, m15));
    v[1] = _mm256_cvtepi32_ps(_mm256_and_si256(d1, m15));
    v[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(d0, 4));
    v[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(d1, 4));
  } else {
    // byte i (i < 8) holds codes i, i+8, i+16, i+24 at shifts 0, 2, 4, 6
    const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i three = _mm256_set1_epi32(3);
    __m256i c[4] = {_mm256_and_si256(d, three), _mm256_and_si256(_mm256_srli_epi32(d, 2), three),
                    _mm256_and_si256(_mm256_srli_epi32(d, 4), three), _mm256_srli_epi32(d, 6)};
    if constexpr (BITS == 3) {
      uint32_t h;
      std::memcpy(&h, p + 8, 4);
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i one = _mm256_set1_epi32(1);
      for (int j = 0; j < 4; ++j) {
        const __m256i hb = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(h >> (8 * j))), lane), one);
        c[j] = _mm256_or_si256(c[j], _mm256_slli_epi32(hb, 2));
      }
    }
    for (int j = 0; j < 4; ++j) v[j] = _mm256_cvtepi32_ps(c[j]);
  }
}

#endif

#if defined(SQ_AVX512) || defined(SQ_AVX2)
inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#ifdef SQ_NEON
// codes 0..15 -> lo, 16..31 -> hi, as bytes
template <int BITS>
inline void unpack_block_neon(const uint8_t* p, uint8x16_t& lo, uint8x16_t& hi) {
  if constexpr (BITS == 8) {
    lo = vld1q_u8(p);
    hi = vld1q_u8(p + 16);
  } else if constexpr (BITS == 4) {
    const uint8x16_t b = vld1q_u8(p);
    lo = vandq_u8(b, vdupq_n_u8(15));
    hi = vshrq_n_u8(b, 4);
  } else {
    // byte i (i < 8) holds codes i, i+8, i+16, i+24 at shifts 0, 2, 4, 6
    const uint8x8_t d = vld1_u8(p);
    const uint8x8_t three = vdup_n_u8(3);
    lo = vcombine_u8(vand_u8(d, three), vand_u8(vshr_n_u8(d, 2), three));
    hi = vcombine_u8(vand_u8(vshr_n_u8(d, 4), three), vshr_n_u8(d, 6));
    if constexpr (BITS == 3) {
      uint32_t h;
      std::memcpy(&h, p + 8, 4);
      const uint8x16_t bit = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
      const uint8x16_t four = vdupq_n_u8(4);
      const uint8x16_t h01 = vcombine_u8(vdup_n_u8(h & 0xFFu), vdup_n_u8((h >> 8) & 0xFFu));
      const uint8x16_t h23 = vcombine_u8(vdup_n_u8((h >> 16) & 0xFFu), vdup_n_u8(h >> 24));
      lo = vorrq_u8(lo, vandq_u8(vtstq_u8(h01, bit), four));
      hi = vorrq_u8(hi, vandq_u8(vtstq_u8(h23, bit), four));
    }
  }
}

// 16 byte codes -> 4 x 4 fp32
inline void widen_neon(uint8x16_t c, float32x4_t* v) {
  const uint16x8_t a = vmovl_u8(vget_low_u8(c)), b = vmovl_u8(vget_high_u8(c));
  v[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(a)));
  v[1] = vcvtq_f32_u32(vmovl_u16(vget_high_u16(a)));
  v[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(b)));
  v[3] = vcvtq_f32_u32(vmovl_u16(vget_high_u16(b)));
}

// codes 4j .. 4j + 3 -> v[j], as fp32
template <int BITS>
inline void unpack_block_ps4(const uint8_t* p, float32x4_t v[8]) {
  uint8x16_t lo, hi;
  unpack_block_neon<BITS>(p, lo, hi);
  widen_neon(lo, v);
  widen_neon(hi, v + 4);
}
#endif

#if defined(SQ_AVX512) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define SQ_AVX512BF16 1
// 32 codes (2-4 bits) as exact bf16 values, natural order: the codes index a 32-entry table of bf16(0..31)
template <int BITS>
inline __m512bh unpack_block_bf16(const uint8_t* p, __m512i lut) {
  __m512i w;
  if constexpr (BITS == 4) {
    const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m512i sh = _mm512_set_epi64(0x0004000400040004LL, 0x0004000400040004LL, 0x0004000400040004LL,
                                        0x0004000400040004LL, 0, 0, 0, 0);
    w = _mm512_and_si512(_mm512_srlv_epi16(_mm512_cvtepu8_epi16(b), sh), _mm512_set1_epi16(15));
  } else {
    uint64_t v;
    std::memcpy(&v, p, 8);
    const __m512i sh = _mm512_set_epi64(0x0006000600060006LL, 0x0006000600060006LL, 0x0004000400040004LL,
                                        0x0004000400040004LL, 0x0002000200020002LL, 0x0002000200020002LL, 0, 0);
    w = _mm512_and_si512(_mm512_srlv_epi16(_mm512_cvtepu8_epi16(_mm256_set1_epi64x(static_cast<long long>(v))), sh),
                         _mm512_set1_epi16(3));
    if constexpr (BITS == 3) {
      uint32_t h;
      std::memcpy(&h, p + 8, 4);
      w = _mm512_mask_add_epi16(w, static_cast<__mmask32>(h), w, _mm512_set1_epi16(4));
    }
  }
  return reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(w, lut));
}

inline __m512i bf16_code_table() {
  alignas(64) uint16_t t[32];
  for (int i = 0; i < 32; ++i) {
    const float f = static_cast<float>(i);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    t[i] = static_cast<uint16_t>(u >> 16);  // exact: small integers need at most 5 significant bits
  }
  return _mm512_load_si512(t);
}
#endif

// The dequantized code at input column k of a row, (q - zero) * scale in fp32, as the dequantization computes it.
// Not inlined, so that the product is rounded to fp32 before a caller adds to it (inlined, -ffp-contract would
// fuse "replaced + delta" into an FMA and the sum would miss the outlier value by an ulp).
template <int BITS>
#if defined(__GNUC__)
__attribute__((noinline))
#endif
float replaced_value(const Geometry& geo, const uint8_t* row, const float* s, const float* z, int64_t k) {
  const int64_t g = geo.group_of(k);
  const int64_t pos = geo.position(k);
  const int q = code_at<BITS>(row + (pos / kBlock) * 4 * BITS, static_cast<int>(pos % kBlock));
  return (static_cast<float>(q) - z[g]) * s[g];
}

// ---------------------------------------------------------------------------------------------------------------
// GEMV for M <= 4 rows of x.
struct GemvCtx {
  Geometry geo;
  const uint8_t* codes;
  int64_t row_bytes;
  Meta scale, zero;
  Outliers out;
  const float* xp;            // (M, Kp) padded fp32 x (nullptr when xp16 is used)
  const at::BFloat16* xp16;   // (M, Kp) padded bf16 x for the AVX512-BF16 kernel, else nullptr
  const float* xsum;  // (M, G)
  const float* bias;  // (N) or nullptr
  float* y;  // (M, N) fp32
  int64_t M;
  const int8_t* xq = nullptr;  // act8: (M, Kp) x rounded to int8 per block of 32 (see prepare_x_q8), else nullptr
  const float* xd = nullptr;   // act8: (M, blocks) the blocks' scales

  inline void decode_row(int64_t n, float* s, float* z) const {
    scale.decode_range(n * geo.G, geo.G, s);
    zero.decode_range(n * geo.G, geo.G, z);
  }

  // zero-point term, outlier corrections, bias, store
  template <int MM>
  inline void finish_row(int64_t n, const float* s, const float* z, float* acc) const {
    const int64_t Kp = geo.padded();
    for (int m = 0; m < MM; ++m) {
      float corr = 0.f;
      const float* xs = xsum + m * geo.G;
      for (int64_t g = 0; g < geo.G; ++g) corr += s[g] * z[g] * xs[g];
      acc[m] -= corr;
    }
    if (out.any()) {
      const bool unpadded = geo.unpadded();
      for (int64_t j = out.ptr[n], e = out.ptr[n + 1]; j < e; ++j) {
        const int64_t k = out.col[j];
        const int64_t pos = unpadded ? k : geo.position(k);
        const float delta = out.delta[j];
        for (int m = 0; m < MM; ++m) {
          acc[m] += delta * (xp16 != nullptr ? static_cast<float>(xp16[m * Kp + pos]) : xp[m * Kp + pos]);
        }
      }
    }
    for (int m = 0; m < MM; ++m) y[m * geo.N + n] = acc[m] + (bias != nullptr ? bias[n] : 0.f);
  }
};

// The row loop of every GEMV kernel: row n's scales and zeros decoded, ``dot(codes of row n, scales, acc)`` sets
// acc[m] = sum_g scale[g] * sum_k q_k x[m, k] for each row of x, then the zero-point term, outliers, bias and store.
template <int MM, typename Dot>
inline void for_each_row(const GemvCtx& c, int64_t n0, int64_t n1, Dot&& dot) {
  std::vector<float> s(c.geo.G), z(c.geo.G);
  for (int64_t n = n0; n < n1; ++n) {
    c.decode_row(n, s.data(), z.data());
    float acc[MM] = {};
    dot(c.codes + n * c.row_bytes, s.data(), acc);
    c.template finish_row<MM>(n, s.data(), z.data(), acc);
  }
}

template <int BITS, int MM>
void gemv_generic(const GemvCtx& c, int64_t n0, int64_t n1) {
  const Geometry& geo = c.geo;
  const int64_t Kp = geo.padded();
  alignas(64) uint8_t q[32];
  alignas(64) float qf[32];
  for_each_row<MM>(c, n0, n1, [&](const uint8_t* row, const float* s, float* acc) {
    alignas(64) float tot[MM][16] = {};
    for (int64_t g = 0; g < geo.G; ++g) {
      alignas(64) float part[MM][16] = {};
      const int64_t b0 = geo.block_start(g), b1 = b0 + geo.nblocks(g);
      for (int64_t b = b0; b < b1; ++b) {
        unpack_block_u8<BITS>(row + b * 4 * BITS, q);
        for (int i = 0; i < 32; ++i) qf[i] = static_cast<float>(q[i]);
        for (int m = 0; m < MM; ++m) {
          const float* xb = c.xp + m * Kp + b * kBlock;
          for (int i = 0; i < 16; ++i) part[m][i] += qf[i] * xb[i] + qf[i + 16] * xb[i + 16];
        }
      }
      for (int m = 0; m < MM; ++m)
        for (int i = 0; i < 16; ++i) tot[m][i] += s[g] * part[m][i];
    }
    for (int m = 0; m < MM; ++m) {
      float t = 0.f;
      for (int i = 0; i < 16; ++i) t += tot[m][i];
      acc[m] = t;
    }
  });
}

#ifdef SQ_AVX512
template <int BITS, int MM>
void gemv_avx512(const GemvCtx& c, int64_t n0, int64_t n1) {
  const Geometry& geo = c.geo;
  const int64_t Kp = geo.padded();
  for_each_row<MM>(c, n0, n1, [&](const uint8_t* row, const float* s, float* acc) {
    __m512 tot[MM];
    for (int m = 0; m < MM; ++m) tot[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < geo.G; ++g) {
      __m512 a0[MM], a1[MM];
      for (int m = 0; m < MM; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
      const int64_t b0 = geo.block_start(g), b1 = b0 + geo.nblocks(g);
      __m512 a2[MM], a3[MM];
      for (int m = 0; m < MM; ++m) a2[m] = a3[m] = _mm512_setzero_ps();
      int64_t b = b0;
      for (; b + 1 < b1; b += 2) {
        __m512 lo, hi, lo1, hi1;
        unpack_block_ps<BITS>(row + b * 4 * BITS, lo, hi);
        unpack_block_ps<BITS>(row + (b + 1) * 4 * BITS, lo1, hi1);
        const float* xb = c.xp + b * kBlock;
        for (int m = 0; m < MM; ++m) {
          a0[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb + m * Kp), a0[m]);
          a1[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + m * Kp + 16), a1[m]);
          a2[m] = _mm512_fmadd_ps(lo1, _mm512_loadu_ps(xb + m * Kp + 32), a2[m]);
          a3[m] = _mm512_fmadd_ps(hi1, _mm512_loadu_ps(xb + m * Kp + 48), a3[m]);
        }
      }
      if (b < b1) {
        __m512 lo, hi;
        unpack_block_ps<BITS>(row + b * 4 * BITS, lo, hi);
        const float* xb = c.xp + b * kBlock;
        for (int m = 0; m < MM; ++m) {
          a0[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb + m * Kp), a0[m]);
          a1[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + m * Kp + 16), a1[m]);
        }
      }
      const __m512 sv = _mm512_set1_ps(s[g]);
      for (int m = 0; m < MM; ++m) {
        const __m512 part = _mm512_add_ps(_mm512_add_ps(a0[m], a1[m]), _mm512_add_ps(a2[m], a3[m]));
        tot[m] = _mm512_fmadd_ps(sv, part, tot[m]);
      }
    }
    for (int m = 0; m < MM; ++m) acc[m] = _mm512_reduce_add_ps(tot[m]);
  });
}
#endif

#ifdef SQ_AVX2
// the 8 values of v, rounded to T as Tensor.to does (RNE)
template <typename T>
inline void store8(T* dst, __m256 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(dst, v);
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    const __m256i u = _mm256_castps_si256(v);  // finite values: round to nearest even on the bits
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    const __m256i p = _mm256_packus_epi32(r, r);  // per 128-bit lane: r0..r3 twice | r4..r7 twice
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(_mm256_permute4x64_epi64(p, 8)));
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}
#endif

#ifdef SQ_NEON
// the 4 values of v, rounded to T as Tensor.to does (RNE)
template <typename T>
inline void store4(T* dst, float32x4_t v) {
  if constexpr (std::is_same_v<T, float>) {
    vst1q_f32(dst, v);
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    const uint32x4_t u = vreinterpretq_u32_f32(v);  // finite values: round to nearest even on the bits
    const uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
    const uint32x4_t r = vshrq_n_u32(vaddq_u32(vaddq_u32(u, vdupq_n_u32(0x7FFF)), lsb), 16);
    vst1_u16(reinterpret_cast<uint16_t*>(dst), vmovn_u32(r));
  } else {
    vst1_u16(reinterpret_cast<uint16_t*>(dst), vreinterpret_u16_f16(vcvt_f16_f32(v)));  // FPCR default: RNE
  }
}
#endif

#if defined(SQ_AVX2) || defined(SQ_NEON)
// The 8-wide (AVX2) or 4-wide (NEON) fp32 vector of this build, for the loops below that both share.
struct Vec {
#ifdef SQ_AVX2
  using V = __m256;
  static constexpr int L = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float f) { return _mm256_set1_ps(f); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }  // a * b + c, one rounding
  static V dequant(V q, V z, V s) { return _mm256_mul_ps(_mm256_sub_ps(q, z), s); }
  static float sum(V v) { return hsum256(v); }
  template <int BITS>
  static void unpack(const uint8_t* p, V* v) { unpack_block_ps8<BITS>(p, v); }
  template <typename T>
  static void store_all(T* dst, V v) { store8(dst, v); }
#else
  using V = float32x4_t;
  static constexpr int L = 4;
  static V zero() { return vdupq_n_f32(0.f); }
  static V set1(float f) { return vdupq_n_f32(f); }
  static V load(const float* p) { return vld1q_f32(p); }
  static V add(V a, V b) { return vaddq_f32(a, b); }
  static V fma(V a, V b, V c) { return vfmaq_f32(c, a, b); }
  static V dequant(V q, V z, V s) { return vmulq_f32(vsubq_f32(q, z), s); }
  static float sum(V v) { return vaddvq_f32(v); }
  template <int BITS>
  static void unpack(const uint8_t* p, V* v) { unpack_block_ps4<BITS>(p, v); }
  template <typename T>
  static void store_all(T* dst, V v) { store4(dst, v); }
#endif
  static constexpr int per_block = kBlock / L;  // vectors per block of 32 codes

  // the first cnt values of v (all L of them when cnt >= L)
  template <typename T>
  static void store(T* dst, V v, int64_t cnt) {
    if (cnt >= L) return store_all(dst, v);
    alignas(32) T tmp[L];
    store_all(tmp, v);
    std::memcpy(dst, tmp, cnt * sizeof(T));
  }
};

template <int BITS, int MM>
void gemv_vec(const GemvCtx& c, int64_t n0, int64_t n1) {
  using V = Vec::V;
  constexpr int NV = Vec::per_block;
  constexpr int NA = MM <= 2 ? 4 : 2;  // independent accumulators per row of x: FMAs in flight, within the registers
  const Geometry& geo = c.geo;
  const int64_t Kp = geo.padded();
  for_each_row<MM>(c, n0, n1, [&](const uint8_t* row, const float* s, float* acc) {
    V tot[MM];
    for (int m = 0; m < MM; ++m) tot[m] = Vec::zero();
    for (int64_t g = 0; g < geo.G; ++g) {
      V a[MM][NA];
      for (int m = 0; m < MM; ++m)
        for (int j = 0; j < NA; ++j) a[m][j] = Vec::zero();
      const int64_t b0 = geo.block_start(g), b1 = b0 + geo.nblocks(g);
      for (int64_t b = b0; b < b1; ++b) {
        V v[NV];
        Vec::unpack<BITS>(row + b * 4 * BITS, v);
        const float* xb = c.xp + b * kBlock;
        for (int m = 0; m < MM; ++m)
          for (int j = 0; j < NV; ++j) a[m][j % NA] = Vec::fma(v[j], Vec::load(xb + m * Kp + Vec::L * j), a[m][j % NA]);
      }
      const V sv = Vec::set1(s[g]);
      for (int m = 0; m < MM; ++m) {
        V part = Vec::add(a[m][0], a[m][1]);
        if constexpr (NA == 4) part = Vec::add(part, Vec::add(a[m][2], a[m][3]));
        tot[m] = Vec::fma(sv, part, tot[m]);
      }
    }
    for (int m = 0; m < MM; ++m) acc[m] = Vec::sum(tot[m]);
  });
}
#endif

#ifdef SQ_AVX512BF16
// bf16 x, 2-4-bit codes: exact bf16 codes times bf16 x, products exact, accumulated in fp32 (vdpbf16ps)
template <int BITS, int MM>
void gemv_avx512bf16(const GemvCtx& c, int64_t n0, int64_t n1) {
  const Geometry& geo = c.geo;
  const int64_t Kp = geo.padded();
  const __m512i lut = bf16_code_table();
  const uint16_t* x16 = reinterpret_cast<const uint16_t*>(c.xp16);
  for_each_row<MM>(c, n0, n1, [&](const uint8_t* row, const float* s, float* acc) {
    __m512 tot[MM];
    for (int m = 0; m < MM; ++m) tot[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < geo.G; ++g) {
      __m512 a0[MM], a1[MM];
      for (int m = 0; m < MM; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
      const int64_t b0 = geo.block_start(g), b1 = b0 + geo.nblocks(g);
      int64_t b = b0;
      for (; b + 1 < b1; b += 2) {
        const __m512bh q0 = unpack_block_bf16<BITS>(row + b * 4 * BITS, lut);
        const __m512bh q1 = unpack_block_bf16<BITS>(row + (b + 1) * 4 * BITS, lut);
        for (int m = 0; m < MM; ++m) {
          const uint16_t* xb = x16 + m * Kp + b * kBlock;
          a0[m] = _mm512_dpbf16_ps(a0[m], q0, reinterpret_cast<__m512bh>(_mm512_loadu_si512(xb)));
          a1[m] = _mm512_dpbf16_ps(a1[m], q1, reinterpret_cast<__m512bh>(_mm512_loadu_si512(xb + kBlock)));
        }
      }
      if (b < b1) {
        const __m512bh q0 = unpack_block_bf16<BITS>(row + b * 4 * BITS, lut);
        for (int m = 0; m < MM; ++m) {
          a0[m] = _mm512_dpbf16_ps(a0[m], q0,
                                   reinterpret_cast<__m512bh>(_mm512_loadu_si512(x16 + m * Kp + b * kBlock)));
        }
      }
      const __m512 sv = _mm512_set1_ps(s[g]);
      for (int m = 0; m < MM; ++m) tot[m] = _mm512_fmadd_ps(sv, _mm512_add_ps(a0[m], a1[m]), tot[m]);
    }
    for (int m = 0; m < MM; ++m) acc[m] = _mm512_reduce_add_ps(tot[m]);
  });
}
#endif

// ---------------------------------------------------------------------------------------------------------------
// act8 (2-4-bit codes): x rounded to int8 per block of 32 columns, xq = round(x / d) with d = max|x| / 127 (as
// llama.cpp rounds its activations for its K-quants), the per-block code dot products summed in integers. Every
// ISA computes the same integer sums; the result is the GEMV of the rounded x~ = d * xq, to fp32 rounding.
// act8 runs where the CPU has byte dot products worth using (x86 AVX2 / AVX-512); elsewhere packed_gemv ignores it
constexpr bool kAct8 =
#if defined(SQ_AVX512) || defined(SQ_AVX2)
    true;
#else
    false;
#endif

template <int BITS, int MM>
void gemv_q8_generic(const GemvCtx& c, int64_t n0, int64_t n1) {
  const Geometry& geo = c.geo;
  const int64_t Kp = geo.padded();
  alignas(64) uint8_t q[32];
  for_each_row<MM>(c, n0, n1, [&](const uint8_t* row, const float* s, float* acc) {
    for (int64_t g = 0; g < geo.G; ++g) {
      float part[MM] = {};
      const int64_t b0 = geo.block_start(g), b1 = b0 + geo.nblocks(g);
      for (int64_t b = b0; b < b1; ++b) {
        unpack_block_u8<BITS>(row + b * 4 * BITS, q);
        for (int m = 0; m < MM; ++m) {
          const int8_t* xb = c.xq + m * Kp + b * kBlock;
          int32_t dot = 0;
          for (int i = 0; i < 32; ++i) dot += static_cast<int32_t>(q[i]) * xb[i];
          part[m] += static_cast<float>(dot) * c.xd[m * geo.blocks + b];
        }
      }
      for (int m = 0; m < MM; ++m) acc[m] += s[g] * part[m];
    }
  });
}

#if defined(SQ_AVX512) || defined(SQ_AVX2)
// 32 codes (2-4 bits) as bytes, natural order
template <int BITS>
inline __m256i unpack_block_epu8(const uint8_t* p) {
  if constexpr (BITS == 4) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i low = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), low), _mm_and_si128(b, low));
  } else {
    uint64_t v;
    std::memcpy(&v, p, 8);  // 8-byte lane j of the broadcast, shifted by 2j: bits 2j..2j+1 of each byte = c[i + 8j]
    __m256i w = _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x(static_cast<long long>(v)),
                                                   _mm256_set_epi64x(6, 4, 2, 0)), _mm256_set1_epi8(3));
    if constexpr (BITS == 3) {
      uint32_t h;
      std::memcpy(&h, p + 8, 4);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
      w = _mm256_mask_add_epi8(w, static_cast<__mmask32>(h), w, _mm256_set1_epi8(4));  // bit 2 was 0
#else
      // byte i takes byte i / 8 of h, keeps bit i % 8: 0xFF where the high bit is set
      const __m256i hb = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(h)),
                                             _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                                               0x0101010101010101LL, 0));
      const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
      w = _mm256_or_si256(w, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hb, bit), bit),
                                              _mm256_set1_epi8(4)));
#endif
    }
    return w;
  }
}

// 8 int32 sums of 4 products each of unsigned codes (<= 15) and signed int8 x (|x| <= 127): exact either way
inline __m256i dot_u8s8(__m256i u, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));  // pairs <= 3810: no saturation
#endif
}

template <int BITS, int MM>
void gemv_q8_vec(const GemvCtx& c, int64_t n0, int64_t n1) {
  const Geometry& geo = c.geo;
  const int64_t Kp = geo.padded(), blocks = geo.blocks;
  const int8_t* xq = c.xq;
  const float* xd = c.xd;
  for_each_row<MM>(c, n0, n1, [&](const uint8_t* row, const float* s, float* acc) {
    __m256 tot[MM];
    for (int m = 0; m < MM; ++m) tot[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < geo.G; ++g) {
      __m256 a[MM];
      for (int m = 0; m < MM; ++m) a[m] = _mm256_setzero_ps();
      const int64_t b0 = geo.block_start(g), b1 = b0 + geo.nblocks(g);
      for (int64_t b = b0; b < b1; ++b) {
        const __m256i u = unpack_block_epu8<BITS>(row + b * 4 * BITS);
        for (int m = 0; m < MM; ++m) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * Kp + b * kBlock));
          a[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(u, xv)), _mm256_set1_ps(xd[m * blocks + b]), a[m]);
        }
      }
      const __m256 sv = _mm256_set1_ps(s[g]);
      for (int m = 0; m < MM; ++m) tot[m] = _mm256_fmadd_ps(sv, a[m], tot[m]);
    }
    for (int m = 0; m < MM; ++m) acc[m] = hsum256(tot[m]);
  });
}
#endif

template <int BITS, int MM>
void gemv_rows(const GemvCtx& c, int64_t n0, int64_t n1) {
  if constexpr (BITS <= 4) {
    if (c.xq != nullptr) {
#if defined(SQ_AVX512) || defined(SQ_AVX2)
      if (!g_force_generic.load(std::memory_order_relaxed)) return gemv_q8_vec<BITS, MM>(c, n0, n1);
#endif
      return gemv_q8_generic<BITS, MM>(c, n0, n1);
    }
  }
#ifdef SQ_AVX512BF16
  if constexpr (BITS <= 4) {
    if (c.xp16 != nullptr) return gemv_avx512bf16<BITS, MM>(c, n0, n1);
  }
#endif
#ifdef SQ_AVX512
  if (!g_force_generic.load(std::memory_order_relaxed)) return gemv_avx512<BITS, MM>(c, n0, n1);
#endif
#if defined(SQ_AVX2) || defined(SQ_NEON)
  if (!g_force_generic.load(std::memory_order_relaxed)) return gemv_vec<BITS, MM>(c, n0, n1);
#endif
  gemv_generic<BITS, MM>(c, n0, n1);
}

template <int BITS>
void gemv_dispatch_m(const GemvCtx& c, int64_t n0, int64_t n1) {
  switch (c.M) {
    case 1: return gemv_rows<BITS, 1>(c, n0, n1);
    case 2: return gemv_rows<BITS, 2>(c, n0, n1);
    case 3: return gemv_rows<BITS, 3>(c, n0, n1);
    default: return gemv_rows<BITS, 4>(c, n0, n1);
  }
}

void gemv_dispatch(int64_t bits, const GemvCtx& c, int64_t n0, int64_t n1) {
  switch (bits) {
    case 2: return gemv_dispatch_m<2>(c, n0, n1);
    case 3: return gemv_dispatch_m<3>(c, n0, n1);
    case 4: return gemv_dispatch_m<4>(c, n0, n1);
    default: return gemv_dispatch_m<8>(c, n0, n1);
  }
}

template <typename T, typename P>
void prepare_x(const T* x, int64_t M, const Geometry& geo, P* xp, float* xsum) {
  const int64_t Kp = geo.padded();
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * geo.K;
    for (int64_t g = 0; g < geo.G; ++g) {
      P* dst = xp + m * Kp + geo.block_start(g) * kBlock;
      const int64_t w = geo.width(g);
      const T* src = xr + g * geo.gs;
      float sum = 0.f;
      for (int64_t i = 0; i < w; ++i) {
        dst[i] = static_cast<P>(src[i]);
        sum += static_cast<float>(src[i]);
      }
      // padding was zero-initialised
      xsum[m * geo.G + g] = sum;
    }
  }
}

// act8: x (M, K) into the padded fp32 layout, rounded per block of 32 to xq (int8) with scale xd (see gemv_q8_*);
// xp then holds the rounded x~ = xd * xq (the outlier corrections use it) and xsum its group sums, so the kernel
// computes the GEMV of x~ throughout. A block of zeros has scale 0.
template <typename T>
void prepare_x_q8(const T* x, int64_t M, const Geometry& geo, float* xp, float* xsum, int8_t* xq, float* xd) {
  prepare_x(x, M, geo, xp, xsum);
  const int64_t Kp = geo.padded();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < geo.blocks; ++b) {
      float* v = xp + m * Kp + b * kBlock;
      int8_t* q = xq + m * Kp + b * kBlock;
      float amax = 0.f;
      for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float d = amax / 127.f;
      xd[m * geo.blocks + b] = d;
      for (int i = 0; i < kBlock; ++i) {
        const float r = d > 0.f ? std::min(127.f, std::max(-127.f, std::nearbyint(v[i] / d))) : 0.f;
        q[i] = static_cast<int8_t>(r);
        v[i] = r * d;
      }
    }
    for (int64_t g = 0; g < geo.G; ++g) {
      const float* v = xp + m * Kp + geo.block_start(g) * kBlock;
      float sum = 0.f;
      for (int64_t i = 0; i < geo.nblocks(g) * kBlock; ++i) sum += v[i];
      xsum[m * geo.G + g] = sum;
    }
  }
}
// ---------------------------------------------------------------------------------------------------------------
// Dense dequantization (prefill): W[n, k] = (q - zero) * scale in fp32, outliers in place, then rounded to the
// output dtype (RNE, as Tensor.to does): bit-equal to the reference dequantize(dtype).
#ifdef SQ_AVX512
template <typename T>
inline void store_block(T* dst, __m512 v, int64_t cnt) {
  const __mmask16 mask = static_cast<__mmask16>((1u << cnt) - 1u);
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(dst, mask, v);
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    const __m512i u = _mm512_castps_si512(v);  // finite values: round to nearest even on the bits
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    _mm256_mask_storeu_epi16(dst, mask, _mm512_cvtepi32_epi16(r));
  } else {
    _mm256_mask_storeu_epi16(dst, mask, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}
#endif


template <int BITS, typename T>
void dequant_rows(const Geometry& geo, const uint8_t* codes, int64_t row_bytes, const Meta& scale, const Meta& zero,
                  const Outliers& out, T* w, int64_t n0, int64_t n1) {
  std::vector<float> s(geo.G), z(geo.G);
  alignas(64) uint8_t q[32];
  [[maybe_unused]] const bool generic = g_force_generic.load(std::memory_order_relaxed);
  for (int64_t n = n0; n < n1; ++n) {
    scale.decode_range(n * geo.G, geo.G, s.data());
    zero.decode_range(n * geo.G, geo.G, z.data());
    const uint8_t* row = codes + n * row_bytes;
    T* wr = w + n * geo.K;
    for (int64_t g = 0; g < geo.G; ++g) {
      const int64_t width = geo.width(g), b0 = geo.block_start(g);
      T* dst = wr + g * geo.gs;
      for (int64_t b = 0; b < geo.nblocks(g); ++b) {
        const uint8_t* blk = row + (b0 + b) * 4 * BITS;
        const int64_t i0 = b * kBlock;
        const int64_t cnt = std::min<int64_t>(kBlock, width - i0);
#ifdef SQ_AVX512
        if (!generic) {
          __m512 lo, hi;
          unpack_block_ps<BITS>(blk, lo, hi);
          const __m512 sv = _mm512_set1_ps(s[g]), zv = _mm512_set1_ps(z[g]);
          store_block(dst + i0, _mm512_mul_ps(_mm512_sub_ps(lo, zv), sv), std::min<int64_t>(16, cnt));
          if (cnt > 16) store_block(dst + i0 + 16, _mm512_mul_ps(_mm512_sub_ps(hi, zv), sv), cnt - 16);
          continue;
        }
#elif defined(SQ_AVX2) || defined(SQ_NEON)
        if (!generic) {
          Vec::V v[Vec::per_block];
          Vec::unpack<BITS>(blk, v);
          const Vec::V sv = Vec::set1(s[g]), zv = Vec::set1(z[g]);
          for (int j = 0; j < Vec::per_block && Vec::L * j < cnt; ++j) {
            Vec::store(dst + i0 + Vec::L * j, Vec::dequant(v[j], zv, sv), cnt - Vec::L * j);
          }
          continue;
        }
#endif
        unpack_block_u8<BITS>(blk, q);
        for (int64_t i = 0; i < cnt; ++i) dst[i0 + i] = static_cast<T>((static_cast<float>(q[i]) - z[g]) * s[g]);
      }
    }
    if (out.any()) {
      for (int64_t j = out.ptr[n], e = out.ptr[n + 1]; j < e; ++j) {
        const int64_t k = out.col[j];
        wr[k] = static_cast<T>(replaced_value<BITS>(geo, row, s.data(), z.data(), k) + out.delta[j]);
      }
    }
  }
}

// The correction of one outlier of value v whose place dequantizes to r: a delta with r + delta == v in fp32
// (v - r rounded, or a neighbour of it when that sum rounds away from v), so that dequantization is exact.
inline float outlier_delta(float v, float r) {
  const float d = v - r;
  if (r + d == v) return d;
  float down = d, up = d;
  for (int k = 0; k < 4; ++k) {
    down = std::nextafter(down, -INFINITY);
    up = std::nextafter(up, INFINITY);
    if (r + down == v) return down;
    if (r + up == v) return up;
  }
  return d;
}

// The corrections of rows [n0, n1)'s CSR outliers from their values (``values``: FP16 or fp32; see Outliers).
template <int BITS, typename V>
void outlier_deltas(const Geometry& geo, const uint8_t* codes, int64_t row_bytes, const Meta& scale, const Meta& zero,
                    const V* values, const Index& col, const Index& ptr, float* delta, int64_t n0, int64_t n1) {
  std::vector<float> s(geo.G), z(geo.G);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t j0 = ptr[n], j1 = ptr[n + 1];
    if (j0 == j1) continue;
    scale.decode_range(n * geo.G, geo.G, s.data());
    zero.decode_range(n * geo.G, geo.G, z.data());
    const uint8_t* row = codes + n * row_bytes;
    for (int64_t j = j0; j < j1; ++j) {
      const float replaced = replaced_value<BITS>(geo, row, s.data(), z.data(), col[j]);
      delta[j] = outlier_delta(static_cast<float>(values[j]), replaced);
    }
  }
}
}  // namespace
