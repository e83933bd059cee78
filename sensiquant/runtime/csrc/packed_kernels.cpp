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
// sensiquant.quant.affine._decode_meta does). Outliers (CSR) replace the dequantized weight at their place; the
// kernels take them as fp32 corrections (value minus the code value it replaces), computed once per layer by
// packed_outlier_deltas, so that a GEMV adds delta * x per outlier and decodes nothing for it.
//
// Ops (namespace torch.ops.sensiquant):
//   packed_gemv(x (M, K), ...)   y = x @ W^T (+ bias), for small M (decode): per output row and group,
//                                 scale * (sum_k q_k x_k - zero * sum_k x_k) accumulated in fp32. act8 (2-4-bit
//                                 codes): x rounded to int8 per block of 32 first, the code products summed in
//                                 integers (AVX512-VNNI / AVX2 byte dot products): y = x~ @ W^T for that rounded x~.
//                                 Ignored (the exact path) on CPUs without those (kAct8) and for 8-bit codes.
//   packed_dequant(..., dtype)   the dense weight in dtype (prefill: one layer at a time), bit-equal to the reference;
//   packed_dequant_into(out, ...) the same into a reused buffer (fresh large buffers cost page faults on every call).
//   packed_outlier_deltas(...)   the fp32 corrections of CSR outliers (FP16 or fp32 values) that the ops above take.
//   csr_add_(y, x, delta, ...)   y += x @ C^T (+ bias) for a CSR matrix C with fp32 values (int4pack corrections).
//   isa()                        "avx512+bf16", "avx512", "avx2", "neon" or "generic": the vector path compiled in
//                                (bf16 x with 2-4-bit codes uses vdpbf16ps on exact bf16 codes; fp32 FMAs otherwise).
// The loops themselves live in packed_core.h.
//   set_generic(flag)            force the portable loops (tests compare both).


#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "packed_core.h"

namespace {

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
Index make_index(const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kByte || st == at::kShort || st == at::kInt || st == at::kLong,
              "index tensors must be uint8, int16, int32 or int64");
  TORCH_CHECK(t.is_contiguous(), "index tensor not contiguous");
  return Index{t.data_ptr(), st};
}

Outliers make_outliers(const std::optional<at::Tensor>& delta, const std::optional<at::Tensor>& col,
                       const std::optional<at::Tensor>& ptr, int64_t N) {
  Outliers o;
  if (!delta.has_value() || !delta->defined() || delta->numel() == 0) return o;
  TORCH_CHECK(col.has_value() && ptr.has_value(), "outliers need column indices and row pointers");
  TORCH_CHECK(delta->scalar_type() == at::kFloat && delta->is_contiguous(),
              "fp32 outlier corrections expected (from packed_outlier_deltas)");
  TORCH_CHECK(ptr->numel() == N + 1 && col->numel() == delta->numel(), "bad CSR outlier shapes");
  o.delta = delta->data_ptr<float>();
  o.col = make_index(*col);
  o.ptr = make_index(*ptr);
  return o;
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
                       int64_t meta_group, const std::optional<at::Tensor>& out_delta,
                       const std::optional<at::Tensor>& out_col, const std::optional<at::Tensor>& out_ptr,
                       const std::optional<at::Tensor>& bias, bool act8) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (M, K) tensor");
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf, "x must be float32, bfloat16 or float16");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  TORCH_CHECK(M >= 1 && M <= 4, "packed_gemv takes 1 to 4 rows");
  Geometry geo(N, K, group_size);
  check_common(codes, bits, geo);
  auto fopts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor xs = at::empty({M, geo.G}, fopts);
  act8 = act8 && bits <= 4 && kAct8;
  bool use_bf16 = false;
#ifdef SQ_AVX512BF16
  use_bf16 = !act8 && xt == at::kBFloat16 && bits <= 4 && !g_force_generic.load();
