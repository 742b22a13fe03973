"""The quota solver against brute force, an independent bisection, exchange optimality, arbitrary inputs."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dbp_utils as du


def bounds(sizes, target, ratio):
    """The SPEC's bounds, written out independently."""
    k = len(sizes)
    m = int(target / k * ratio) if ratio > 0 else 1
    return np.array([max(0, min(m, n - 1)) for n in sizes]), np.array(sizes)


def brute_force_qp(t, lb, ub, target):
    """The real QP optimum by enumerating which bound (or none) each cluster sits at."""
    best, best_x = np.inf, None
    for states in itertools.product("LUF", repeat=len(t)):
        x = np.where(np.array(states) == "L", lb, ub).astype(float)
        free = np.array(states) == "F"
        if free.any():
            nu = (t[free].sum() + x[~free].sum() - target) / free.sum()
            x[free] = t[free] - nu
        if abs(x.sum() - target) > 1e-9 or (x < lb - 1e-12).any() or (x > ub + 1e-12).any():
            continue
        objective = ((x - t) ** 2).sum()
        if objective < best:
            best, best_x = objective, x
    return best_x


def brute_force_integer(t, lb, ub, target):
    """The best integer quotas by enumerating every feasible vector."""
    best = np.inf
    for x in itertools.product(*(range(a, b + 1) for a, b in zip(lb, ub))):
        if sum(x) == target:
            best = min(best, ((np.array(x) - t) ** 2).sum())
    return best


def bisection_qp(t, lb, ub, target, steps=200):
    """The real QP optimum from its optimality condition alone: x = clip(t - nu, lb, ub) for the nu
    found by plain bisection on the (monotone) sum."""
    lo, hi = (t - ub).min() - 1, (t - lb).max() + 1
    for _ in range(steps):
        nu = (lo + hi) / 2
        lo, hi = (nu, hi) if np.clip(t - nu, lb, ub).sum() > target else (lo, nu)
    return np.clip(t - (lo + hi) / 2, lb, ub)


def check_invariants(plan, probs, sizes, target):
    assert plan.quotas.dtype == np.int64
    assert plan.quotas.sum() == target
    assert (plan.quotas >= plan.lower).all() and (plan.quotas <= plan.upper).all()
    assert (np.abs(plan.quotas - plan.x) < 1).all()
    assert plan.x.sum() == pytest.approx(target, abs=1e-6 * max(1, target))


def no_better_exchange(quotas, t, lb, ub):
    """Integer optimality: no move of one sample from cluster j to cluster i (keeping the sum and the
    bounds) lowers sum (N - t)^2. The move changes it by (2 g_i + 1) + (1 - 2 g_j), g = N - t."""
    g = quotas - t
    can_grow, can_shrink = quotas < ub, quotas > lb
    if not can_grow.any() or not can_shrink.any():
        return True
    # The best move pairs the cheapest growth with the cheapest shrink (i == j would cost 2, never < 0).
    return (2 * g[can_grow] + 1).min() + (1 - 2 * g[can_shrink]).min() >= -1e-9


@pytest.mark.parametrize("seed", range(40))
def test_small_cases_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 6))
    sizes = rng.integers(0, 7, k)
    if sizes.sum() == 0:
        sizes[0] = 3
    target = int(rng.integers(0, sizes.sum() + 1))
    ratio = float(rng.choice([0.0, 0.5, 1.0]))
    probs = rng.dirichlet(np.ones(k))
    lb, ub = bounds(sizes, target, ratio)
    if lb.sum() > target:
        with pytest.raises(du.MethodError, match="^cls_bal_ratio: "):
            du.solve_quotas(probs, sizes, target, ratio)
        return
    plan = du.solve_quotas(probs, sizes, target, ratio)
    np.testing.assert_array_equal(plan.lower, lb)
    t = probs * target
    np.testing.assert_allclose(plan.x, brute_force_qp(t, lb, ub, target), atol=1e-9)
    check_invariants(plan, probs, sizes, target)
    # Largest-remainder rounding is also the integer optimum of the same objective.
    assert ((plan.quotas - t) ** 2).sum() == pytest.approx(brute_force_integer(t, lb, ub, target), abs=1e-9)
    assert no_better_exchange(plan.quotas, t, lb, ub)


