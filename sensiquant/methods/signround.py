"""Block-output tuning of the rounding (SignRound, Cheng et al. 2023, the method behind AutoRound), written from the
paper on sensiquant's own grids: every weight gets a rounding offset ``v`` in [-0.5, 0.5] and every group a scale
factor and a zero shift; signed gradient descent moves them to lower the MSE between the quantized block's output
(on the quantized model's inputs) and the full-precision block's output (on full-precision inputs).

The tuning starts from another method's solution (:func:`start_point`: round to nearest on the RTN/HQQ grid, or
GPTQ's error-updated weights), so at ``v = 0`` it reproduces that method exactly, and it keeps whichever of start
and end has the lower loss over all calibration batches: tuning never ends worse than its start. Outliers stay
exact and take no part. Scales and zeros pass through their storage precision (FP16 or 8-bit metadata) in every
step (straight-through), so the tuned loss is the stored model's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SensiquantError
from ..format import groups
from ..format.qweight import MIN_SCALE, QuantizedWeight, encode, store_meta
from ..format.spec import LayerSpec
from ..serialize import Config
from .gptaq import GPTAQConfig, gptaq_solve
from .gptq import GPTQConfig, gptq_solve
from .grid import fit_scale_zero
from .round import RoundConfig


@dataclass(frozen=True)
class SignRoundConfig(Config):
    """Block tuning settings. The defaults follow AutoRound's "light" recipe (50 steps, lr 5e-3, batches of 8
    samples of 512 tokens) on sensiquant's grids."""

    iters: int = 50  # signed-gradient steps per block, one calibration batch each
    lr: float = 5e-3  # step of the offsets and of the scale/zero factors, decayed linearly to 0
    seqlen: int = 512  # calibration windows are cut into samples of this many tokens
    batch_size: int = 8  # samples per step
    tune_scale: bool = True  # also tune each group's scale factor and zero shift
    scale_range: float = 0.3  # the scale factor stays in [1 - r, 1 + r]
    # the block's forward and backward run in this dtype (autocast; the tuned parameters stay float32)
    compute_dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iters", "seqlen", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "iters" else 1):
                raise SensiquantError(f"tuning {name} must be a {'non-negative' if name == 'iters' else 'positive'} "
                                      f"integer, got {value!r}")
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise SensiquantError(f"tuning learning rate must be positive, got {self.lr!r}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise SensiquantError(f"tuning compute dtype must be float32 or bfloat16, got {self.compute_dtype!r}")
        if not (isinstance(self.scale_range, int | float) and 0 <= self.scale_range < 1):
            raise SensiquantError(f"tuning scale range must be in [0, 1), got {self.scale_range!r}")


@dataclass
class StartPoint:
    """Where tuning starts: rounding ``base`` to nearest on (scale, zero) gives the start's codes; at outlier
    places ``base`` holds the exact values kept."""

    base: torch.Tensor  # (out, in)
    scale: torch.Tensor  # (out, n_groups), before storage rounding
    zero: torch.Tensor  # (out, n_groups)
    mask: torch.Tensor | None  # outliers, (out, in) bool


def start_point(w: torch.Tensor, spec: LayerSpec, method, hessian: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, asym_cross: torch.Tensor | None = None) -> StartPoint:
    """The solution of ``method`` (RoundConfig, GPTQConfig or GPTAQConfig) in the form tuning starts from."""
    w = w.detach().float()
    if isinstance(method, RoundConfig):
        scale, zero = fit_scale_zero(w, spec, None if mask is None else ~mask)
        return StartPoint(w, scale, zero, mask)
    if isinstance(method, GPTQConfig):
        if hessian is None:
            raise ValueError("a GPTQ start needs the layer's Hessian")
        if isinstance(method, GPTAQConfig):
            if asym_cross is None:
                raise ValueError("a GPTAQ start needs the layer's cross term")
            _, scale, zero, base = gptaq_solve(w, hessian, asym_cross, spec, mask, method, return_base=True)
        else:
            _, scale, zero, base = gptq_solve(w, hessian, spec, mask, method.damp, method.block_size,
                                              method.act_order, return_base=True)
        return StartPoint(base, scale, zero, mask)
    raise TypeError(f"block tuning cannot start from {type(method).__name__}")


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class TunableWeight(nn.Module):
    """A weight matrix as tuning sees it: ``weight()`` is the stored model's dequantized matrix for the current
    offsets and factors, differentiable in them; :meth:`finalize` stores it as a QuantizedWeight."""

    def __init__(self, start: StartPoint, spec: LayerSpec, tune_scale: bool = True, scale_range: float = 0.3):
        super().__init__()
        out_features, in_features = start.base.shape
        self.spec, self.scale_range, self.qmax = spec, scale_range, 2**spec.bits - 1
        g = groups.resolve_group_size(spec.group_size, in_features)
        self.register_buffer("col_group", torch.arange(in_features, device=start.base.device) // g)
        self.register_buffer("base", start.base.float())
        self.register_buffer("scale0", start.scale.float().clamp_min(MIN_SCALE))
        self.register_buffer("zero0", start.zero.float())
        self.mask = start.mask
        self.v = nn.Parameter(torch.zeros_like(self.base))
        self.ds = nn.Parameter(torch.zeros_like(self.scale0), requires_grad=tune_scale)
        self.dz = nn.Parameter(torch.zeros_like(self.zero0), requires_grad=tune_scale)

    def _fitted(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current (scale, zero) before storage rounding (integer zeros where the spec keeps them)."""
        s = (self.scale0 * (1 + self.ds)).clamp_min(MIN_SCALE)
        z = self.zero0 + self.dz
        if self.spec.round_zero and not self.spec.quant_meta:
            z = _round_ste(z)
        return s, z

    def scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current (scale, zero) as stored (straight-through the storage rounding), (out, n_groups) each."""
        s, z = self._fitted()
        s = s + (store_meta(s.detach(), self.spec)[1] - s).detach()
        z = z + (store_meta(z.detach(), self.spec)[1] - z).detach()
        return s, z

    def weight(self) -> torch.Tensor:
        s, z = self.scale_zero()
        sf, zf = s[:, self.col_group], z[:, self.col_group]
        q = torch.clamp(_round_ste(self.base / sf + zf + self.v), 0, self.qmax)
        w = (q - zf) * sf
        return w if self.mask is None else torch.where(self.mask, self.base, w)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-0.5, 0.5)
        self.ds.clamp_(-self.scale_range, self.scale_range)

    @torch.no_grad()
    def finalize(self) -> QuantizedWeight:
        """The stored form of the current offsets and factors (the codes ``weight()`` used, against the stored
        scales and zeros, outliers exact)."""
        return encode(self.weight(), *self._fitted(), self.spec, self.mask)


class TunedLinear(nn.Module):
    """Stands in for an nn.Linear of the block while it is tuned."""

    def __init__(self, tunable: TunableWeight, bias: torch.Tensor | None):
        super().__init__()
        self.tunable = tunable
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.tunable.weight().to(x.dtype),
                                    None if self.bias is None else self.bias.to(x.dtype))


@dataclass
class TuneResult:
    loss_start: float  # mean block-output MSE over all calibration batches, at the start
    loss_end: float  # the same for the tuned parameters (the lower of the last step's and the best step's)
    kept: str  # "tuned", "best step" or "start": the lowest mean loss of the three


def _mean_loss(run: Callable[[int], torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float(torch.nn.functional.mse_loss(run(i), t)) for i, t in enumerate(targets)) / len(targets)


def sign_round(tunables: Sequence[TunableWeight], run: Callable[[int], torch.Tensor],
               targets: Sequence[torch.Tensor], config: SignRoundConfig) -> TuneResult:
    """Tune ``tunables`` in place: ``run(i)`` is the block's output on calibration batch ``i`` (built from the
    tunables' current weights), ``targets[i]`` the full-precision block's output on it.

    Signed gradient steps on one batch each; the parameters of the step with the lowest batch loss are remembered
    (as AutoRound does). Of the start, the end and that best step, the block keeps whichever has the lowest mean
    loss over all batches, so tuning never leaves a block worse than its start."""
    params = [p for t in tunables for p in (t.v, t.ds, t.dz) if p.requires_grad]
    start = [p.detach().clone() for p in params]
    loss_start = _mean_loss(run, targets)
    gen = torch.Generator().manual_seed(config.seed)
    low_precision = config.compute_dtype == "bfloat16"
    order: list[int] = []
    best, best_loss = None, float("inf")
    for step in range(config.iters):
        if not order:
            order = torch.randperm(len(targets), generator=gen).tolist()
        i = order.pop()
        with torch.autocast(targets[i].device.type, dtype=torch.bfloat16, enabled=low_precision):
            out = run(i)
        loss = torch.nn.functional.mse_loss(out.float(), targets[i])
        grads = torch.autograd.grad(loss, params)
        value = float(loss.detach())
        if step > 0 and value < best_loss:  # the parameters this loss was measured on (step 0 is the start)
            best, best_loss = [p.detach().clone() for p in params], value
        lr = config.lr * (1 - step / config.iters)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * torch.sign(g))
        for t in tunables:
            t.clamp_()
    if not config.iters:
        return TuneResult(loss_start, loss_start, "start")
    end = [p.detach().clone() for p in params]
    candidates = {"tuned": (_mean_loss(run, targets), end)}
    if best is not None:
        _assign(params, best)
        candidates["best step"] = (_mean_loss(run, targets), best)
    loss_end = min(loss for loss, _ in candidates.values())
    candidates["start"] = (loss_start, start)
    kept = min(candidates, key=lambda k: candidates[k][0])
    _assign(params, candidates[kept][1])
    return TuneResult(loss_start, loss_end, kept)


def _assign(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