#endif
  at::Tensor xp = at::zeros({M, geo.padded()}, use_bf16 ? x.options() : fopts);
  at::Tensor xq, xd;
  if (act8) {
    xq = at::empty({M, geo.padded()}, at::TensorOptions().dtype(at::kChar));
    xd = at::empty({M, geo.blocks}, fopts);
    int8_t* qp = xq.data_ptr<int8_t>();
    float* dp = xd.data_ptr<float>();
    switch (xt) {
      case at::kFloat: prepare_x_q8(x.data_ptr<float>(), M, geo, xp.data_ptr<float>(), xs.data_ptr<float>(), qp, dp); break;
      case at::kBFloat16:
        prepare_x_q8(x.data_ptr<at::BFloat16>(), M, geo, xp.data_ptr<float>(), xs.data_ptr<float>(), qp, dp);
        break;
      default: prepare_x_q8(x.data_ptr<at::Half>(), M, geo, xp.data_ptr<float>(), xs.data_ptr<float>(), qp, dp); break;
    }
  } else if (use_bf16) {
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
            make_outliers(out_delta, out_col, out_ptr, N),
            use_bf16 ? nullptr : xp.data_ptr<float>(),
            use_bf16 ? xp.data_ptr<at::BFloat16>() : nullptr,
            xs.data_ptr<float>(),
            bias_f.defined() ? bias_f.data_ptr<float>() : nullptr,
            y.data_ptr<float>(),
            M,
            act8 ? xq.data_ptr<int8_t>() : nullptr,
            act8 ? xd.data_ptr<float>() : nullptr};
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
                          int64_t meta_group, const std::optional<at::Tensor>& out_delta,
                          const std::optional<at::Tensor>& out_col, const std::optional<at::Tensor>& out_ptr,
                          at::ScalarType dtype, const std::optional<at::Tensor>& out) {
  const int64_t N = codes.size(0);
  Geometry geo(N, in_features, group_size);
  check_common(codes, bits, geo);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "dequantize to float32, bfloat16 or float16");
  const Meta s = make_meta(scale, scale_qscale, scale_qzero, meta_group, N * geo.G);
  const Meta z = make_meta(zero, zero_qscale, zero_qzero, meta_group, N * geo.G);
  const Outliers o = make_outliers(out_delta, out_col, out_ptr, N);
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
                               const std::optional<at::Tensor>& out_delta, const std::optional<at::Tensor>& out_col,
                               const std::optional<at::Tensor>& out_ptr) {
  packed_dequant(codes, bits, group_size, in_features, scale, scale_qscale, scale_qzero, zero, zero_qscale, zero_qzero,
                 meta_group, out_delta, out_col, out_ptr, out.scalar_type(), out);
  return out;
}

at::Tensor packed_dequant_new(const at::Tensor& codes, int64_t bits, int64_t group_size, int64_t in_features,
                              const at::Tensor& scale, const at::Tensor& scale_qscale, const at::Tensor& scale_qzero,
                              const at::Tensor& zero, const at::Tensor& zero_qscale, const at::Tensor& zero_qzero,
                              int64_t meta_group, const std::optional<at::Tensor>& out_delta,
                              const std::optional<at::Tensor>& out_col, const std::optional<at::Tensor>& out_ptr,
                              at::ScalarType dtype) {
  return packed_dequant(codes, bits, group_size, in_features, scale, scale_qscale, scale_qzero, zero, zero_qscale,
                        zero_qzero, meta_group, out_delta, out_col, out_ptr, dtype, std::nullopt);
}

template <typename V>
void outlier_deltas_all(int64_t bits, const Geometry& geo, const uint8_t* cp, int64_t rb, const Meta& s,
                        const Meta& z, const V* values, const Index& col, const Index& ptr, float* delta) {
  at::parallel_for(0, geo.N, grain_rows(geo.padded()), [&](int64_t n0, int64_t n1) {
    switch (bits) {
      case 2: return outlier_deltas<2, V>(geo, cp, rb, s, z, values, col, ptr, delta, n0, n1);
      case 3: return outlier_deltas<3, V>(geo, cp, rb, s, z, values, col, ptr, delta, n0, n1);
      case 4: return outlier_deltas<4, V>(geo, cp, rb, s, z, values, col, ptr, delta, n0, n1);
      default: return outlier_deltas<8, V>(geo, cp, rb, s, z, values, col, ptr, delta, n0, n1);
    }
  });
}

