"""bench/stats.py: the error bars of bench/quality.py against hand-computed values and a brute-force bootstrap."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import stats  # noqa: E402


def test_mean_std_by_hand():
    assert stats.mean_std([0.70, 0.72, 0.74]) == pytest.approx((0.72, 0.02), rel=1e-12)
    assert stats.mean_std([0.5]) == (0.5, 0.0)


def test_seed_interval_by_hand():
    a = np.array([[1.0, 0.0], [0.8, 0.4], [0.6, 0.6]])  # seed means 0.5, 0.6, 0.6
    b = np.array([[0.2, 0.2], [0.4, 0.4], [0.5, 0.3]])  # seed means 0.2, 0.4, 0.4
    d = np.array([0.3, 0.2, 0.2])  # per-seed differences: mean 0.2333.., sample std 0.057735..
    half = 4.303 * d.std(ddof=1) / np.sqrt(3)
    assert stats.seed_interval(a, b) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half), rel=1e-12)
    assert np.isnan(stats.seed_interval(a[:1], b[:1])[1])


def test_query_bootstrap_equals_a_brute_force_loop_and_collapses_on_constant_differences():
    r = np.random.default_rng(1)
    a, b = r.random((3, 40)), r.random((3, 40))
    got = stats.query_bootstrap(a, b, n_boot=500, seed=7)
    d = (a - b).mean(0)
    draws = np.random.default_rng(7).integers(40, size=(500, 40))
    means = sorted(sum(d[j] for j in row) / 40 for row in draws)  # one resample at a time, by hand
    assert got[0] == pytest.approx(d.mean(), rel=1e-12)
    assert got[1] == pytest.approx(np.percentile(means, 2.5), rel=1e-12)
    assert got[2] == pytest.approx(np.percentile(means, 97.5), rel=1e-12)
    assert got[1] < got[0] < got[2]
    assert stats.query_bootstrap(b + 0.25, b) == pytest.approx((0.25, 0.25, 0.25), rel=1e-12)
