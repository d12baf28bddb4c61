"""Properties of the distribution distances: Fréchet distance between Gaussians and KID."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from efface.metrics.stats import frechet_distance, kid

finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False)
positive = st.floats(0.01, 10, allow_nan=False, allow_infinity=False)
FAST = settings(max_examples=40, deadline=None)


def _gaussian(seed: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    return rng.normal(size=d), a @ a.T + 0.1 * np.eye(d)  # a random mean and SPD covariance


@FAST
@given(st.integers(0, 10_000), st.integers(1, 6))
def test_frechet_distance_of_a_gaussian_with_itself_is_zero(seed, d):
    mu, sigma = _gaussian(seed, d)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6 * (1 + np.trace(sigma)))


@FAST
@given(st.integers(0, 10_000), st.integers(0, 10_000), st.integers(1, 6))
def test_frechet_distance_is_symmetric_and_non_negative(seed1, seed2, d):
    (m1, s1), (m2, s2) = _gaussian(seed1, d), _gaussian(seed2 + 10_001, d)
    ab, ba = frechet_distance(m1, s1, m2, s2), frechet_distance(m2, s2, m1, s1)
    assert ab == pytest.approx(ba, rel=1e-6, abs=1e-6) and ab >= -1e-6


@FAST
@given(finite, positive, finite, positive)
def test_frechet_distance_matches_closed_form_for_1d_gaussians(m1, sd1, m2, sd2):
    # W2^2(N(m1, sd1^2), N(m2, sd2^2)) = (m1 - m2)^2 + (sd1 - sd2)^2
    expected = (m1 - m2) ** 2 + (sd1 - sd2) ** 2
    got = frechet_distance(np.array([m1]), np.array([[sd1**2]]), np.array([m2]), np.array([[sd2**2]]))
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-8)


def test_frechet_distance_sums_over_independent_dimensions():
    m1, m2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = sum((a - b) ** 2 + (math.sqrt(x) - math.sqrt(y)) ** 2 for a, b, x, y in zip(m1, m2, v1, v2))
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(expected)


def test_frechet_distance_refuses_mismatched_dimensions():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Bińkowski et al. 2018, eq. for the unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written
    out pair by pair."""
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_with_whole_sets_equals_the_unbiased_mmd_formula():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 3)), rng.normal(0.5, 1.0, size=(12, 3))
    # one subset of the full size is a permutation of each set: MMD^2 does not depend on order
    assert kid(x, y, subsets=1, subset_size=12) == pytest.approx(_mmd2_unbiased(x, y), rel=1e-9)
    assert kid(x, y, subsets=3, subset_size=12) == pytest.approx(_mmd2_unbiased(x, y), rel=1e-9)


def test_kid_is_near_zero_for_halves_of_one_sample_and_positive_for_a_shift():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(400, 8))
    same = kid(features[:200], features[200:], subsets=20, subset_size=100, seed=0)
    shifted = kid(features[:200], features[200:] + 1.0, subsets=20, subset_size=100, seed=0)
    assert abs(same) < 0.05 and shifted > 0.5 and shifted > 20 * abs(same)


def test_kid_is_seeded_and_checks_its_input():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(50, 4)), rng.normal(size=(60, 4))
    assert kid(x, y, subsets=5, subset_size=20, seed=3) == kid(x, y, subsets=5, subset_size=20, seed=3)
    with pytest.raises(ValueError):
        kid(x[:1], y, subsets=1)
    with pytest.raises(ValueError, match="same D"):
        kid(x, y[:, :3])
