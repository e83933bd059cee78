// Fused unpack-and-multiply kernels for densely bit-packed 2/3/4/8-bit weights (sensiquant.nn.kernels, "packed" path).
//
// Kernel layout of the codes (built in Python by sensiquant.nn.kernels.to_kernel_layout, same bits per code as the
// checkpoint): each output row is a sequence of blocks of 32 codes; every quantization group starts a new block
// (a group whose width is not a multiple of 32 is zero-padded to one, so no block straddles two groups). A block
// of 32 codes c[0..31] takes 4 * bits bytes:
//   8 bits: byte i = c[i]
//   4 bits: byte i (i < 16) = c[i] | c[i + 16] << 4
//   2 bits: byte i (i < 8)  = c[i] | c[i + 8] << 2 | c[i + 16] << 4 | c[i + 24] << 6
//   3 bits: the 2-bit layout of (c & 3) in bytes 0..7, then the high bits (c >> 2) as a little-endian uint32
//           (bit i = high bit of c[i]) in bytes 8..11
// Scales and zeros stay as stored: FP16 (out, n_groups), or 8-bit codes with an FP16 scale and zero per
// ``meta_group`` consecutive entries of the flattened (out, n_groups) matrix (decoded per row, exactly as
// sensiquant.quant.affine._decode_meta does). Outliers (CSR, FP16 values or fp32 ones converted from block
// outliers) replace the dequantized weight at their place.
//
// Ops (namespace torch.ops.sensiquant):
//   packed_gemv(x (M, K), ...)   y = x @ W^T (+ bias), for small M (decode): per output row and group,
//                                 scale * (sum_k q_k x_k - zero * sum_k x_k) accumulated in fp32.
//   packed_dequant(..., dtype)   the dense weight in dtype (prefill: one layer at a time), bit-equal to the reference;
//   packed_dequant_into(out, ...) the same into a reused buffer (fresh large buffers cost page faults on every call).
//   csr_add_(y, x, delta, ...)   y += x @ C^T (+ bias) for a CSR matrix C with fp32 values (int4pack corrections).
//   isa()                        "avx512+bf16", "avx512" or "generic": the code paths compiled in (bf16 x with
//                                2-4-bit codes uses vdpbf16ps on exact bf16 codes; fp32 FMAs otherwise).
//   set_generic(flag)            force the portable loops (tests compare both).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#define SQ_AVX512 1
#endif

namespace {

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
  // padded position of input column k
  int64_t position(int64_t k) const {
    const int64_t g = std::min(k / gs, G - 1);
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

Meta make_meta(const at::Tensor& values, const at::Tensor& qscale, const at::Tensor& qzero, int64_t meta_group,
               int64_t numel) {
  Meta m;
  TORCH_CHECK(values.is_contiguous() && values.numel() >= numel, "scale/zero tensor too small or not contiguous");
  if (meta_group <= 0) {
    TORCH_CHECK(values.scalar_type() == at::kHalf, "FP16 scales/zeros expected");
    m.half = values.data_ptr<at::Half>();
  } else {
    TORCH_CHECK(values.scalar_type() == at::kByte, "8-bit scale/zero codes expected");
    TORCH_CHECK(qscale.scalar_type() == at::kHalf && qzero.scalar_type() == at::kHalf, "FP16 meta scale/zero");
    TORCH_CHECK(qscale.is_contiguous() && qzero.is_contiguous(), "meta scale/zero not contiguous");
    const int64_t n_meta = (numel + meta_group - 1) / meta_group;
    TORCH_CHECK(qscale.numel() >= n_meta && qzero.numel() >= n_meta, "meta scale/zero too small");
    m.codes = values.data_ptr<uint8_t>();
    m.qscale = qscale.data_ptr<at::Half>();
    m.qzero = qzero.data_ptr<at::Half>();
    m.group = meta_group;
  }
  return m;
}

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

Index make_index(const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kByte || st == at::kShort || st == at::kInt || st == at::kLong,
              "index tensors must be uint8, int16, int32 or int64");
  TORCH_CHECK(t.is_contiguous(), "index tensor not contiguous");
  return Index{t.data_ptr(), st};
}

struct Outliers {
  const at::Half* values = nullptr;  // FP16 values as stored, or
  const float* values32 = nullptr;   // fp32 values (block outliers converted to CSR); both nullptr: none
  Index col, ptr;
  inline bool any() const { return values != nullptr || values32 != nullptr; }
  inline float value(int64_t j) const { return values != nullptr ? half_to_float(values[j]) : values32[j]; }
};

Outliers make_outliers(const std::optional<at::Tensor>& values, const std::optional<at::Tensor>& col,
                       const std::optional<at::Tensor>& ptr, int64_t N) {
  Outliers o;
  if (!values.has_value() || !values->defined() || values->numel() == 0) return o;
  TORCH_CHECK(col.has_value() && ptr.has_value(), "outliers need column indices and row pointers");
  TORCH_CHECK((values->scalar_type() == at::kHalf || values->scalar_type() == at::kFloat) && values->is_contiguous(),
              "FP16 or fp32 outlier values expected");
  TORCH_CHECK(ptr->numel() == N + 1 && col->numel() == values->numel(), "bad CSR outlier shapes");
  if (values->scalar_type() == at::kHalf) {
    o.values = values->data_ptr<at::Half>();
  } else {
    o.values32 = values->data_ptr<float>();
  }
  o.col = make_index(*col);
  o.ptr = make_index(*ptr);
  return o;
}

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

