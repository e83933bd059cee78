"""Planning for a memory budget: the ladder of (bits, group) rungs, MXQ's integer program, SensiBoost/KurtBoost
outlier-layer detection (pure math), the model scores behind them, the planner, and the Plan data (JSON)."""

from .ladder import DEFAULT_LADDER, META_GROUP_SIZE, LadderConfig, make_ladder, sort_ladder, step_up
from .mxq import allocation_cost, allocation_error, min_bits_for, solve_allocation
from .outlier_layers import (
    CHANGE_MODES,
    adjacent_changes,
    change_zscores,
    detect_outlier_layers,
    pearson_kurtosis,
    trimmed_zscores,
)
from .plan import Plan, PlanLayer
from .planner import (
    BEST_METHOD,
    ERROR_FITS,
    ERROR_METRICS,
    OBJECTIVES,
    PLAN_METHODS,
    PlanCache,
    PlanConfig,
    apply_plan,
    best_tuned,
    make_plan,
    plan_quant_config,
)

__all__ = ["BEST_METHOD", "CHANGE_MODES", "DEFAULT_LADDER", "ERROR_FITS", "ERROR_METRICS", "META_GROUP_SIZE",
           "OBJECTIVES", "PLAN_METHODS", "LadderConfig", "Plan", "PlanCache", "PlanConfig", "PlanLayer",
           "adjacent_changes", "allocation_cost", "allocation_error", "apply_plan", "best_tuned", "change_zscores",
           "detect_outlier_layers", "make_ladder", "make_plan", "min_bits_for", "pearson_kurtosis",
           "plan_quant_config", "solve_allocation", "sort_ladder", "step_up", "trimmed_zscores"]
