"""FastQuantLinear (sensiquant.runtime.fast) against the QuantLinear reference ``F.linear(x, dequantize(), bias)``.

Tolerances are worst-case rounding bounds, not fitted numbers. Every path computes sums of products whose factors
are at most ``A[n, k] = (q + |zero| + 16) * scale + |W|`` in magnitude: ``q * scale`` and ``zero * scale`` (packed
kernel, per-group form), ``(q - 8) * scale`` and ``(8 - zero) * scale`` (int4pack), the outlier value and the
value it replaced (outlier corrections). A dot product of n such terms in fp32, in any order, is off by at most
``gamma_n * sum_k |x_k| A[n, k]`` with ``gamma_n = n u / (1 - n u)``, u = 2^-24 (Higham, Accuracy and Stability of
Numerical Algorithms, eq. 3.5). The reference makes an error of the same kind, so fp32 results must agree within
``2 * gamma_(K+8) * (|x| @ A^T + |bias|)`` (8 spare terms for the zero-point, correction and bias additions).
For bf16 results add ``4 u_bf16 (|x| @ A^T + |bias|)``, u_bf16 = 2^-8: scale and z' rounded to bf16 (int4pack,
2 u), the output rounded to bf16 (u), once more after the outlier/bias pass (u); bf16 x is exact in fp32.
"""

import pytest
import torch
import torch.nn.functional as F

from sensiquant.format import LayerSpec, groups
from sensiquant.format.packing import packed_nbytes
from sensiquant.io import load_model
from sensiquant.methods import quantize_weight
from sensiquant.pipeline import QuantConfig, quantize_model
from sensiquant.runtime import QuantLinear, fast
from sensiquant.runtime import extension as kernels
from sensiquant.runtime.fast import FastQuantLinear, choose_path, convert_to_fast, quant_weight_bytes
from sensiquant.runtime.layout import (
    from_kernel_layout,
    group_widths,
    kernel_group,
    padded_in_features,
    to_kernel_layout,
)

HAS_EXT = kernels.extension_available()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason=f"C++ extension unavailable: {kernels.extension_error()}")


def _layer(out_f, in_f, bits, group, quant_meta=False, outliers=0.0, bias=True, seed=0, outlier_format="csr"):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    mask = (torch.rand(out_f, in_f, generator=gen) < outliers) if outliers else None
    if mask is not None:
        w[mask] *= 8  # outliers are large weights
    spec = LayerSpec(grid="rtn", bits=bits, group_size=group, quant_meta=quant_meta, outlier_format=outlier_format)
    qw = quantize_weight(w, spec, outlier_mask=mask)
    return QuantLinear.from_quantized(qw, torch.randn(out_f, generator=gen) if bias else None)


def _magnitudes(q: QuantLinear) -> torch.Tensor:
    """A[n, k]: a bound on every factor any path multiplies by x[k] for output n (see the module docstring)."""
    qw = q.quantized_weight()
    widths = [p.shape[-1] for p in groups.split_groups(qw.codes[:1], q.spec.group_size) for _ in range(p.shape[1])]
    reps = torch.tensor(widths)
    scale = torch.repeat_interleave(qw.scale, reps, dim=1)
    zero = torch.repeat_interleave(qw.zero, reps, dim=1)
    return (qw.codes.float() + zero.abs() + 16) * scale + q.dequantize().abs()


def _tolerance(x: torch.Tensor, q: QuantLinear, out_dtype: torch.dtype) -> torch.Tensor:
    """Per output element bound on |got - reference|."""
    x2 = x.reshape(-1, q.in_features).float().abs()
    bound = x2 @ _magnitudes(q).t()
    if q.bias is not None:
        bound = bound + q.bias.abs()
    n = q.in_features + 8
    u = 2.0 ** -24
    tol = 2 * (n * u / (1 - n * u)) * bound
    if out_dtype != torch.float32:
        tol = tol + 4 * torch.finfo(out_dtype).eps / 2 * bound  # u = eps / 2
    return tol.reshape(*x.shape[:-1], q.out_features)


