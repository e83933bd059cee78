"""MXQ bit allocation: pick one ladder config per weight matrix under a total storage budget.

Given, for every matrix i and config j, a quantization error ``errors[i, j]`` (e.g. the Frobenius norm of
W - dequant(quant(W))) and a storage cost ``costs[i, j]`` in bits (from :func:`sensiquant.format.storage_bits`),
MXQ solves the 0-1 integer program

    minimise    sum_ij errors[i, j] * x[i, j]
    subject to  sum_j x[i, j] = 1                 for every matrix i   (exactly one config each)
                sum_ij costs[i, j] * x[i, j] <= budget_bits            (the memory budget)
                x[i, j] in {0, 1}

This is a multiple-choice knapsack problem: greedy or Lagrangian heuristics can miss the optimum by a whole rung on
some matrices, while the exact program is tiny for an LLM (a few hundred matrices x ~12 configs), so we hand it to
HiGHS through :func:`scipy.optimize.milp` and get the optimum in well under a second.

A non-finite error or cost (``inf``) marks a config as unavailable for that matrix. ``fixed`` pins matrices to given
configs; SensiBoost/KurtBoost use it to force their boosted layers and let MXQ spend the rest of the budget.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

_MAX_TIGHTENINGS = 5


def _check_inputs(
    errors: np.ndarray, costs: np.ndarray, fixed: dict[int, int] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate shapes and values; return float64 copies and the boolean mask of allowed (matrix, config) pairs."""
    errors = np.array(errors, dtype=np.float64)
    costs = np.array(costs, dtype=np.float64)
    if errors.ndim != 2 or costs.ndim != 2:
        raise ValueError(f"errors and costs must be 2-D (matrices x configs), got {errors.shape}, {costs.shape}")
    if errors.shape != costs.shape:
        raise ValueError(f"errors {errors.shape} and costs {costs.shape} must have the same shape")
    n, k = errors.shape
    if n == 0 or k == 0:
        raise ValueError(f"need at least one matrix and one config, got shape {errors.shape}")
    if np.isnan(errors).any() or np.isnan(costs).any():
        raise ValueError("errors and costs must not contain NaN (use inf to mark a config unavailable)")
    if (costs < 0).any() or (errors == -np.inf).any():
        raise ValueError("costs must be non-negative and errors must not be -inf")
    allowed = np.isfinite(errors) & np.isfinite(costs)
    for i, j in (fixed or {}).items():
        if not (isinstance(i, int | np.integer) and isinstance(j, int | np.integer)):
            raise ValueError(f"fixed must map matrix index -> config index (ints), got {i!r}: {j!r}")
        if not (0 <= i < n and 0 <= j < k):
            raise ValueError(f"fixed pair ({i}, {j}) is out of range for {n} matrices x {k} configs")
        if not allowed[i, j]:
            raise ValueError(f"matrix {i} is fixed to config {j}, which is unavailable (non-finite error or cost)")
        pinned = np.zeros(k, dtype=bool)
        pinned[j] = True
        allowed[i] = pinned
    empty = np.flatnonzero(~allowed.any(axis=1))
    if empty.size:
        raise ValueError(f"matrices {empty.tolist()} have no available config (all errors or costs non-finite)")
    return errors, costs, allowed


def min_bits_for(costs: np.ndarray, fixed: dict[int, int] | None = None) -> float:
    """The smallest feasible budget: every matrix at its cheapest available config (or its ``fixed`` config).

    Any ``budget_bits`` below this makes :func:`solve_allocation` infeasible.
    """
    costs = np.asarray(costs, dtype=np.float64)
    _, costs, allowed = _check_inputs(np.zeros_like(costs), costs, fixed)
    return float(np.where(allowed, costs, np.inf).min(axis=1).sum())


def allocation_cost(costs: np.ndarray, choice: np.ndarray) -> float:
    """Total bits of a choice (one config index per matrix)."""
    costs = np.asarray(costs, dtype=np.float64)
    return float(costs[np.arange(costs.shape[0]), np.asarray(choice)].sum())