  inline void decode_row(int64_t n, float* s, float* z) const {
    scale.decode_range(n * geo.G, geo.G, s);
    zero.decode_range(n * geo.G, geo.G, z);
  }

  // zero-point term, outlier corrections, bias, store
  template <int BITS, int MM>
  inline void finish_row(int64_t n, const uint8_t* row, const float* s, const float* z, float* acc) const {
    const int64_t Kp = geo.padded();
    for (int m = 0; m < MM; ++m) {
      float corr = 0.f;
      const float* xs = xsum + m * geo.G;
      for (int64_t g = 0; g < geo.G; ++g) corr += s[g] * z[g] * xs[g];
      acc[m] -= corr;
    }
    if (out.any()) {
      for (int64_t j = out.ptr[n], e = out.ptr[n + 1]; j < e; ++j) {
        const int64_t k = out.col[j];
        const int64_t g = std::min(k / geo.gs, geo.G - 1);
        const int64_t pos = geo.block_start(g) * kBlock + (k - g * geo.gs);
        const int q = code_at<BITS>(row + (pos / kBlock) * 4 * BITS, static_cast<int>(pos % kBlock));
        const float replaced = (static_cast<float>(q) - z[g]) * s[g];
        const float delta = out.value(j) - replaced;
        for (int m = 0; m < MM; ++m) {
          acc[m] += delta * (xp16 != nullptr ? static_cast<float>(xp16[m * Kp + pos]) : xp[m * Kp + pos]);
        }
      }
    }
    for (int m = 0; m < MM; ++m) y[m * geo.N + n] = acc[m] + (bias != nullptr ? bias[n] : 0.f);
  }
};

template <int BITS, int MM>
void gemv_generic(const GemvCtx& c, int64_t n0, int64_t n1) {
  const Geometry& geo = c.geo;
  const int64_t Kp = geo.padded();
  std::vector<float> s(geo.G), z(geo.G);
  alignas(64) uint8_t q[32];
  alignas(64) float qf[32];
  for (int64_t n = n0; n < n1; ++n) {
    c.decode_row(n, s.data(), z.data());
    const uint8_t* row = c.codes + n * c.row_bytes;
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
    float acc[MM];
    for (int m = 0; m < MM; ++m) {
      float t = 0.f;
      for (int i = 0; i < 16; ++i) t += tot[m][i];
      acc[m] = t;
    }
    c.template finish_row<BITS, MM>(n, row, s.data(), z.data(), acc);
  }
}