def _reference(x: torch.Tensor, q: QuantLinear) -> torch.Tensor:
    return F.linear(x.float(), q.dequantize(), q.bias)


def _paths(q: QuantLinear) -> list[str]:
    paths = ["dequant"]
    if HAS_EXT:
        paths.append("packed")
    if q.spec.bits <= 4 and q.out_features % 16 == 0 and kernel_group(q.in_features, q.spec.group_size):
        paths.append("int4pack")
    return paths


def _check(fast_layer: FastQuantLinear, q: QuantLinear, shapes, dtype, tol_dtype=None):
    """Outputs for x of each batch shape in ``dtype`` within the rounding bound of ``tol_dtype`` (default dtype)."""
    gen = torch.Generator().manual_seed(1)
    for shape in shapes:
        x = torch.randn(*shape, q.in_features, generator=gen).to(dtype)
        with torch.no_grad():
            got = fast_layer(x)
        ref = _reference(x, q)
        assert got.shape == ref.shape and got.dtype == dtype
        err = (got.float() - ref).abs()
        tol = _tolerance(x, q, tol_dtype or dtype)
        assert bool((err <= tol).all()), f"{fast_layer.path} {shape} {dtype}: max err {err.max():.3g}, " \
                                         f"worst err/tol {(err / tol).max():.3g}"


