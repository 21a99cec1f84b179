"""Honest error bars (issue 19), each against an exact reference the estimators do not use.

- local entropy: a 1-parameter double well and a 2-parameter logistic regression, whose q_gamma is
  integrated on a dense grid (benchmarks/bench_error_bars.py holds both problems); every reported
  quantity (⟨L⟩_q, ⟨|d|^2⟩_q, each component of the mean shift, F) must lie within Z of its reported
  error. Z = 4 as in tests/test_local_entropy.py: a run makes 21-35 comparisons and the errors come
  from 8 chains (t-distributed with 7 degrees of freedom), so |z| up to ~3.5 occurs by chance (the
  benchmark shows one such at seed 0, the same at two step sizes: noise, not bias); the minibatch
  bias that this issue is about gave z = 6-10 before;
- minibatch bias: with a small minibatch the two-size estimate flags gammas and its folded error
  covers the truth;
- MALA: a chain started in a region 400x stiffer than the others adapts its own step (it froze
  with one shared step), and a frozen chain is restarted and reported;
- the fraction of negative Hessian eigenvalues: per probe, the Gauss-Radau bracket contains the
  exact count of that probe's spectral measure (dense eigh), and the estimate covers the dense count;
- 0-d parameters (a learnable scale): every analysis runs on such a model from the CLI.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flatscope.analyses.local_entropy import FROZEN_ACCEPT, _restart_frozen, default_minibatch, local_entropy
from flatscope.linalg import _rademacher, dense_matvec, slq
from flatscope.objective import Objective, exact_hessian
from flatscope.samplers import Potential, run_chains

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_error_bars as B

torch.set_num_threads(1)
Z = 4.0


def against_quadrature(name, seed=0, **kw):
    obj, loss = B.problem(name)
    gam = B.GAMMAS[name]
    beta = float(obj.n)
    c = obj.w0.numpy()
    ref = B.reference(loss, c, gam, beta, 10 / math.sqrt(beta * gam[0]), 200_001 if c.size == 1 else 1601)
    opts = {"chains": 8, "steps": 1000, "burn_in": 200, "is_samples": 256, "minibatch": default_minibatch(obj.n)}
    opts.update(kw)
    res = local_entropy(obj, gam, seed=seed, **opts)
    return res, B.zscores(res, ref, c)


def assert_z(z, limit=Z):
    worst = {k: float(np.max(np.abs(v))) for k, v in z.items()}
    assert all(v <= limit for v in worst.values()), worst


# ---------------------------------------------------------------------------------------------------
# local entropy against quadrature
# ---------------------------------------------------------------------------------------------------
def test_default_is_full_batch_for_small_splits_and_the_well_is_within_its_errors():
    assert default_minibatch(200) is None and default_minibatch(10**6) == 64
    res, z = against_quadrature("well")
    assert res.minibatch is None and not res.per_gamma["minibatch_biased"].any()
    assert_z(z)


@pytest.mark.slow
@pytest.mark.parametrize("steps", [1000, 2000])
def test_logistic_regression_default_options_within_errors(steps):
    _res, z = against_quadrature("logreg", steps=steps)
    assert_z(z)


@pytest.mark.slow
def test_well_long_chains_within_errors():
    _, z = against_quadrature("well", steps=2000)
    assert_z(z)


@pytest.mark.slow
def test_small_minibatch_is_flagged_and_its_folded_error_covers_the_truth():
    res, z = against_quadrature("logreg", minibatch=16)
    p = res.per_gamma
    assert p["minibatch_biased"].any()
    assert any("minibatch gradient noise biases" in w for w in res.warnings)
    assert np.all(p["mean_loss_err"] >= p["mean_loss_sem"])
    assert_z(z)


def test_minibatch_bias_fields_and_groups():
    """Half the chains at m, half at 2m; bias fields exist, errors include them; MC errors unchanged."""
    obj, _ = B.problem("well")
    res = local_entropy(obj, [3.0, 30.0, 300.0], chains=4, steps=200, burn_in=50, minibatch=8, seed=1)
    p = res.per_gamma
    for q in ("mean_loss", "mean_sq_dist", "local_entropy", "grad_norm"):
        assert np.all(np.isfinite(p[f"{q}_bias"])) and np.all(p[f"{q}_bias_sem"] > 0)
    tot = np.sqrt(p["mean_loss_sem"] ** 2 + p["mean_loss_bias"] ** 2 + p["mean_loss_bias_sem"] ** 2)
    np.testing.assert_allclose(p["mean_loss_err"], tot)
    js = json.loads(json.dumps(res.to_json(), default=lambda a: np.asarray(a).tolist()))
    assert len(js["minibatch_biased"]) == 3 and "local_entropy_bias" in js
    res3 = local_entropy(obj, [30.0], chains=3, steps=50, burn_in=10, minibatch=8, seed=1)
    assert any("needs at least 4 chains" in w for w in res3.warnings)


# ---------------------------------------------------------------------------------------------------
# MALA: frozen chains
# ---------------------------------------------------------------------------------------------------
class StiffWall(Potential):
    """L(x) = sum x^2/2 + A relu(x - 1)^2: soft near 0, curvature 2A + 1 beyond x = 1."""

    def __init__(self, A=200.0, dim=1):
        self.A, self.dim = A, dim
        self.dtype, self.device = torch.float64, torch.device("cpu")

    def loss_grad(self, W):
        r = torch.relu(W - 1.0)
        return (0.5 * W**2 + self.A * r**2).sum(-1).double(), W + 2 * self.A * r


def stiff_quadrature(A, gamma, beta):
    x = np.linspace(-12, 12, 400_001)
    L = 0.5 * x**2 + A * np.maximum(x - 1, 0) ** 2
    w = np.exp(-beta * (L + 0.5 * gamma * x**2))
    return float((w * x**2).sum() / w.sum())


def test_mala_per_chain_adaptation_unfreezes_a_stiff_start_and_stays_exact():
    pot, gamma, beta = StiffWall(), 0.1, 4.0
    init = torch.zeros(16, 1, dtype=torch.float64)
    init[::4] = 3.0                     # a quarter of the chains start beyond the wall (curvature 401)
    gen = torch.Generator().manual_seed(0)
    run = run_chains(pot, torch.zeros(1, dtype=torch.float64), gamma, beta, init, sampler="mala", step=0.9,
                     steps=3000, burn_in=300, adapt=True, lambda_max=1.0, generator=gen)
    acc = run.accept.numpy()
    assert acc.min() > 0.3, acc
    reps = run.sq_dist.numpy().mean(1)
    exact = stiff_quadrature(pot.A, gamma, beta)
    assert abs(reps.mean() - exact) <= Z * reps.std(ddof=1) / math.sqrt(len(reps)), (reps.mean(), exact)
    # one shared step (no adaptation) at the soft region's scale: the stiff chains are frozen
    run0 = run_chains(pot, torch.zeros(1, dtype=torch.float64), gamma, beta, init, sampler="mala", step=0.9,
                      steps=300, burn_in=0, adapt=False, lambda_max=1.0, generator=torch.Generator().manual_seed(0))
    frozen = run0.accept.numpy() < FROZEN_ACCEPT
    assert frozen[::4].all() and not frozen[1::4].any()
    # ... and the analysis restarts them from the prior and says so
    warnings = []
    fixed = _restart_frozen(run0, pot, torch.zeros(1, dtype=torch.float64), gamma, beta, 1.0, warnings,
                            gen=torch.Generator().manual_seed(1), steps=300, burn_in=100, adapt=True, scale=1e4,
                            integrator="lm")
    assert fixed.accept.numpy().min() >= FROZEN_ACCEPT and list(fixed.restarted) == [0, 4, 8, 12]
    assert torch.equal(fixed.loss[1], run0.loss[1]) and not torch.equal(fixed.loss[0], run0.loss[0])
    assert any("froze" in w and "restarted" in w for w in warnings)


# ---------------------------------------------------------------------------------------------------
# negative fraction
# ---------------------------------------------------------------------------------------------------
def small_net_hessian():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).double()
    X = torch.randn(80, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (80,))
    obj = Objective(net, X, y, dtype=torch.float64)          # at initialization: a saddle
    return exact_hessian(obj)


def test_negative_fraction_radau_brackets_contain_each_probes_exact_count():
    H = small_net_hessian()
    n = H.shape[0]
    lam, U = torch.linalg.eigh(H)
    exact = float((lam < 0).double().mean())
    assert 0.1 < exact < 0.6
    probes, steps = 12, 20
    res = slq(dense_matvec(H), n, probes, steps, seed=3)
    V = _rademacher(probes, n, torch.Generator().manual_seed(3), "cpu").double() / math.sqrt(n)
    per_probe = ((V @ U) ** 2 * (lam < 0).double()).sum(1).numpy()     # mu_v((-inf, 0)) exactly
    lo, hi = res.count_bracket(0.0)
    assert np.all(lo <= per_probe + 1e-9) and np.all(per_probe <= hi + 1e-9), (lo, per_probe, hi)
    f = res.fraction_below(0.0)
    assert abs(f["estimate"] - exact) <= 3 * f["stderr"] + f["bias_bound"]
    # the plain Gauss count lies in the wider bracket too, and the Radau bracket is the tighter one
    assert f["lo"] <= f["gauss"] <= f["hi"]
    # enough steps make the rule exact (Krylov space = whole space): the bracket closes on the count
    full = slq(dense_matvec(H), n, 2, n, seed=3).fraction_below(0.0)
    assert full["bias_bound"] < 1e-8 and abs(full["hi"] - full["lo"]) < 1e-8


# ---------------------------------------------------------------------------------------------------
# 0-d parameters in every analysis
# ---------------------------------------------------------------------------------------------------
SCALED = '''import torch


class Scaled(torch.nn.Module):
    """A linear model with a learnable 0-d output scale."""

    def __init__(self, in_features=3, out_features=1):
        super().__init__()
        self.lin = torch.nn.Linear(in_features, out_features)
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return self.scale * self.lin(x)
'''


def test_zero_dim_parameter_in_every_analysis(cli, tmp_path, monkeypatch):
    (tmp_path / "scaledmod.py").write_text(SCALED)
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = np.random.default_rng(0)
    X = rng.standard_normal((48, 3)).astype(np.float32)
    y = (X @ np.array([1.0, -2.0, 0.5]) + 0.1).astype(np.float32)
    np.savez(tmp_path / "r.npz", X=X, y=y)
    ck = tmp_path / "s.pt"
    common = ["--model", "scaledmod:Scaled", "--threads", "1"]
    r = cli(["train", *common, "--data", f"npz:{tmp_path / 'r.npz'}", "--loss", "mse", "--epochs", "3",
             "--batch-size", "16", "-o", ck, "-q"])
    assert r.exit_code == 0, r.stderr
    sd = torch.load(ck, weights_only=True)["state_dict"]
    assert sd["scale"].dim() == 0
    runs = {
        "hessian": ["--top", "2", "--bottom", "1", "--probes", "2", "--steps", "5", "--trace-probes", "6",
                    "--per-layer"],
        "local-energy": ["--sigma", "0.05", "--samples", "4"],
        "local-entropy": ["--gamma", "10,100", "--steps", "40", "--burn-in", "10", "--chains", "4",
                          "--is-samples", "16"],
        "landscape": ["--grid", "5"],
    }
    for cmd, extra in runs.items():
        r = cli([cmd, ck, *common, *extra, "--json", "--no-plot", "-o", tmp_path / f"{cmd}.h5"])
        assert r.exit_code == 0, (cmd, r.stderr)
        json.loads(r.stdout)
    r = cli(["local-entropy", ck, *common, "--sampler", "mala", "--gamma", "100", "--steps", "30", "--burn-in", "10",
             "--chains", "2", "--is-samples", "0", "--json", "--no-plot", "-o", tmp_path / "mala.h5"])
    assert r.exit_code == 0, r.stderr