#ifdef SQ_AVX512
template <int BITS, int MM>
void gemv_avx512(const GemvCtx& c, int64_t n0, int64_t n1) {
  const Geometry& geo = c.geo;
  const int64_t Kp = geo.padded();
  std::vector<float> s(geo.G), z(geo.G);
  for (int64_t n = n0; n < n1; ++n) {
    c.decode_row(n, s.data(), z.data());
    const uint8_t* row = c.codes + n * c.row_bytes;
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
    float acc[MM];
    for (int m = 0; m < MM; ++m) acc[m] = _mm512_reduce_add_ps(tot[m]);
    c.template finish_row<BITS, MM>(n, row, s.data(), z.data(), acc);
  }
}
#endif

#ifdef SQ_AVX512BF16
// bf16 x, 2-4-bit codes: exact bf16 codes times bf16 x, products exact, accumulated in fp32 (vdpbf16ps)
template <int BITS, int MM>
void gemv_avx512bf16(const GemvCtx& c, int64_t n0, int64_t n1) {
  const Geometry& geo = c.geo;
  const int64_t Kp = geo.padded();
  const __m512i lut = bf16_code_table();
  std::vector<float> s(geo.G), z(geo.G);
  const uint16_t* x16 = reinterpret_cast<const uint16_t*>(c.xp16);
  for (int64_t n = n0; n < n1; ++n) {
    c.decode_row(n, s.data(), z.data());
    const uint8_t* row = c.codes + n * c.row_bytes;
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
    float acc[MM];
    for (int m = 0; m < MM; ++m) acc[m] = _mm512_reduce_add_ps(tot[m]);
    c.template finish_row<BITS, MM>(n, row, s.data(), z.data(), acc);
  }
}
#endif

template <int BITS, int MM>
void gemv_rows(const GemvCtx& c, int64_t n0, int64_t n1) {
#ifdef SQ_AVX512BF16
  if constexpr (BITS <= 4) {
    if (c.xp16 != nullptr) return gemv_avx512bf16<BITS, MM>(c, n0, n1);
  }
#endif
#ifdef SQ_AVX512
  if (!g_force_generic.load(std::memory_order_relaxed)) return gemv_avx512<BITS, MM>(c, n0, n1);
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

int64_t grain_rows(int64_t work_per_row) {
  constexpr int64_t kMinWork = 16384;  // codes per thread chunk: below this, threads cost more than they give
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work_per_row));
}

void check_common(const at::Tensor& codes, int64_t bits, const Geometry& geo) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.is_contiguous(),
              "codes must be a contiguous uint8 (out, row_bytes) tensor");
  TORCH_CHECK(codes.size(1) == geo.blocks * 4 * bits, "codes row size does not match the kernel layout");
}

at::Tensor packed_gemv(const at::Tensor& x, const at::Tensor& codes, int64_t bits, int64_t group_size,
                       const at::Tensor& scale, const at::Tensor& scale_qscale, const at::Tensor& scale_qzero,
                       const at::Tensor& zero, const at::Tensor& zero_qscale, const at::Tensor& zero_qzero,
                       int64_t meta_group, const std::optional<at::Tensor>& out_values,
                       const std::optional<at::Tensor>& out_col, const std::optional<at::Tensor>& out_ptr,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (M, K) tensor");
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf, "x must be float32, bfloat16 or float16");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  TORCH_CHECK(M >= 1 && M <= 4, "packed_gemv takes 1 to 4 rows");
  Geometry geo(N, K, group_size);
  check_common(codes, bits, geo);
  auto fopts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor xs = at::empty({M, geo.G}, fopts);
  bool use_bf16 = false;
#ifdef SQ_AVX512BF16
  use_bf16 = xt == at::kBFloat16 && bits <= 4 && !g_force_generic.load();
