"""Rank correlations against scipy and hand computations; bootstrap coverage; the gap and the axes."""

import math

import numpy as np
import pytest
from scipy import stats

from flatscope.correlation import (
    axes_of,
    bootstrap_ci,
    correlate_measure,
    gap_value,
    granulated_kendall,
    kendall_tau,
    parse_gap,
    spearman_rho,
    varying_axes,
)
from flatscope.errors import FlatscopeError
from flatscope.measures import flatter


@pytest.mark.parametrize("ties", [False, True])
def test_kendall_and_spearman_equal_scipy(ties):
    rng = np.random.default_rng(3)
    for n in (3, 7, 30):
        x, y = rng.normal(size=n), rng.normal(size=n)
        if ties:
            x, y = np.round(x), np.round(y * 2)
        assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
        assert spearman_rho(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_kendall_by_hand():
    # pairs of (1,2,3,4) vs (1,3,2,4): 5 concordant, 1 discordant -> tau = 4/6
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    # ranks (1,2,3,4) vs (1,3,2,4): d^2 = 0+1+1+0, rho = 1 - 6*2/(4*15) = 0.8
    assert spearman_rho([10, 20, 30, 40], [1, 3, 2, 4]) == pytest.approx(0.8)


def test_granulated_kendall_by_hand():
    # a 2x2 grid (lr, bs) with measure m and gap g
    lr = [1, 2, 1, 2]
    bs = [32, 32, 64, 64]
    m = [1.0, 2.0, 3.0, 4.0]
    g = [1.0, 2.0, 4.0, 3.0]
    out = granulated_kendall(m, g, {"lr": lr, "bs": bs})
    # lr axis: groups bs=32 {(1,1),(2,2)} tau=+1, bs=64 {(3,4),(4,3)} tau=-1 -> psi_lr = 0
    # bs axis: groups lr=1 {(1,1),(3,4)} +1, lr=2 {(2,2),(4,3)} +1 -> psi_bs = 1
    assert out["psi"] == {"lr": 0.0, "bs": 1.0}
    assert out["groups"] == {"lr": 2, "bs": 2}
    assert out["Psi"] == 0.5


def test_granulated_kendall_fixed_column_separates_seeds():
    # two seeds; within a seed, lr ranks the gap perfectly; across seeds it would not
    lr = [1, 2, 1, 2]
    seed = [0, 0, 1, 1]
    m = [1.0, 2.0, 10.0, 11.0]
    g = [5.0, 6.0, 1.0, 2.0]
    assert granulated_kendall(m, g, {"lr": lr}, {"seed": seed})["psi"]["lr"] == 1.0
    assert kendall_tau(m, g) < 0.5


def test_bootstrap_ci_brackets_the_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    lo, hi, v = bootstrap_ci(x, y, "kendall", resamples=500, seed=1)
    assert lo < kendall_tau(x, y) < hi
    assert v.size == 500
    assert bootstrap_ci(x, y, "kendall", resamples=500, seed=1)[:2] == (lo, hi)
    with pytest.raises(FlatscopeError):
        bootstrap_ci(x, y, "pearson")


def _coverage(reps, n, r, level, resamples, seed):
    """Fraction of synthetic families (bivariate normal, correlation r) whose CI covers the population tau."""
    tau_true = 2 / math.pi * math.asin(r)     # Kendall's tau of a bivariate normal (Kruskal 1958)
    rng = np.random.default_rng(seed)
    cov = np.array([[1, r], [r, 1]])
    hits = 0
    for k in range(reps):
        xy = rng.multivariate_normal([0, 0], cov, size=n)
        lo, hi, _ = bootstrap_ci(xy[:, 0], xy[:, 1], "kendall", resamples=resamples, level=level, seed=k)
        hits += lo <= tau_true <= hi
    return hits / reps


def test_bootstrap_coverage_quick():
    """80 families of 40 models: the 90% interval covers the true tau at 0.9 within 3 binomial s.e. (0.10)."""
    cov = _coverage(reps=80, n=40, r=0.5, level=0.9, resamples=400, seed=7)
    assert abs(cov - 0.9) <= 3 * math.sqrt(0.9 * 0.1 / 80)


@pytest.mark.slow
def test_bootstrap_coverage_nominal():
    """400 families: the 90% interval covers at 0.9 within 3 binomial s.e. (0.045)."""
    cov = _coverage(reps=400, n=50, r=0.4, level=0.9, resamples=1000, seed=11)
    assert abs(cov - 0.9) <= 3 * math.sqrt(0.9 * 0.1 / 400)


def test_correlate_measure_drops_nonfinite():
    m = [1.0, 2.0, float("nan"), 4.0, 5.0]
    g = [0.1, 0.2, 0.3, 0.5, 0.4]
    res = correlate_measure("hessian.lambda_max", m, g, {"lr": [1, 2, 3, 4, 5]}, resamples=200)
    assert res.n == 4
    assert res.kendall == pytest.approx(stats.kendalltau([1, 2, 4, 5], [0.1, 0.2, 0.5, 0.4]).statistic)
    assert res.to_json()["kendall_ci"][0] <= res.kendall


def test_gap_parsing():
    q = {"train_error": 0.01, "test_error": 0.05, "train_loss": 0.02, "test_loss": 0.3}
    assert gap_value(parse_gap("test_error-train_error"), q) == pytest.approx(0.04)
    assert gap_value(parse_gap("test_loss"), q) == pytest.approx(0.3)
    for bad in ("", "test_error-", "val_error", "a-b-c"):
        with pytest.raises(FlatscopeError):
            parse_gap(bad)


def test_axes_from_training_records():
    rec = {"optimizer": "sgd", "hparams": {"lr": 0.05}, "batch_size": 64, "seed": 3}
    a = axes_of(rec, {"name": "mlp", "kwargs": {"in_features": 64, "widths": [32, 32]}})
    assert a == {"optimizer": "sgd", "lr": 0.05, "batch_size": 64, "seed": 3, "model.widths": [32, 32]}
    b = axes_of(dict(rec, seed=4, hparams={"lr": 0.1}), {"name": "mlp", "kwargs": {"widths": [32, 32]}})
    assert varying_axes([a, b]) == ["lr", "seed"]
    assert axes_of(dict(rec, axes={"width": 2}), {"name": "mlp", "kwargs": {"widths": [32]}}) == {"width": 2}
    # the same partition under another name is one axis
    c = dict(a, **{"model.widths": [64, 64], "seed": 3, "lr": 0.1})
    assert varying_axes([a, b, c]) == ["lr", "model.widths", "seed"]
    assert varying_axes([dict(a, width=1), dict(b, width=1), dict(c, width=2)]) == ["lr", "width", "seed"]


def test_flatter_directions():
    assert flatter("hessian.lambda_max") == "lower"
    assert flatter("local_energy.train_target_sigma") == "higher"
    assert flatter("landscape.random-1d.train_loss_max") == "lower"
    assert flatter("sharpness.worst") == "lower"
    assert flatter("hessian.n_matvec") is None
