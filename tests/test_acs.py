"""ACS: the dynamic program is exactly optimal, and the metrics mean what they say."""
from itertools import combinations

import numpy as np
import pytest

from bac.acs import METRICS, acs_steps, similarity_matrix


def objective(sim, steps):
    """J(c) = sum_m sum_{t in segment m} sim[c_m, t], written the slow, obvious way."""
    ends = list(steps[1:]) + [len(sim)]
    return sum(sim[c, t] for c, end in zip(steps, ends) for t in range(c, end))


def brute_force(sim, S, maximize):
    K = len(sim)
    values = [objective(sim, (0,) + rest) for rest in combinations(range(1, K), S - 1)]
    return max(values) if maximize else min(values)


@pytest.mark.parametrize("K", [5, 6, 7, 8])
@pytest.mark.parametrize("maximize", [True, False])
def test_dp_matches_brute_force(K, maximize):
    rng = np.random.default_rng(K)
    for _ in range(3):
        sim = rng.normal(size=(K, K))
        for S in range(1, K + 1):
            steps = acs_steps(sim, S, maximize)
            assert steps[0] == 0 and steps == sorted(set(steps)) and len(steps) == S
            assert all(0 <= k < K for k in steps)
            assert objective(sim, steps) == pytest.approx(brute_force(sim, S, maximize))


def test_budget_edges():
    sim = np.ones((6, 6))
    assert acs_steps(sim, 6) == list(range(6))
    assert acs_steps(sim, 50) == list(range(6))
    assert acs_steps(sim, 1) == [0]
    with pytest.raises(ValueError, match="n_updates"):
        acs_steps(sim, 0)
    with pytest.raises(ValueError, match="NaN"):
        acs_steps(np.full((3, 3), np.nan), 2)


def test_updates_follow_fast_change():
    # a feature that rotates fast during the first steps and hardly at all later
    angle = np.concatenate([np.linspace(0, 1.5, 10), np.linspace(1.5, 1.6, 30)])  # K = 40
    x = np.stack([np.cos(angle), np.sin(angle)], axis=1)  # (K, 2)
    steps = acs_steps(similarity_matrix(x, "cosine"), 6)
    assert sum(k < 10 for k in steps) >= 4


def test_metrics_on_hand_examples():
    x = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [1.0, 2.0, 5.0]])  # (K=3, D=3)
    cos = similarity_matrix(x, "cosine")
    assert cos.shape == (3, 3) and cos.dtype == np.float64
    assert cos[0, 1] == pytest.approx(1.0)  # parallel
    assert cos[0, 2] == pytest.approx(20 / (np.sqrt(14) * np.sqrt(30)))  # 1+4+15
    l1 = similarity_matrix(x, "l1")
    assert l1[0, 1] == pytest.approx((1 + 2 + 3) / 3) and l1[0, 2] == pytest.approx(2 / 3)
    mse = similarity_matrix(x, "mse")
    assert mse[0, 1] == pytest.approx((1 + 4 + 9) / 3) and mse[1, 0] == mse[0, 1] and mse[2, 2] == 0
    assert METRICS == {"cosine": True, "l1": False, "mse": False}


def test_samples_are_averaged():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 5))  # (K, N, D)
    for metric in METRICS:
        expected = np.mean([similarity_matrix(x[:, n], metric) for n in range(3)], axis=0)
        np.testing.assert_allclose(similarity_matrix(x, metric), expected)


def test_bad_inputs_are_loud():
    with pytest.raises(ValueError, match="cosine"):
        similarity_matrix(np.zeros((3, 2)), "l2")
    with pytest.raises(ValueError, match="flatten"):
        similarity_matrix(np.zeros((3, 2, 2, 2)), "l1")
    assert np.isfinite(similarity_matrix(np.zeros((3, 2)), "cosine")).all()  # zero features stay finite
