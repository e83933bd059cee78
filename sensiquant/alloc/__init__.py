"""Layer-wise bit allocation, pure math: the config ladder, MXQ's integer program, and SensiBoost/KurtBoost
outlier-layer detection. No model code: everything works on plain numbers, arrays and tensors."""

from .ladder import DEFAULT_LADDER, META_GROUP_SIZE, LadderConfig, make_ladder, sort_ladder, step_up
from .mxq import allocation_cost, allocation_error, min_bits_for, solve_allocation
from .outliers import (
    CHANGE_MODES,
    adjacent_changes,
    change_zscores,
    detect_outlier_layers,
    pearson_kurtosis,
    trimmed_zscores,
)

__all__ = [
    "CHANGE_MODES",
    "DEFAULT_LADDER",
    "META_GROUP_SIZE",
    "LadderConfig",
    "adjacent_changes",
    "allocation_cost",
    "allocation_error",
    "change_zscores",
    "detect_outlier_layers",
    "make_ladder",
    "min_bits_for",
    "pearson_kurtosis",
    "solve_allocation",
    "sort_ladder",
    "step_up",
    "trimmed_zscores",
]