@pytest.mark.parametrize("k", [10, 500, 20000])
def test_large_cases_match_bisection_and_no_exchange_helps(k):
    rng = np.random.default_rng(k)
    sizes = rng.integers(0, 2000, k)
    probs = np.exp(rng.standard_normal(k) * 3)
    probs /= probs.sum()
    for ratio in (0.05, 0.3, 0.9, 1.0):
        target = int(ratio * sizes.sum())
        plan = du.solve_quotas(probs, sizes, target, 0.5)
        check_invariants(plan, probs, sizes, target)
        t = probs * target
        lb, ub = bounds(sizes, target, 0.5)
        np.testing.assert_allclose(plan.x, bisection_qp(t, lb, ub, target), rtol=0, atol=1e-6 * max(1, t.max()))
        assert no_better_exchange(plan.quotas, t, lb, ub)
        worse = plan.quotas.copy()  # the check itself can fail: a feasible move away from the optimum
        grow = np.flatnonzero((worse < ub) & (worse - t >= 0))
        shrink = np.flatnonzero((worse > lb) & (worse - t <= 0))
        if len(grow) and len(shrink) and grow[0] != shrink[0]:
            worse[grow[0]] += 1
            worse[shrink[0]] -= 1
            assert not no_better_exchange(worse, t, lb, ub)


def test_uniform_and_clustersize_densities():
    sizes = np.array([100, 300, 600])
    uniform = du.cluster_probabilities("uniform", du.complexity("uniform", None, None, sizes), 0.5)
    plan = du.solve_quotas(uniform, sizes, 300, 0.0)
    np.testing.assert_array_equal(plan.quotas, [100, 100, 100])
    ssp = du.cluster_probabilities("clustersize", du.complexity("clustersize", None, None, sizes), 0.5)
    np.testing.assert_array_equal(du.solve_quotas(ssp, sizes, 300, 0.0).quotas, [30, 90, 180])


def test_softmax_and_nan_complexity():
    d_intra = np.array([0.1, np.nan, 0.3])
    d_inter = np.array([0.5, 0.5, 1.0])
    c = du.complexity("dintra*dinter", d_intra, d_inter, np.array([5, 0, 5]))
    np.testing.assert_allclose(c, [0.05, 0.175, 0.3])  # NaN -> mean of 0.05 and 0.3
    p = du.cluster_probabilities("dintra*dinter", c, 0.5)
    expected = np.exp(c / 0.5) / np.exp(c / 0.5).sum()
    np.testing.assert_allclose(p, expected)


def test_infeasible_target_is_a_clear_error():
    with pytest.raises(du.MethodError, match="^target: asks to keep 11 samples but the clusters hold only 10"):
        du.solve_quotas(np.array([0.5, 0.5]), np.array([4, 6]), 11, 0.0)


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(0, 60), min_size=1, max_size=15),
       weights=st.lists(st.floats(0, 1e6, allow_subnormal=False), min_size=15, max_size=15),
       keep=st.floats(0, 1), ratio=st.floats(0, 1))
def test_arbitrary_inputs_meet_invariants_or_raise(sizes, weights, keep, ratio):
    sizes = np.array(sizes)
    w = np.array(weights[: len(sizes)]) + 1e-12
    probs = w / w.sum()
    target = int(keep * sizes.sum())
    lb, ub = bounds(sizes, target, ratio)
    if lb.sum() > target:
        with pytest.raises(du.UsageError):
            du.solve_quotas(probs, sizes, target, ratio)
        return
    plan = du.solve_quotas(probs, sizes, target, ratio)
    check_invariants(plan, probs, sizes, target)
    assert no_better_exchange(plan.quotas, probs * target, lb, ub)
