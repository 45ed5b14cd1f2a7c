"""Error bars for bench/quality.py: mean and standard deviation over seeds, and the paired difference of two
configurations with a 95% interval over seeds (Student t) and over queries (paired bootstrap).

Inputs are per-query metrics, shape (seeds, queries), the same queries in the same order and seed s of one
configuration paired with seed s of the other (same data order, head init and dropout seeds).
"""
import numpy as np

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}  # Student t, two-sided 95%, by degrees of freedom


def t975(df):
    """The t quantile for df degrees of freedom (the next smaller tabulated df past 10: a slightly wider interval)."""
    return T975[max(k for k in T975 if k <= df)]


def mean_std(per_seed):
    """(mean, sample standard deviation) of one number per seed; std 0 for a single seed."""
    x = np.asarray(per_seed, float)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def seed_interval(a, b):
    """Paired difference of the seed means of a and b (seeds, queries) -> (mean difference, low, high): the 95%
    t-interval over the per-seed differences (nan wide for a single seed)."""
    d = np.asarray(a, float).mean(1) - np.asarray(b, float).mean(1)  # (seeds,)
    if len(d) < 2:
        return float(d.mean()), float("nan"), float("nan")
    half = t975(len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def query_bootstrap(a, b, n_boot=10_000, seed=0):
    """Paired bootstrap over queries of the difference of a and b (seeds, queries), each query's difference averaged
    over seeds first -> (mean difference, 2.5th percentile, 97.5th percentile) of n_boot resampled means."""
    d = (np.asarray(a, float) - np.asarray(b, float)).mean(0)  # (queries,)
    idx = np.random.default_rng(seed).integers(len(d), size=(n_boot, len(d)))  # (n_boot, queries) resamples
    means = d[idx].mean(1)  # (n_boot,)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