#endif
  at::Tensor xp = at::zeros({M, geo.padded()}, use_bf16 ? x.options() : fopts);
  if (use_bf16) {
    prepare_x(x.data_ptr<at::BFloat16>(), M, geo, xp.data_ptr<at::BFloat16>(), xs.data_ptr<float>());
  } else switch (xt) {
    case at::kFloat: prepare_x(x.data_ptr<float>(), M, geo, xp.data_ptr<float>(), xs.data_ptr<float>()); break;
    case at::kBFloat16:
      prepare_x(x.data_ptr<at::BFloat16>(), M, geo, xp.data_ptr<float>(), xs.data_ptr<float>());
      break;
    default: prepare_x(x.data_ptr<at::Half>(), M, geo, xp.data_ptr<float>(), xs.data_ptr<float>()); break;
  }
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N && bias->is_contiguous(), "bias must have out_features entries");
    bias_f = at::empty({N}, fopts);
    float* bf = bias_f.data_ptr<float>();
    switch (bias->scalar_type()) {
      case at::kFloat: std::memcpy(bf, bias->data_ptr<float>(), N * sizeof(float)); break;
      case at::kBFloat16: for (int64_t i = 0; i < N; ++i) bf[i] = bias->data_ptr<at::BFloat16>()[i]; break;
      case at::kHalf: for (int64_t i = 0; i < N; ++i) bf[i] = bias->data_ptr<at::Half>()[i]; break;
      default: TORCH_CHECK(false, "bias must be float32, bfloat16 or float16");
    }
  }
  at::Tensor y = at::empty({M, N}, fopts);
  GemvCtx c{geo,
            codes.data_ptr<uint8_t>(),
            codes.size(1),
            make_meta(scale, scale_qscale, scale_qzero, meta_group, N * geo.G),
            make_meta(zero, zero_qscale, zero_qzero, meta_group, N * geo.G),
            make_outliers(out_values, out_col, out_ptr, N),
            use_bf16 ? nullptr : xp.data_ptr<float>(),
            use_bf16 ? xp.data_ptr<at::BFloat16>() : nullptr,
            xs.data_ptr<float>(),
            bias_f.defined() ? bias_f.data_ptr<float>() : nullptr,
            y.data_ptr<float>(),
            M};
  at::parallel_for(0, N, grain_rows(geo.padded() * M), [&](int64_t n0, int64_t n1) { gemv_dispatch(bits, c, n0, n1); });
  if (xt == at::kFloat) return y;
  at::Tensor out = at::empty({M, N}, x.options());
  const float* yf = y.data_ptr<float>();
  if (xt == at::kBFloat16) {
    at::BFloat16* o = out.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < M * N; ++i) o[i] = static_cast<at::BFloat16>(yf[i]);
  } else {
    at::Half* o = out.data_ptr<at::Half>();
    for (int64_t i = 0; i < M * N; ++i) o[i] = static_cast<at::Half>(yf[i]);
  }
  return out;
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
#endif
        unpack_block_u8<BITS>(blk, q);
        for (int64_t i = 0; i < cnt; ++i) dst[i0 + i] = static_cast<T>((static_cast<float>(q[i]) - z[g]) * s[g]);
      }
    }
    if (out.any()) {
      for (int64_t j = out.ptr[n], e = out.ptr[n + 1]; j < e; ++j) {
        wr[out.col[j]] = static_cast<T>(out.value(j));
      }
    }
  }
}

template <typename T>
void dequant_all(int64_t bits, const Geometry& geo, const uint8_t* cp, int64_t rb, const Meta& s, const Meta& z,
                 const Outliers& o, T* wp) {
  at::parallel_for(0, geo.N, grain_rows(geo.padded()), [&](int64_t n0, int64_t n1) {
    switch (bits) {
      case 2: return dequant_rows<2, T>(geo, cp, rb, s, z, o, wp, n0, n1);
      case 3: return dequant_rows<3, T>(geo, cp, rb, s, z, o, wp, n0, n1);
      case 4: return dequant_rows<4, T>(geo, cp, rb, s, z, o, wp, n0, n1);
      default: return dequant_rows<8, T>(geo, cp, rb, s, z, o, wp, n0, n1);
    }
  });
}

