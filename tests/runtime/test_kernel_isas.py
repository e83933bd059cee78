"""Every vector path of the packed kernels against their portable loops, one ISA at a time.

``csrc/kernel_check.cpp`` compiles ``sensiquant/runtime/csrc/packed_core.h`` alone (no libtorch) and compares the
vector GEMV with the portable loops within the fp32 rounding bound and the vector dequantization bit for bit, on
seeded layers of 2/3/4/8-bit codes with FP16 and 8-bit scales and CSR outliers. It runs for this CPU
(``-march=native``: AVX-512 or AVX2 here), for a plain AVX2 + FMA + F16C build on an x86 CPU that has them (the
path an AVX2-only machine takes, also on an AVX-512 machine), and cross-compiled for aarch64 (NEON) under
qemu-user where ``aarch64-linux-gnu-g++`` and ``qemu-aarch64`` are installed (``.ci/run`` installs them).
The portable loops themselves are checked against the reference in ``test_kernels.py``.
"""

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CORE = HERE.parents[1] / "sensiquant" / "runtime" / "csrc"
CHECK = HERE / "csrc" / "kernel_check.cpp"


def _flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _run_check(tmp_path: Path, compiler: str, flags: list[str], runner: list[str]) -> str:
    binary = tmp_path / "kernel_check"
    subprocess.run([compiler, "-std=c++17", "-O2", "-DSQ_STANDALONE", f"-I{CORE}", f"-I{CHECK.parent}", *flags,
                    str(CHECK), "-o", str(binary)], check=True, capture_output=True, text=True)
    done = subprocess.run([*runner, str(binary)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = re.search(r"^(\d+) passed, (\d+) failed$", done.stdout, re.M)
    assert summary and int(summary.group(1)) >= 200 and summary.group(2) == "0", done.stdout[-2000:]
    return re.search(r"^isa: (\S+)$", done.stdout, re.M).group(1)


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
def test_native_vector_path(tmp_path):
    isa = _run_check(tmp_path, "g++", ["-march=native"], [])
    flags = _flags()
    if "avx512f" in flags:
        assert isa.startswith("avx512")
    elif {"avx2", "fma", "f16c"} <= flags:
        assert isa == "avx2"
    elif platform.machine() == "aarch64":
        assert isa == "neon"


@pytest.mark.skipif(shutil.which("g++") is None or not {"avx2", "fma", "f16c"} <= _flags(),
                    reason="needs g++ and an x86 CPU with AVX2, FMA and F16C")
def test_avx2_path(tmp_path):
    assert _run_check(tmp_path, "g++", ["-mavx2", "-mfma", "-mf16c"], []) == "avx2"


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None or shutil.which("qemu-aarch64") is None,
                    reason="needs aarch64-linux-gnu-g++ and qemu-aarch64 (Debian: g++-aarch64-linux-gnu qemu-user)")
def test_neon_path_under_qemu(tmp_path):
    assert _run_check(tmp_path, "aarch64-linux-gnu-g++", ["-static"], ["qemu-aarch64"]) == "neon"