# ---------------------------------------------------------------------------------------------------------------
# layout and path selection


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_f, group", [(192, 32), (192, 64), (192, 128), (96, 80), (100, None), (70, 20)])
def test_kernel_layout_round_trip_and_size(bits, in_f, group):
    codes = torch.randint(0, 2**bits, (5, in_f), generator=torch.Generator().manual_seed(bits))
    packed = to_kernel_layout(codes.to(torch.uint8), bits, group)
    assert packed.dtype == torch.uint8 and packed.shape == (5, padded_in_features(in_f, group) * bits // 8)
    assert torch.equal(from_kernel_layout(packed, bits, in_f, group), codes.to(torch.uint8))
    if all(w % 32 == 0 for w in [min(group or in_f, in_f), in_f % (group or in_f)]):
        assert packed.numel() == packed_nbytes(5 * in_f, bits)  # exactly the stored bits when no padding is needed


def test_kernel_group_divides_every_group():
    assert kernel_group(576, 128) == 64  # 4 x 128 + a tail of 64
    assert kernel_group(576, 64) == 64 and kernel_group(1536, 128) == 128 and kernel_group(512, 256) == 256
    assert kernel_group(96, 48) is None and kernel_group(100, 32) is None
    assert kernel_group(256, None) == 256 and kernel_group(1024, None) == 256  # per channel


def test_path_selection(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    bf16 = torch.bfloat16
    packed_or_dequant = "packed" if HAS_EXT else "dequant"
    assert choose_path(_layer(48, 192, 4, 64), bf16) == "int4pack"
    assert choose_path(_layer(48, 192, 4, 128), bf16) == "int4pack"  # tail of 64: kernel group 64, 2x metadata, +6%
    assert choose_path(_layer(48, 192, 3, 64), bf16) == packed_or_dequant
    assert choose_path(_layer(48, 192, 3, 64), bf16, widen=True) == "int4pack"
    assert choose_path(_layer(48, 192, 2, 32), bf16, widen=True) == "int4pack"
    assert choose_path(_layer(48, 192, 8, 64), bf16, widen=True) == packed_or_dequant
    assert choose_path(_layer(40, 96, 4, 32), bf16) == packed_or_dequant  # out % 16 != 0
    assert choose_path(_layer(48, 96, 4, 48), bf16) == packed_or_dequant  # no kernel group
    assert choose_path(_layer(48, 192, 4, 64), torch.float32) == packed_or_dequant  # fp32 int4pack kernel is slow
    assert choose_path(_layer(48, 192, 4, 64), torch.float16) == packed_or_dequant  # so is the fp16 one
    # memory budget: metadata repeated or widened beyond 10 % of the stored bytes
    assert choose_path(_layer(48, 576, 4, None), bf16) == packed_or_dequant  # per channel -> 9 groups of 64
    assert choose_path(_layer(48, 192, 4, 32, quant_meta=True), bf16) == packed_or_dequant  # 8-bit meta -> bf16
    # without AVX-512 PyTorch's int4 kernel is slower than ours: 4-bit takes it only widened or without the extension
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert choose_path(_layer(48, 192, 4, 64), bf16) == ("packed" if HAS_EXT else "int4pack")
    assert choose_path(_layer(48, 192, 3, 64), bf16, widen=True) == "int4pack"


@pytest.mark.parametrize("bits, group, quant_meta, outliers", [
    (4, 64, False, 0.0), (4, 128, True, 0.02), (3, 64, False, 0.02), (2, 32, True, 0.0), (8, 128, False, 0.01),
    (3, 80, False, 0.0),
])
def test_memory_is_the_stored_bits(bits, group, quant_meta, outliers):
    q = _layer(48, 192, bits, group, quant_meta, outliers, bias=False)
    stored = sum(t.numel() * t.element_size() for t in q.stored_tensors().values())
    assert stored * 8 == q.storage_bits()
    for path in _paths(q):
        f = FastQuantLinear.from_quant_linear(q, dtype=torch.bfloat16, path=path)
        names = dict(f.named_buffers())
        assert "qweight" not in names or path == "dequant"  # no duplicate of the stored codes
        assert not any(b.is_floating_point() and b.numel() >= 48 * 192 for b in names.values())  # no dense weight
        corrections = 2 * q.n_outliers  # outliers held as fp32 corrections: 2 bytes more than FP16 values
        if path == "packed" and group % 32 == 0:
            assert f.weight_bytes() == stored + corrections  # codes re-laid out, metadata as stored
        if path == "packed":
            assert f.weight_bytes() <= stored + corrections + 48 * (padded_in_features(192, group) - 192) * bits // 8
        if path == "int4pack" and bits == 4 and choose_path(q, torch.bfloat16) == "int4pack":
            assert f.weight_bytes() <= 1.1 * stored


# ---------------------------------------------------------------------------------------------------------------
# numerics of every path against the reference


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, 80])  # in=192: 128 leaves a tail of 64, 80 a tail of 32
@pytest.mark.parametrize("outliers, outlier_format", [(0.0, "csr"), (0.03, "csr"), (0.03, "block")])
@pytest.mark.parametrize("quant_meta", [False, True])
def test_every_path_matches_the_reference(bits, group, outliers, outlier_format, quant_meta):
    q = _layer(48, 192, bits, group, quant_meta, outliers, outlier_format=outlier_format)
    for path in _paths(q):
        f = FastQuantLinear.from_quant_linear(q, dtype=torch.float32, path=path)
        assert f.path == path
        _check(f, q, [(1, 1), (2, 5), (3,), (4,)], torch.float32)
        fb = FastQuantLinear.from_quant_linear(q, dtype=torch.bfloat16, path=path)
        _check(fb, q, [(1, 1), (2, 5)], torch.bfloat16)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("out_f, in_f, group", [(40, 96, 32), (17, 100, None), (17, 70, 20), (32, 576, 128)])
@pytest.mark.parametrize("outliers, outlier_format", [(0.0, "csr"), (0.05, "csr"), (0.05, "block")])
def test_odd_shapes(bits, out_f, in_f, group, outliers, outlier_format):
    q = _layer(out_f, in_f, bits, group, quant_meta=bits == 3, outliers=outliers, outlier_format=outlier_format)
    for dtype in (torch.float32, torch.bfloat16):
        f = FastQuantLinear.from_quant_linear(q, dtype=dtype, widen=True)
        assert f.path in _paths(q)
        _check(f, q, [(1, 1), (2, 5), (1, 4)], dtype)