def allocation_error(errors: np.ndarray, choice: np.ndarray) -> float:
    """Total error of a choice (one config index per matrix), the objective MXQ minimises."""
    errors = np.asarray(errors, dtype=np.float64)
    return float(errors[np.arange(errors.shape[0]), np.asarray(choice)].sum())


def solve_allocation(
    errors: np.ndarray,
    costs: np.ndarray,
    budget_bits: float,
    fixed: dict[int, int] | None = None,
    time_limit: float | None = None,
) -> np.ndarray:
    """Choose one config per matrix minimising the total error with total cost <= ``budget_bits``.

    Args:
        errors: (n_matrices, n_configs) quantization error of each matrix under each config (lower is better).
        costs: (n_matrices, n_configs) stored bits of each matrix under each config.
        budget_bits: total bits allowed for all matrices together.
        fixed: optional ``{matrix: config}`` pins, honoured exactly (their cost counts toward the budget).
        time_limit: optional HiGHS wall-clock limit in seconds; by default it runs to proven optimality.

    Returns:
        int64 array of length n_matrices: the chosen config index of every matrix.

    Raises:
        ValueError: bad shapes/values, or a budget below :func:`min_bits_for` (nothing fits).

    The program is solved with a zero relative MIP gap. Before solving, each row's cheapest cost and smallest error
    are subtracted (constants, since every matrix takes exactly one config) and both are rescaled to O(1): with costs
    of ~1e9 bits per matrix, HiGHS's absolute feasibility tolerances would otherwise allow a rounded solution to
    overshoot the budget. The rounded choice is re-checked in exact float64 arithmetic and, should it still exceed the
    budget, the program is re-solved with the budget tightened by the overshoot.
    """
    errors, costs, allowed = _check_inputs(errors, costs, fixed)
    budget = float(budget_bits)
    if not np.isfinite(budget):
        raise ValueError(f"budget must be a finite number of bits, got {budget_bits!r}")
    n, k = errors.shape
    masked_costs = np.where(allowed, costs, np.inf)
    row_min_cost = masked_costs.min(axis=1)
    min_total = float(row_min_cost.sum())
    if budget < min_total:
        pinned = f" with {len(fixed)} matrices fixed" if fixed else ""
        raise ValueError(
            f"bit budget {budget:.6g} is infeasible{pinned}: even the cheapest choice for every matrix needs "
            f"{min_total:.6g} bits ({min_total - budget:.6g} more)"
        )

    # Shift every row to start at 0 and scale to O(1); forbidden entries get a neutral value and ub = 0.
    row_min_err = np.where(allowed, errors, np.inf).min(axis=1)
    rel_err = np.where(allowed, errors - row_min_err[:, None], 0.0)
    rel_cost = np.where(allowed, costs - row_min_cost[:, None], 0.0)
    err_scale = rel_err.max() or 1.0
    cost_scale = rel_cost.max() or 1.0
    c = (rel_err / err_scale).ravel()
    a_cost = (rel_cost / cost_scale).ravel()

    rows = np.repeat(np.arange(n), k)
    one_hot = csr_array((np.ones(n * k), (rows, np.arange(n * k))), shape=(n, n * k))
    ub = allowed.ravel().astype(np.float64)
    options = {"mip_rel_gap": 0.0}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)

    slack = budget - min_total  # bits available above the all-cheapest choice
    for _ in range(_MAX_TIGHTENINGS):
        constraints = [
            LinearConstraint(one_hot, 1.0, 1.0),
            LinearConstraint(a_cost.reshape(1, -1), -np.inf, slack / cost_scale),
        ]
        res = milp(c, constraints=constraints, integrality=np.ones(n * k), bounds=Bounds(0.0, ub), options=options)
        if res.x is None:
            raise ValueError(f"MXQ integer program failed: {res.message} (status {res.status})")
        choice = res.x.reshape(n, k).argmax(axis=1).astype(np.int64)
        overshoot = allocation_cost(costs, choice) - budget
        if overshoot <= 0:
            return choice
        # Solver tolerance let the rounded choice creep over the budget: tighten by the overshoot and re-solve.
        slack = max(slack - overshoot, 0.0)
    raise ValueError(f"MXQ integer program could not meet the budget of {budget:.6g} bits within solver tolerance")