at::Tensor packed_dequant(const at::Tensor& codes, int64_t bits, int64_t group_size, int64_t in_features,
                          const at::Tensor& scale, const at::Tensor& scale_qscale, const at::Tensor& scale_qzero,
                          const at::Tensor& zero, const at::Tensor& zero_qscale, const at::Tensor& zero_qzero,
                          int64_t meta_group, const std::optional<at::Tensor>& out_values,
                          const std::optional<at::Tensor>& out_col, const std::optional<at::Tensor>& out_ptr,
                          at::ScalarType dtype, const std::optional<at::Tensor>& out) {
  const int64_t N = codes.size(0);
  Geometry geo(N, in_features, group_size);
  check_common(codes, bits, geo);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "dequantize to float32, bfloat16 or float16");
  const Meta s = make_meta(scale, scale_qscale, scale_qzero, meta_group, N * geo.G);
  const Meta z = make_meta(zero, zero_qscale, zero_qzero, meta_group, N * geo.G);
  const Outliers o = make_outliers(out_values, out_col, out_ptr, N);
  at::Tensor w;
  if (out.has_value() && out->defined()) {  // a reused workspace: no fresh pages to fault in on every call
    TORCH_CHECK(out->scalar_type() == dtype && out->is_contiguous() && out->numel() == N * in_features,
                "out must be a contiguous tensor of out * in elements in dtype");
    w = *out;
  } else {
    w = at::empty({N, in_features}, at::TensorOptions().dtype(dtype));
  }
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const int64_t rb = codes.size(1);
  switch (dtype) {
    case at::kFloat: dequant_all(bits, geo, cp, rb, s, z, o, w.data_ptr<float>()); break;
    case at::kBFloat16: dequant_all(bits, geo, cp, rb, s, z, o, w.data_ptr<at::BFloat16>()); break;
    default: dequant_all(bits, geo, cp, rb, s, z, o, w.data_ptr<at::Half>()); break;
  }
  return w;
}

at::Tensor packed_dequant_into(at::Tensor out, const at::Tensor& codes, int64_t bits, int64_t group_size,
                               int64_t in_features, const at::Tensor& scale, const at::Tensor& scale_qscale,
                               const at::Tensor& scale_qzero, const at::Tensor& zero, const at::Tensor& zero_qscale,
                               const at::Tensor& zero_qzero, int64_t meta_group,
                               const std::optional<at::Tensor>& out_values, const std::optional<at::Tensor>& out_col,
                               const std::optional<at::Tensor>& out_ptr) {
  packed_dequant(codes, bits, group_size, in_features, scale, scale_qscale, scale_qzero, zero, zero_qscale, zero_qzero,
                 meta_group, out_values, out_col, out_ptr, out.scalar_type(), out);
  return out;
}

at::Tensor packed_dequant_new(const at::Tensor& codes, int64_t bits, int64_t group_size, int64_t in_features,
                              const at::Tensor& scale, const at::Tensor& scale_qscale, const at::Tensor& scale_qzero,
                              const at::Tensor& zero, const at::Tensor& zero_qscale, const at::Tensor& zero_qzero,
                              int64_t meta_group, const std::optional<at::Tensor>& out_values,
                              const std::optional<at::Tensor>& out_col, const std::optional<at::Tensor>& out_ptr,
                              at::ScalarType dtype) {
  return packed_dequant(codes, bits, group_size, in_features, scale, scale_qscale, scale_qzero, zero, zero_qscale,
                        zero_qzero, meta_group, out_values, out_col, out_ptr, dtype, std::nullopt);
}

// ---------------------------------------------------------------------------------------------------------------
// y += x @ C^T (+ bias), C a CSR (N, K) matrix with fp32 values; y, x in the same float dtype, y is (M, N).
template <typename T>
void csr_add_impl(T* y, const T* x, int64_t M, int64_t N, int64_t K, const float* vals, const Index& col,
                  const Index& ptr, const T* bias) {
  at::parallel_for(0, N, grain_rows(64 * M), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t j0 = ptr.data != nullptr ? ptr[n] : 0, j1 = ptr.data != nullptr ? ptr[n + 1] : 0;
      for (int64_t m = 0; m < M; ++m) {
        float acc = static_cast<float>(y[m * N + n]);
        if (bias != nullptr) acc += static_cast<float>(bias[n]);
        const T* xr = x + m * K;
        for (int64_t j = j0; j < j1; ++j) acc += vals[j] * static_cast<float>(xr[col[j]]);
        y[m * N + n] = static_cast<T>(acc);
      }
    }
  });
}