@needs_ext
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_dequantize_is_bit_exact_and_prefill_equals_reference(bits):
    q = _layer(48, 192, bits, 80, quant_meta=bits != 8, outliers=0.05)
    f = FastQuantLinear.from_quant_linear(q, dtype=torch.float32, path="packed")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(f.dequantize(dtype), q.dequantize(dtype))
    x = torch.randn(2, 7, 192)  # 14 rows > GEMV_MAX_ROWS: dequantize + F.linear, the reference's own computation
    with torch.no_grad():
        assert torch.equal(f(x), q(x))
        assert torch.equal(f(x.bfloat16()), q(x.bfloat16()))


@needs_ext
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group, quant_meta, outliers, outlier_format",
                         [(64, False, 0.0, "csr"), (80, True, 0.05, "csr"), (None, False, 0.03, "csr"),
                          (64, True, 0.05, "block")])
def test_packed_bf16_decode_rounds_once(bits, group, quant_meta, outliers, outlier_format):
    """The packed kernel computes bf16 x in fp32 (bf16 dot products of exact codes for 2-4 bits) and rounds once:
    within u_bf16 * (|y| + |bias|) (output and bias rounding) of the reference plus the fp32 bound, a far
    tighter check than the generic bf16 bound."""
    q = _layer(48, 192, bits, group, quant_meta, outliers, outlier_format=outlier_format)
    f = FastQuantLinear.from_quant_linear(q, dtype=torch.bfloat16, path="packed")
    x = torch.randn(4, 192).bfloat16()
    for rows in (1, 2, 3, 4):
        with torch.no_grad():
            got = f(x[:rows]).float()
        ref = _reference(x[:rows], q)
        u = 2.0 ** -8
        tol = u * (ref.abs() + q.bias.abs()) + (1 + u) * _tolerance(x[:rows], q, torch.float32)
        assert bool(((got - ref).abs() <= tol).all()), ((got - ref).abs() / tol).max()


def _cpu_flags() -> set[str]:
    for line in open("/proc/cpuinfo").read().splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


@needs_ext
def test_the_vector_loops_of_this_cpu_are_compiled_in():
    """A -march=native build runs AVX-512 loops on AVX-512 CPUs and AVX2 ones on AVX2-only CPUs, never silently the
    portable loops (the tests above then check those vector loops against the reference)."""
    if kernels.build_extension()["variant"] != "native":
        pytest.skip("the extension fell back to a portable build")
    flags = _cpu_flags()
    expected = "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma", "f16c"} <= flags else "generic"
    assert str(torch.ops.sensiquant.isa()).startswith(expected)


@needs_ext
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_portable_loops_match_the_vector_kernels(bits):
    q = _layer(48, 192, bits, 64, quant_meta=True, outliers=0.03)
    f = FastQuantLinear.from_quant_linear(q, dtype=torch.float32, path="packed")
    x = torch.randn(3, 192)
    previous = torch.ops.sensiquant.set_generic(True)
    try:
        with torch.no_grad():
            generic, generic_bf16 = f(x), f(x.bfloat16())
        assert torch.equal(f.dequantize(), q.dequantize())
    finally:
        torch.ops.sensiquant.set_generic(previous)
    err = (generic - _reference(x, q)).abs()
    assert bool((err <= _tolerance(x, q, torch.float32)).all())
    assert bool(((generic_bf16.float() - _reference(x.bfloat16(), q)).abs()
                 <= _tolerance(x.bfloat16(), q, torch.bfloat16)).all())


def test_float16_activations():
    q = _layer(48, 192, 4, 64, outliers=0.02)
    for path in _paths(q):
        f = FastQuantLinear.from_quant_linear(q, dtype=torch.float16, path=path)
        _check(f, q, [(1, 1), (3,)], torch.float16)


def test_int4pack_dequantize_matches_reference():
    q = _layer(48, 192, 4, 128, outliers=0.03)
    f = FastQuantLinear.from_quant_linear(q, dtype=torch.float32, path="int4pack")
    w = q.dequantize()
    tol = 4 * 2.0 ** -24 * _magnitudes(q)
    assert bool(((f.dequantize() - w).abs() <= tol).all())


