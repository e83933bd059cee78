"""The config ladder: the (bits, group size) pairs a layer-wise bit allocator may choose from.

Every rung is stored as HQQ/MXQ-style quantized metadata: scales and zeros in 8 bits per group of ``group_size``
weights, each of those two 8-bit tensors carrying its own FP16 scale and zero per ``META_GROUP_SIZE`` (128) groups.
That gives, for a matrix whose dimensions divide evenly,

    bits/param = b + 2 * 8 / g + 2 * 32 / (g * 128)

which is exactly what :func:`sensiquant.format.bits_per_param` counts for :meth:`LadderConfig.spec` (the test suite
checks this on a 4096 x 4096 matrix). The MXQ paper writes ``b + 2 * 8 / g + 32 / (g * 128)`` instead: there only the
scales get a second-level FP16 scale + zero per 128 while the zeros use a single global one, so our metadata costs
``32 / (g * 128)`` more bits per weight (0.002 bits at g=128, 0.008 at g=32). We keep the count our checkpoints
really store.

GGUF rungs (``Q4_0``, ``Q3_K``, ... of :mod:`sensiquant.format.ggml`) store a matrix as llama.cpp's block of that
type does, at that type's bits/param, so that a plan made of them exports to GGUF as it is (``--ladder gguf``). On
rows that are not whole super-blocks a K-type rung costs (and is) llama.cpp's fallback type.

The ladder is sorted by nominal bits/param, cheapest first, so "stepping up" a rung always buys precision.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import SensiquantError
from ..format.ggml import TYPES as GGUF_TYPES
from ..format.spec import LayerSpec, check_bits

META_GROUP_SIZE = 128  # second-level group of the 8-bit scales and zeros
LADDER_BITS = (2, 3, 4, 8)
LADDER_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class LadderConfig:
    """One rung: ``bits``-bit codes with one (8-bit) scale and zero per ``group_size`` weights, or a GGUF block
    type (``gguf``; see :meth:`of_gguf`)."""

    bits: int
    group_size: int
    gguf: str | None = None

    @classmethod
    def of_gguf(cls, name: str) -> LadderConfig:
        t = GGUF_TYPES[name]
        return cls(t.bits, t.group, name)

    def __post_init__(self) -> None:
        if self.gguf is not None:
            if self.gguf not in GGUF_TYPES:
                raise SensiquantError(f"unknown GGUF rung {self.gguf!r}: choose one of {', '.join(GGUF_TYPES)}")
            return
        check_bits(self.bits)
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise SensiquantError(f"ladder group size must be a positive integer, got {self.group_size!r}")

    @property
    def name(self) -> str:
        """Short label, e.g. ``"b3g128"``, or the GGUF type (``"Q4_K"``)."""
        return self.gguf or f"b{self.bits}g{self.group_size}"

    @property
    def nominal_bits_per_param(self) -> float:
        """Stored bits per weight when the group sizes divide the matrix: b + 2*8/g + 2*32/(g*128).

        Codes, plus 8-bit scales and 8-bit zeros (one each per group), plus an FP16 scale and FP16 zero for each of
        those two tensors per 128 groups. See the module docstring for how this differs from the MXQ paper.
        """
        if self.gguf is not None:
            return GGUF_TYPES[self.gguf].bits_per_weight
        g = self.group_size
        return self.bits + 2 * 8 / g + 2 * 32 / (g * META_GROUP_SIZE)

    def spec(self, grid: str = "hqq", outlier_ratio: float = 0.0, outlier_format: str = "csr") -> LayerSpec:
        """The :class:`LayerSpec` that stores a matrix with this rung (8-bit metadata, meta groups of 128), with
        ``outlier_ratio`` of its weights as outliers in ``outlier_format``. A GGUF rung keeps no outliers."""
        if self.gguf is not None:
            if outlier_ratio:
                raise SensiquantError(f"GGUF rung {self.gguf} keeps no outliers")
            return LayerSpec(grid=grid, gguf=self.gguf)
        return LayerSpec(
            grid=grid,
            outlier_ratio=outlier_ratio,
            outlier_format=outlier_format,
            bits=self.bits,
            group_size=self.group_size,
            quant_meta=True,
            meta_group_size=META_GROUP_SIZE,
        )

    @classmethod
    def from_name(cls, name: str) -> LadderConfig:
        """Parse a label such as ``"b4g64"`` or ``"Q4_K"`` (the inverse of :attr:`name`)."""
        if name.strip().upper() in GGUF_TYPES:
            return cls.of_gguf(name.strip().upper())
        text = name.strip().lower()
        try:
            if not text.startswith("b") or "g" not in text:
                raise ValueError
            bits, group = text[1:].split("g", 1)
            return cls(int(bits), int(group))
        except ValueError:
            raise SensiquantError(f"bad ladder config name {name!r}: expected e.g. 'b3g128' or a GGUF type "
                                  "such as 'Q4_K'") from None


def _ladder_key(config: LadderConfig) -> tuple[float, int, int]:
    # Ties in nominal cost (none in the default ladder) are broken by fewer bits first, then larger groups.
    return (config.nominal_bits_per_param, config.bits, -config.group_size)


def sort_ladder(configs: Iterable[LadderConfig]) -> tuple[LadderConfig, ...]:
    """Deduplicate ``configs`` and sort them by nominal bits/param, cheapest first."""
    return tuple(sorted(set(configs), key=_ladder_key))


def make_ladder(
    bits: Iterable[int] = LADDER_BITS, group_sizes: Iterable[int] = LADDER_GROUP_SIZES
) -> tuple[LadderConfig, ...]:
    """Every (bits, group size) combination, sorted by nominal bits/param ascending."""
    group_sizes = tuple(group_sizes)
    return sort_ladder(LadderConfig(b, g) for b in bits for g in group_sizes)


DEFAULT_LADDER: tuple[LadderConfig, ...] = make_ladder()
# every GGUF type, for plans that export to llama.cpp as they are (``--ladder gguf``)
GGUF_LADDER: tuple[LadderConfig, ...] = sort_ladder(LadderConfig.of_gguf(name) for name in GGUF_TYPES)


def expand_ladder(names) -> tuple[str, ...]:
    """Rung names with ``"gguf"`` standing for every GGUF type."""
    out: list[str] = []
    for name in names:
        out.extend(c.name for c in GGUF_LADDER) if name.strip().lower() == "gguf" else out.append(name)
    return tuple(dict.fromkeys(out))


def step_up(config: LadderConfig, ladder: Sequence[LadderConfig] = DEFAULT_LADDER, steps: int = 1) -> LadderConfig:
    """The rung ``steps`` places above ``config`` on ``ladder`` (sorted by nominal cost), clamped at both ends.

    Used to boost layers flagged as outliers (SensiBoost/KurtBoost): their MXQ choice is moved up a fixed number of
    rungs. ``ladder`` is re-sorted here, so a caller-built list in any order behaves the same; a negative ``steps``
    steps down (clamped at the cheapest rung).
    """
    rungs = sort_ladder(ladder)
    if not rungs:
        raise ValueError("empty ladder")
    if config not in rungs:
        raise ValueError(f"{config.name} is not on the ladder ({', '.join(c.name for c in rungs)})")
    index = rungs.index(config) + int(steps)
    return rungs[min(max(index, 0), len(rungs) - 1)]
