"""Calibration statistics: seeded windows (:class:`CalibConfig`), the gradient pass, input Hessians and norms, and
block-by-block calibration on the outputs of already-quantized blocks."""

from .gradients import GradientStats, gradient_statistics
from .inputs import HessianAccumulator, InputStats, accumulate_hessian, input_statistics
from .sequential import calibrate_sequentially, capture_block_inputs, find_block_list
from .windows import CalibConfig, as_batches, calibration_windows

__all__ = ["CalibConfig", "GradientStats", "HessianAccumulator", "InputStats", "accumulate_hessian", "as_batches",
           "calibrate_sequentially", "calibration_windows", "capture_block_inputs", "find_block_list",
           "gradient_statistics", "input_statistics"]