def test_int4pack_corrections_without_the_extension(monkeypatch):
    q = _layer(48, 192, 3, 64, outliers=0.03)
    f = FastQuantLinear.from_quant_linear(q, dtype=torch.float32, path="int4pack")
    monkeypatch.setitem(kernels._ext_state, "info", None)  # forward falls back to PyTorch ops for the corrections
    _check(f, q, [(1, 1), (2, 5)], torch.float32)


def test_fallback_without_the_extension(monkeypatch):
    monkeypatch.setattr(fast, "extension_available", lambda: False)
    q = _layer(40, 96, 3, 32, quant_meta=True, outliers=0.05)
    f = FastQuantLinear.from_quant_linear(q, dtype=torch.float32)
    assert f.path == "dequant" and "no C++ extension" in f.kernel_name
    assert f.weight_bytes() * 8 == q.storage_bits()
    _check(f, q, [(1, 1), (2, 5)], torch.float32)
    with pytest.raises(ValueError):
        FastQuantLinear.from_quant_linear(q, path="packed")
    with pytest.raises(ValueError):
        FastQuantLinear.from_quant_linear(q, path="int4pack")  # out % 16 != 0


def test_casting_the_module_keeps_kernel_buffers():
    q = _layer(48, 192, 3, 64, quant_meta=False, outliers=0.03)
    for path in _paths(q):
        f = FastQuantLinear.from_quant_linear(q, dtype=torch.bfloat16, path=path)
        before = {name: b.dtype for name, b in f.named_buffers()}
        f.half()
        assert {name: b.dtype for name, b in f.named_buffers()} == before
        assert f.bias.dtype == torch.float16
        _check(f, q, [(1, 1)], torch.float16, tol_dtype=torch.bfloat16)  # int4pack metadata stays bf16-rounded


# ---------------------------------------------------------------------------------------------------------------
# block outliers: converted to CSR with exact fp32 values at conversion, the same bounds


def _block(out_f, in_f, bits, group, quant_meta=False, outliers=0.03, bias=True, seed=0):
    q = _layer(out_f, in_f, bits, group, quant_meta, outliers, bias, seed, outlier_format="block")
    assert "outlier_offsets" in q.tensor_names and q.n_outliers > 0
    return q


@needs_ext
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_block_outliers_packed_dequantize_is_bit_exact(bits):
    q = _block(48, 192, bits, 80, quant_meta=bits != 8, outliers=0.05)
    f = FastQuantLinear.from_quant_linear(q, dtype=torch.float32, path="packed")
    assert f.outlier_delta.dtype == torch.float32 and f.outlier_delta.numel() == q.n_outliers
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(f.dequantize(dtype), q.dequantize(dtype))
    x = torch.randn(2, 7, 192)  # prefill: dequantize + F.linear, the reference's own computation
    with torch.no_grad():
        assert torch.equal(f(x), q(x))
        assert torch.equal(f(x.bfloat16()), q(x.bfloat16()))
    previous = torch.ops.sensiquant.set_generic(True)
    try:
        assert torch.equal(f.dequantize(), q.dequantize())
        x = torch.randn(3, 192)
        with torch.no_grad():
            generic = f(x)
    finally:
        torch.ops.sensiquant.set_generic(previous)
    assert bool(((generic - _reference(x, q)).abs() <= _tolerance(x, q, torch.float32)).all())


def test_block_outliers_int4pack_and_fallbacks(monkeypatch):
    q = _block(48, 192, 4, 128, outliers=0.03)
    f = FastQuantLinear.from_quant_linear(q, dtype=torch.float32, path="int4pack")
    assert bool(((f.dequantize() - q.dequantize()).abs() <= 4 * 2.0 ** -24 * _magnitudes(q)).all())
    monkeypatch.setitem(kernels._ext_state, "info", None)  # corrections through PyTorch ops
    _check(f, q, [(1, 1), (2, 5)], torch.float32)
    monkeypatch.setattr(fast, "extension_available", lambda: False)
    q = _block(40, 96, 3, 32, quant_meta=True, outliers=0.05)
    d = FastQuantLinear.from_quant_linear(q, dtype=torch.float32)
    assert d.path == "dequant" and d.weight_bytes() * 8 == q.storage_bits()
    _check(d, q, [(1, 1), (2, 5)], torch.float32)