// The corrections of CSR outliers (values FP16 or fp32) against the codes they replace (see Outliers).
at::Tensor packed_outlier_deltas(const at::Tensor& codes, int64_t bits, int64_t group_size, int64_t in_features,
                                 const at::Tensor& scale, const at::Tensor& scale_qscale, const at::Tensor& scale_qzero,
                                 const at::Tensor& zero, const at::Tensor& zero_qscale, const at::Tensor& zero_qzero,
                                 int64_t meta_group, const at::Tensor& values, const at::Tensor& col,
                                 const at::Tensor& ptr) {
  const int64_t N = codes.size(0);
  Geometry geo(N, in_features, group_size);
  check_common(codes, bits, geo);
  TORCH_CHECK((values.scalar_type() == at::kHalf || values.scalar_type() == at::kFloat) && values.is_contiguous(),
              "FP16 or fp32 outlier values expected");
  TORCH_CHECK(ptr.numel() == N + 1 && col.numel() == values.numel(), "bad CSR outlier shapes");
  const Meta s = make_meta(scale, scale_qscale, scale_qzero, meta_group, N * geo.G);
  const Meta z = make_meta(zero, zero_qscale, zero_qzero, meta_group, N * geo.G);
  const Index ci = make_index(col), pi = make_index(ptr);
  at::Tensor delta = at::empty({values.numel()}, at::TensorOptions().dtype(at::kFloat));
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const int64_t rb = codes.size(1);
  float* dp = delta.data_ptr<float>();
  if (values.scalar_type() == at::kHalf) {
    outlier_deltas_all(bits, geo, cp, rb, s, z, values.data_ptr<at::Half>(), ci, pi, dp);
  } else {
    outlier_deltas_all(bits, geo, cp, rb, s, z, values.data_ptr<float>(), ci, pi, dp);
  }
  return delta;
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

std::string isa() { return g_force_generic.load() ? "generic" : kIsa; }

bool set_generic(bool flag) { return g_force_generic.exchange(flag); }

}  // namespace

TORCH_LIBRARY(sensiquant, m) {
  m.def(
      "packed_gemv(Tensor x, Tensor codes, int bits, int group_size, Tensor scale, Tensor scale_qscale, "
      "Tensor scale_qzero, Tensor zero, Tensor zero_qscale, Tensor zero_qzero, int meta_group, "
      "Tensor? out_delta, Tensor? out_col, Tensor? out_ptr, Tensor? bias, bool act8=False) -> Tensor",
      &packed_gemv);
  m.def(
      "packed_dequant(Tensor codes, int bits, int group_size, int in_features, Tensor scale, Tensor scale_qscale, "
      "Tensor scale_qzero, Tensor zero, Tensor zero_qscale, Tensor zero_qzero, int meta_group, "
      "Tensor? out_delta, Tensor? out_col, Tensor? out_ptr, ScalarType dtype) -> Tensor",
      &packed_dequant_new);
  m.def(
      "packed_dequant_into(Tensor(a!) out, Tensor codes, int bits, int group_size, int in_features, Tensor scale, "
      "Tensor scale_qscale, Tensor scale_qzero, Tensor zero, Tensor zero_qscale, Tensor zero_qzero, int meta_group, "
      "Tensor? out_delta, Tensor? out_col, Tensor? out_ptr) -> Tensor(a!)",
      &packed_dequant_into);
  m.def(
      "packed_outlier_deltas(Tensor codes, int bits, int group_size, int in_features, Tensor scale, "
      "Tensor scale_qscale, Tensor scale_qzero, Tensor zero, Tensor zero_qscale, Tensor zero_qzero, int meta_group, "
      "Tensor values, Tensor col, Tensor ptr) -> Tensor",
      &packed_outlier_deltas);
  m.def("csr_add_(Tensor(a!) y, Tensor x, Tensor? values, Tensor? col, Tensor? ptr, Tensor? bias) -> Tensor(a!)",
        &csr_add_);
  m.def("isa() -> str", &isa);
  m.def("set_generic(bool flag) -> bool", &set_generic);
}
