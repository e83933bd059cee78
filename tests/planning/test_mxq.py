import itertools

import numpy as np
import pytest

from sensiquant.format import storage_bits
from sensiquant.planning import (
    DEFAULT_LADDER,
    allocation_cost,
    allocation_error,
    min_bits_for,
    solve_allocation,
)


def _random_problem(seed, n=5, k=4):
    rng = np.random.default_rng(seed)
    # cheaper configs have larger errors, as on a real ladder, plus noise so the trade-offs differ per matrix
    costs = np.sort(rng.uniform(1.0, 10.0, size=(n, k)), axis=1) * rng.uniform(1.0, 3.0, size=(n, 1))
    errors = np.sort(rng.uniform(0.0, 5.0, size=(n, k)), axis=1)[:, ::-1] * rng.uniform(0.5, 2.0, size=(n, 1))
    return errors, costs


def _brute_force(errors, costs, budget, fixed=None):
    n, k = errors.shape
    best = np.inf
    for choice in itertools.product(range(k), repeat=n):
        if fixed and any(choice[i] != j for i, j in fixed.items()):
            continue
        choice = np.array(choice)
        if allocation_cost(costs, choice) <= budget:
            best = min(best, allocation_error(errors, choice))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("frac", [0.0, 0.15, 0.4, 0.7, 1.0])
def test_optimal_against_brute_force(seed, frac):
    errors, costs = _random_problem(seed)
    lo, hi = costs.min(axis=1).sum(), costs.max(axis=1).sum()
    budget = lo + frac * (hi - lo)
    choice = solve_allocation(errors, costs, budget)
    assert choice.shape == (5,) and choice.dtype == np.int64
    assert allocation_cost(costs, choice) <= budget
    assert allocation_error(errors, choice) == pytest.approx(_brute_force(errors, costs, budget), rel=1e-9, abs=1e-9)


def test_unconstrained_and_tight_budgets():
    errors, costs = _random_problem(42)
    # huge budget: every matrix takes its lowest-error config
    assert solve_allocation(errors, costs, 1e9).tolist() == errors.argmin(axis=1).tolist()
    # exactly the minimum: every matrix at its cheapest config
    assert solve_allocation(errors, costs, min_bits_for(costs)).tolist() == costs.argmin(axis=1).tolist()


@pytest.mark.parametrize("seed", range(3))
def test_fixed_is_honoured(seed):
    errors, costs = _random_problem(100 + seed)
    budget = costs.min(axis=1).sum() + 0.5 * (costs.max(axis=1).sum() - costs.min(axis=1).sum())
    fixed = {1: 3, 3: 0}
    choice = solve_allocation(errors, costs, budget, fixed=fixed)
    assert choice[1] == 3 and choice[3] == 0
    assert allocation_cost(costs, choice) <= budget
    assert allocation_error(errors, choice) == pytest.approx(
        _brute_force(errors, costs, budget, fixed), rel=1e-9, abs=1e-9
    )


def test_infeasible_budget_raises():
    errors, costs = _random_problem(7)
    lo = min_bits_for(costs)
    assert lo == pytest.approx(costs.min(axis=1).sum())
    with pytest.raises(ValueError, match="infeasible"):
        solve_allocation(errors, costs, lo - 1e-6)
    # pinning a matrix to its most expensive config raises the floor
    fixed = {0: 3}
    lo_fixed = min_bits_for(costs, fixed)
    assert lo_fixed == pytest.approx(lo - costs[0].min() + costs[0, 3])
    with pytest.raises(ValueError, match="infeasible"):
        solve_allocation(errors, costs, lo_fixed - 1e-6, fixed=fixed)
    assert solve_allocation(errors, costs, lo_fixed, fixed=fixed)[0] == 3


def test_unavailable_configs_and_bad_inputs():
    errors, costs = _random_problem(3)
    errors[:, -1] = np.inf  # the best config is off the table
    choice = solve_allocation(errors, costs, 1e9)
    assert (choice != 3).all()
    with pytest.raises(ValueError):
        solve_allocation(errors[:, :3], costs, 1e9)
    with pytest.raises(ValueError):
        solve_allocation(errors, costs, 1e9, fixed={0: 3})  # pinned to an unavailable config
    with pytest.raises(ValueError):
        solve_allocation(errors, costs, 1e9, fixed={9: 0})
    bad = errors.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError):
        solve_allocation(bad, costs, 1e9)


def test_real_bit_costs_stay_under_budget():
    # realistic magnitudes: 64 matrices, costs of ~1e7-1e8 bits from exact storage accounting
    rng = np.random.default_rng(0)
    shapes = [(int(rng.choice([1024, 2048, 4096])), int(rng.choice([1024, 4096]))) for _ in range(64)]
    costs = np.array([[storage_bits(s, c.spec()) for c in DEFAULT_LADDER] for s in shapes], dtype=np.float64)
    nominal = np.array([c.nominal_bits_per_param for c in DEFAULT_LADDER])
    errors = rng.uniform(0.5, 2.0, size=(64, 1)) * np.exp2(-nominal)[None, :] * rng.uniform(0.9, 1.1, (64, 12))
    numel = sum(a * b for a, b in shapes)
    for bpp in (2.13, 3.0, 3.51, 4.25):
        budget = bpp * numel
        choice = solve_allocation(errors, costs, budget)
        assert allocation_cost(costs, choice) <= budget
        assert allocation_cost(costs, choice) >= budget - 2 * costs.max()  # the budget is actually used