@pytest.mark.parametrize("bits, group, quant_meta", [(4, 64, False), (3, 64, True), (2, 32, False), (8, 128, False)])
def test_block_outliers_memory(bits, group, quant_meta):
    q = _block(48, 192, bits, group, quant_meta, outliers=0.02, bias=False)
    stored = q.stored_tensors()
    stored_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    assert stored_bytes * 8 == q.storage_bits()
    csr = _layer(48, 192, bits, group, quant_meta, 0.02, bias=False)
    assert csr.n_outliers == q.n_outliers and q.storage_bits() < csr.storage_bits()
    block_bytes = sum(t.numel() * t.element_size() for name, t in stored.items() if name.startswith("outlier_"))
    csr_bytes = sum(t.numel() * t.element_size() for name, t in csr.stored_tensors().items()
                    if name.startswith("outlier_"))
    for path in _paths(q):
        f = FastQuantLinear.from_quant_linear(q, dtype=torch.bfloat16, path=path)
        if path == "dequant":
            assert f.weight_bytes() == stored_bytes  # as stored
        if path == "packed":  # the blocks held as fp32 corrections in CSR, as an FP16 CSR layer is
            g = FastQuantLinear.from_quant_linear(csr, dtype=torch.bfloat16, path=path)
            assert f.weight_bytes() == g.weight_bytes()
            assert f.weight_bytes() == stored_bytes - block_bytes + csr_bytes + 2 * q.n_outliers
        if path == "int4pack":  # the same fp32 corrections as a CSR layer
            g = FastQuantLinear.from_quant_linear(csr, dtype=torch.bfloat16, path=path)
            assert f.weight_bytes() == g.weight_bytes()


@needs_ext
def test_build_extension_reports_the_build():
    info = kernels.build_extension()
    assert info["isa"] in ("avx512+bf16", "avx512", "avx2", "neon", "generic") and info["seconds"] >= 0
    assert kernels.build_extension() is info  # built (or loaded) once per process


# ---------------------------------------------------------------------------------------------------------------
# whole models


@pytest.mark.parametrize("spec, int4pack_fp32", [
    (LayerSpec(grid="rtn", bits=4, group_size=32), True),
    (LayerSpec(grid="hqq", bits=3, group_size=64, quant_meta=True), False),
])
def test_convert_to_fast_keeps_the_logits(tiny_llama, monkeypatch, spec, int4pack_fp32):
    if int4pack_fp32:  # exercise int4pack in an fp32 model too (slow kernel, fp32 metadata: fine for a tiny model)
        monkeypatch.setattr(fast, "INT4PACK_DTYPES", (torch.float32, torch.bfloat16, torch.float16))
        monkeypatch.setattr(fast, "MEMORY_SLACK", 1.0)
    model, _ = load_model(str(tiny_llama))
    quantize_model(model, QuantConfig(default=spec), progress=False)
    # one layer with FP16 outliers too
    down = model.model.layers[0].mlp.down_proj
    w = down.dequantize()
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) < 0.02
    model.model.layers[0].mlp.down_proj = QuantLinear.from_quantized(quantize_weight(w, spec, outlier_mask=mask))
    stored = sum(m.storage_bits() for m in model.modules() if isinstance(m, QuantLinear)) // 8
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits
        paths = convert_to_fast(model, dtype=torch.float32)
        got = model(ids).logits
        decode = model(ids[:1, :1]).logits  # batch 1, one token: the decode kernels (position 0 sees only itself)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert len(paths) == 14 and sum(isinstance(m, FastQuantLinear) for m in model.modules()) == 14
    expected = {"packed"} if HAS_EXT else {"dequant"}
    if int4pack_fp32:
        expected = expected | {"int4pack"}  # attention projections: out 96 / 48, multiples of 16, in 96 = 3 x 32
    assert set(paths.values()) == expected
    # per-layer errors are ~1e-6 relative (fp32 rounding, see the module docstring); two layers hardly amplify them
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= 1e-4 * scale
    assert decode.shape == (1, 1, 256)
    assert (decode - ref[:1, :1]).abs().max().item() <= 1e-4 * scale
    total = quant_weight_bytes(model)
    assert total == sum(m.weight_bytes() for m in model.modules() if isinstance(m, FastQuantLinear))
    assert total <= 1.2 * stored