at::Tensor csr_add_(at::Tensor y, const at::Tensor& x, const std::optional<at::Tensor>& values,
                    const std::optional<at::Tensor>& col, const std::optional<at::Tensor>& ptr,
                    const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && y.is_contiguous() && x.is_contiguous(), "contiguous 2-D y and x");
  TORCH_CHECK(y.scalar_type() == x.scalar_type() && y.size(0) == x.size(0), "y and x must match");
  const int64_t M = y.size(0), N = y.size(1), K = x.size(1);
  const float* vals = nullptr;
  Index ci, pi;
  if (values.has_value() && values->defined() && values->numel() > 0) {
    TORCH_CHECK(values->scalar_type() == at::kFloat && values->is_contiguous(), "fp32 CSR values expected");
    TORCH_CHECK(col.has_value() && ptr.has_value() && ptr->numel() == N + 1, "bad CSR");
    vals = values->data_ptr<float>();
    ci = make_index(*col);
    pi = make_index(*ptr);
  }
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->scalar_type() == y.scalar_type() && bias->numel() == N && bias->is_contiguous(), "bad bias");
  }
  if (vals == nullptr && !has_bias) return y;
  switch (y.scalar_type()) {
    case at::kFloat:
      csr_add_impl(y.data_ptr<float>(), x.data_ptr<float>(), M, N, K, vals, ci, pi,
                   has_bias ? bias->data_ptr<float>() : nullptr);
      break;
    case at::kBFloat16:
      csr_add_impl(y.data_ptr<at::BFloat16>(), x.data_ptr<at::BFloat16>(), M, N, K, vals, ci, pi,
                   has_bias ? bias->data_ptr<at::BFloat16>() : nullptr);
      break;
    case at::kHalf:
      csr_add_impl(y.data_ptr<at::Half>(), x.data_ptr<at::Half>(), M, N, K, vals, ci, pi,
                   has_bias ? bias->data_ptr<at::Half>() : nullptr);
      break;
    default: TORCH_CHECK(false, "y must be float32, bfloat16 or float16");
  }
  return y;
}

std::string isa() {
#if defined(SQ_AVX512BF16)
  return g_force_generic.load() ? "generic" : "avx512+bf16";
#elif defined(SQ_AVX512)
  return g_force_generic.load() ? "generic" : "avx512";
#else
  return "generic";
#endif
}

bool set_generic(bool flag) { return g_force_generic.exchange(flag); }

}  // namespace

TORCH_LIBRARY(sensiquant, m) {
  m.def(
      "packed_gemv(Tensor x, Tensor codes, int bits, int group_size, Tensor scale, Tensor scale_qscale, "
      "Tensor scale_qzero, Tensor zero, Tensor zero_qscale, Tensor zero_qzero, int meta_group, "
      "Tensor? out_values, Tensor? out_col, Tensor? out_ptr, Tensor? bias) -> Tensor",
      &packed_gemv);
  m.def(
      "packed_dequant(Tensor codes, int bits, int group_size, int in_features, Tensor scale, Tensor scale_qscale, "
      "Tensor scale_qzero, Tensor zero, Tensor zero_qscale, Tensor zero_qzero, int meta_group, "
      "Tensor? out_values, Tensor? out_col, Tensor? out_ptr, ScalarType dtype) -> Tensor",
      &packed_dequant_new);
  m.def(
      "packed_dequant_into(Tensor(a!) out, Tensor codes, int bits, int group_size, int in_features, Tensor scale, "
      "Tensor scale_qscale, Tensor scale_qzero, Tensor zero, Tensor zero_qscale, Tensor zero_qzero, int meta_group, "
      "Tensor? out_values, Tensor? out_col, Tensor? out_ptr) -> Tensor(a!)",
      &packed_dequant_into);
  m.def("csr_add_(Tensor(a!) y, Tensor x, Tensor? values, Tensor? col, Tensor? ptr, Tensor? bias) -> Tensor(a!)",
        &csr_add_);
  m.def("isa() -> str", &isa);
  m.def("set_generic(bool flag) -> bool", &set_generic);
}