def test_convert_to_fast_bf16_casts_the_rest(tiny_llama):
    model, _ = load_model(str(tiny_llama))
    quantize_model(model, QuantConfig(default=LayerSpec(grid="rtn", bits=4, group_size=32)), progress=False)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids).logits
        paths = convert_to_fast(model, dtype=torch.bfloat16)
        got = model(ids).logits
    assert ("int4pack" if fast.int4pack_preferred() else "packed") in paths.values()
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and got.dtype == torch.bfloat16
    # bf16 activations through 2 layers: a few bf16 ulps of the logit scale, and the same top token nearly always
    assert (got.float() - ref).abs().max().item() <= 0.1 * ref.abs().max().item()
    assert (got.float().argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.75


def _round_x_per_block(x: torch.Tensor, in_f: int, group: int | None) -> torch.Tensor:
    """x rounded as the act8 GEMV rounds it: per block of 32 columns inside each group, int8 with scale max|x|/127."""
    out = torch.zeros_like(x)
    start = 0
    for width in group_widths(in_f, group):
        for b in range(start, start + width, 32):
            seg = x[:, b:min(b + 32, start + width)]
            d = seg.abs().amax(dim=1, keepdim=True) / 127
            out[:, b:b + seg.shape[1]] = torch.where(d > 0, torch.round(seg / d).clamp(-127, 127) * d, 0.0)
        start += width
    return out


@needs_ext
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group, quant_meta, outliers", [(64, True, 0.03), (48, False, 0.0), (None, False, 0.03)])
def test_act8_gemv_is_the_product_of_the_int8_rounded_x(bits, group, quant_meta, outliers):
    """act8 computes y = x~ W^T for x rounded to int8 per block of 32 (the vector and portable loops agree), leaves
    8-bit layers and more than GEMV_MAX_ROWS rows exact, and is off unless asked for."""
    q = _layer(48, 176, bits, group, quant_meta=quant_meta, outliers=outliers)
    layer = FastQuantLinear.from_quant_linear(q, dtype=torch.float32, path="packed")
    assert not layer.act8
    x = torch.randn(2, 176, generator=torch.Generator().manual_seed(5))
    x_round = _round_x_per_block(x, 176, group)
    ref = _reference(x_round, q)
    tol = _tolerance(x_round, q, torch.float32) * 2
    got = {}
    for generic in (False, True):
        prev = torch.ops.sensiquant.set_generic(generic)
        try:
            with torch.no_grad():
                got[generic] = layer.decode_fn(act8=True)(x)
        finally:
            torch.ops.sensiquant.set_generic(prev)
    if torch.ops.sensiquant.isa() in ("avx512+bf16", "avx512", "avx2"):
        for y in got.values():
            assert bool(((y - ref).abs() <= tol).all()), (y - ref).abs().max()
        assert not torch.equal(got[False], _reference(x, q))  # x really was rounded
    with torch.no_grad():  # the module itself stayed exact, and so do prefill-sized inputs of the direct call
        assert bool(((layer(x) - _reference(x, q)).abs() <= _tolerance(x, q, torch.float32)).all())
        x8 = torch.randn(8, 176, generator=torch.Generator().manual_seed(6))
        assert bool(((layer.decode_fn(act8=True)(x8) - _reference(x8, q)).abs()
                     <= _tolerance(x8, q, torch.float32)).all())
    eight = FastQuantLinear.from_quant_linear(_layer(48, 176, 8, group), dtype=torch.float32, path="packed")
    with torch.no_grad():
        torch.testing.assert_close(eight.decode_fn(act8=True)(x), eight(x), rtol=0, atol=0)
