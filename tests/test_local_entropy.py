"""flatscope local-entropy against exact answers.

Linear regression under MSE is an exact quadratic, so q_gamma is Gaussian and every average is in
closed form (flatscope.analyses.local_entropy.quadratic_closed_form, derived in its docstring);
SGLD's own stationary law (step-size and minibatch bias included) is also exact there and is
computed below. Every statistical check is |estimate - exact| <= Z * (the estimator's own standard
error): Z = 4 because a test makes ~30 such comparisons (a family-wise false-alarm rate of about 1%
for t-distributed errors with 31 degrees of freedom, one per chain beyond the first); seeds are
fixed, so the tests are deterministic. Standard errors come from 16-32 independent chains.

The Objective path (ObjectivePotential: vmapped gradients, minibatches) is tested end to end with
MALA and importance sampling, and shown to compute exactly the gradients and minibatch statistics
that the faster explicit-matrix potentials used for the long SGLD chains compute.
"""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch

from flatscope.analyses.local_entropy import (local_entropy, parse_gamma, quadratic_closed_form,
                                              thermodynamic_integration)
from flatscope.errors import FlatscopeError
from flatscope.objective import Objective, exact_hessian
from flatscope.samplers import (ObjectivePotential, Potential, QuadraticPotential, SamplerDivergence,
                                effective_sample_size, power_lambda_max, split_rhat)

from conftest import assert_one_line_error, make_regression_checkpoint

torch.set_num_threads(1)
Z = 4.0
CHAINS = 32


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def linear_problem(N=64, d=3, perturb=0.05, seed=0):
    """A linear regression near (not at) its least-squares minimum, in float64."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, d))
    y = X @ rng.standard_normal(d) + 0.3 * rng.standard_normal(N)
    A = np.c_[X, np.ones(N)]
    theta = np.linalg.lstsq(A, y, rcond=None)[0] + perturb * rng.standard_normal(d + 1)
    model = torch.nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(theta[:d])[None])
        model.bias.fill_(float(theta[d]))
    obj = Objective(model, torch.tensor(X), torch.tensor(y), loss="mse", dtype=torch.float64)
    H = exact_hessian(obj).numpy()
    L0, g = obj.loss_and_grad()
    return obj, A, y, theta, H, g.numpy(), L0


class LinearRegressionPotential(Potential):
    """Linear regression under MSE on explicit matrices (rows of A = [X, 1]), with the same minibatch
    scheme as ObjectivePotential (m rows with replacement, per chain); fast enough for long chains."""

    def __init__(self, A, y):
        self.A, self.y = torch.tensor(A), torch.tensor(y)
        self.n_samples, self.dim = A.shape
        self.dtype, self.device = torch.float64, torch.device("cpu")
        self.H = 2 * self.A.T @ self.A / self.n_samples

    def loss_grad(self, W):
        R = W @ self.A.T - self.y
        return R.pow(2).mean(-1), 2 * R @ self.A / self.n_samples

    def minibatch_loss_grad(self, W, m, gen):
        idx = torch.randint(self.n_samples, (W.shape[0], m), generator=gen)
        Ai, yi = self.A[idx], self.y[idx]
        R = torch.einsum("cmn,cn->cm", Ai, W) - yi
        return R.pow(2).mean(-1), 2 * torch.einsum("cm,cmn->cn", R, Ai) / m

    def hvp_at(self, w):
        return lambda v: v @ self.H


def ula_law(H, g, L0, gamma, beta, eta):
    """Exact stationary moments of full-batch Euler SGLD (ULA) on a quadratic: per eigen-direction the
    mean is -g_i/a_i (unbiased) and the variance 1/(beta a_i (1 - eta a_i / 2)), a_i = lambda_i + gamma."""
    lam, Q = np.linalg.eigh(H)
    gq = Q.T @ g
    a = lam + gamma
    mu = -gq / a
    v = 1.0 / (beta * a * (1 - eta * a / 2))
    return {"mean_sq_dist": np.sum(mu**2) + np.sum(v),
            "mean_loss": L0 + gq @ mu + 0.5 * (np.sum(lam * mu**2) + np.sum(lam * v)),
            "virial": gq @ mu + np.sum(lam * mu**2) + np.sum(lam * v)}


def minibatch_sgld_law(A, y, theta, gamma, beta, eta, m, integrator):
    """Exact stationary moments of minibatch SGLD (m samples with replacement) on linear regression.

    d <- d - eta (g_hat + gamma d) + sqrt(2 eta/beta) e_t with e_t = xi_t (euler) or (xi_t + xi_t+1)/2
    (lm); the mean is -(H + gamma)^-1 g, and with M = I - eta A, u = d - mu, the covariance S solves
    S = M S M + eta^2 E[Cov(g_hat | d)] + N, N = 2 eta / beta I (euler) or eta / beta (I + M) (lm: the
    noise is MA(1) and E[u_t xi_t^T] = sqrt(eta / (2 beta)) I),
    where Cov(g_hat | d) = (1/m)(mean_i grad l_i grad l_i^T - grad L grad L^T), grad l_i = 2 r_i a_i,
    r_i = a_i.(theta + d) - y_i, is quadratic in d: its average over N(mu, S) is affine in S, so S
    is the fixed point of a contraction.
    """
    N, n = A.shape
    r0 = A @ theta - y
    H = 2 * A.T @ A / N
    g = 2 * A.T @ r0 / N
    Ag = H + gamma * np.eye(n)
    mu = -np.linalg.solve(Ag, g)
    M = np.eye(n) - eta * Ag
    rm = r0 + A @ mu
    gm = g + H @ mu
    S = np.eye(n) / (beta * gamma)
    for _ in range(20000):
        quad = np.einsum("ij,jk,ik->i", A, S, A)
        second = 4.0 / N * (A.T * (rm**2 + quad)) @ A
        cov = (second - np.outer(gm, gm) - H @ S @ H) / m if m else 0.0
        noise = 2 * eta / beta * np.eye(n) if integrator == "euler" else eta / beta * (np.eye(n) + M)
        S_new = M @ S @ M + eta**2 * cov + noise
        if np.max(np.abs(S_new - S)) < 1e-16:
            S = S_new
            break
        S = S_new
    L0 = float(np.mean(r0**2))
    return {"mean_sq_dist": mu @ mu + np.trace(S),
            "mean_loss": L0 + g @ mu + 0.5 * (mu @ H @ mu + np.trace(H @ S)),
            "virial": g @ mu + mu @ H @ mu + np.trace(H @ S)}


def assert_within(est, sem, exact, what):
    est, sem, exact = (np.asarray(x, dtype=float) for x in (est, sem, exact))
    z = (est - exact) / sem
    assert np.all(np.isfinite(z)), (what, est, sem)
    assert np.all(np.abs(z) <= Z), f"{what}: z-scores {np.round(z, 2)} (est {est}, exact {exact}, sem {sem})"


# ---------------------------------------------------------------------------------------------------
# grammar
# ---------------------------------------------------------------------------------------------------
def test_parse_gamma_grammar():
    v, rel = parse_gamma("1e-3..1e1:5")
    assert not rel and np.allclose(v, [1e-3, 1e-2, 1e-1, 1, 10])
    v, rel = parse_gamma("0.1x..100x:4")
    assert rel and np.allclose(v, [0.1, 1, 10, 100])
    v, rel = parse_gamma("3, 1,2,1")
    assert not rel and np.allclose(v, [1, 2, 3])
    assert np.allclose(parse_gamma("0.5")[0], [0.5])
    assert np.allclose(parse_gamma("1..10")[0], np.geomspace(1, 10, 10))  # the shared grammar's default N
    for bad in ("0", "-1", "1..0.1:3", "a,b", "1..10:0", "1..10:x", "1x,2", "", "inf", "nan", "0..1:3"):
        with pytest.raises(FlatscopeError):
            parse_gamma(bad)


# ---------------------------------------------------------------------------------------------------
# the closed forms themselves
# ---------------------------------------------------------------------------------------------------
def test_closed_form_matches_direct_integration_and_identities():
    rng = np.random.default_rng(1)
    B = rng.standard_normal((2, 2))
    H = B @ B.T + 0.3 * np.eye(2)
    g = np.array([0.4, -0.2])
    L0, beta = 0.7, 3.0
    gammas = np.array([0.2, 1.0, 5.0])
    cf = quadratic_closed_form(H, g, L0, gammas, beta)
    # brute force: F = -(1/beta) log E_{N(0, 1/(beta gamma))} exp(-beta L), by Gauss-Hermite in 2-D
    x, wq = np.polynomial.hermite_e.hermegauss(80)
    X1, X2 = np.meshgrid(x, x, indexing="ij")
    Wq = np.outer(wq, wq) / (2 * np.pi)
    for k, gam in enumerate(gammas):
        sd = 1 / math.sqrt(beta * gam)
        D = np.stack([X1 * sd, X2 * sd], -1)
        L = L0 + D @ g + 0.5 * np.einsum("...i,ij,...j->...", D, H, D)
        w = Wq * np.exp(-beta * (L - L0))
        F = L0 - math.log(w.sum()) / beta
        assert F == pytest.approx(cf["local_entropy"][k], rel=1e-8)  # 80-point Gauss-Hermite
        q = w / w.sum()
        assert (q * (D**2).sum(-1)).sum() == pytest.approx(cf["mean_sq_dist"][k], rel=1e-7)
        assert (q * L).sum() == pytest.approx(cf["mean_loss"][k], rel=1e-7)
        assert np.allclose((q[..., None] * D).sum((0, 1)), cf["mean_shift"][k], atol=1e-8)
    # dF/dgamma three ways: finite difference, direct 1/2(<|d|^2> - n/(beta gamma)), virial -<d.grad L>/(2 gamma)
    h = 1e-6
    fd = (quadratic_closed_form(H, g, L0, gammas + h, beta)["local_entropy"]
          - quadratic_closed_form(H, g, L0, gammas - h, beta)["local_entropy"]) / (2 * h)
    assert np.allclose(fd, cf["dF_dgamma"], rtol=1e-6)
    assert np.allclose(0.5 * (cf["mean_sq_dist"] - 2 / (beta * gammas)), cf["dF_dgamma"], rtol=1e-12)
    assert np.allclose(-cf["virial"] / (2 * gammas), cf["dF_dgamma"], rtol=1e-12)
    # large gamma: F -> L + (tr H / beta - |g|^2) / (2 gamma)
    big = 1e6
    c1 = np.trace(H) / beta - g @ g
    gap = quadratic_closed_form(H, g, L0, [big], beta)["local_entropy"][0] - L0
    assert gap == pytest.approx(c1 / (2 * big), rel=1e-5)


_LU = np.concatenate([np.geomspace(1e-3, 1, 40), np.zeros(10)])
SPECTRA = {  # (Hessian eigenvalues, gradient in the eigenbasis, the rule TI must pick); beta = 500
    "log-uniform": (_LU, 0.05 * np.random.default_rng(0).standard_normal(50) * np.sqrt(_LU), "LQ"),
    "heavy tail": (np.concatenate([np.geomspace(1e-6, 10, 60), np.zeros(10)]), np.zeros(70), "LQ"),
    "spectral gap": (np.concatenate([np.full(5, 3.0), np.full(30, 1e-3), np.zeros(20)]), np.zeros(55), "LQ"),
    # beta g_i^2 = 2 lambda_i: m = sum lambda/(beta a) - gamma g^2/a^2 changes sign at gamma = 1
    "far from a minimum": (np.array([1.0, 1.0]), np.full(2, math.sqrt(2 / 500)), "Q"),
}


@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_thermodynamic_integration_with_exact_integrand(spectrum):
    """With the exact integrand, the only errors are quadrature and tail: both within their estimates."""
    lam, g, rule = SPECTRA[spectrum]
    H = np.diag(lam)
    beta = 500.0
    estimates = []
    for K in (3, 5, 9, 17):
        gam = np.geomspace(0.1, 100, K)
        cf = quadratic_closed_form(H, g, 0.0, gam, beta)
        ti = thermodynamic_integration(gam, np.stack([cf["virial"]] * 2), 0.0, lambda_max=lam.max())
        assert ti["rule"] == rule
        err = np.abs(ti["local_entropy"] - cf["local_entropy"])
        assert np.all(err <= ti["quad_err"] + ti["tail_err"] + 1e-15), (K, err, ti["quad_err"], ti["tail_err"])
        assert ti["mc_err"][0] == 0.0 and ti["anchor"] == "asymptotic tail"
        estimates.append(ti["quad_err"][0])
        # anchored on the exact F(gamma_max), only the quadrature error is left
        an = thermodynamic_integration(gam, np.stack([cf["virial"]] * 2), 0.0, cf["local_entropy"][-1], 0.0)
        assert np.all(np.abs(an["local_entropy"] - cf["local_entropy"]) <= an["quad_err"] + 1e-15)
        assert an["anchor"] == "importance sampling"
    # the (conservative) estimate tightens as the grid refines: under 2% of the integral of |m|/2 with 17 nodes
    assert all(b < a / 2 for a, b in zip(estimates, estimates[1:]))
    s = np.log(gam)
    scale = np.sum(0.25 * np.diff(s) * (np.abs(cf["virial"][:-1]) + np.abs(cf["virial"][1:])))
    assert estimates[-1] < 2e-2 * scale


# ---------------------------------------------------------------------------------------------------
# MALA and importance sampling on the linear-regression Objective
# ---------------------------------------------------------------------------------------------------
def test_mala_and_importance_sampling_match_linear_regression_closed_forms():
    obj, A, y, theta, H, g, L0 = linear_problem()
    lam_max = float(np.linalg.eigvalsh(H).max())
    beta = 200.0
    gam = lam_max * np.array([0.1, 1.0, 10.0, 100.0])
    res = local_entropy(obj, gam, beta=beta, sampler="mala", steps=500, burn_in=150, chains=16,
                        is_samples=4000, seed=3)
    cf = quadratic_closed_form(H, g, L0, gam, beta)
    p = res.per_gamma
    assert res.lambda_max == pytest.approx(lam_max, rel=1e-3)
    for key in ("mean_loss", "mean_sq_dist", "virial"):
        assert_within(p[key], p[key + "_sem"], cf[key], f"MALA {key}")
        if key != "virial":  # the virial changes sign along gamma: no relative scale
            assert np.all(p[key + "_sem"] < 0.02 * np.abs(cf[key])), (key, p[key + "_sem"])  # the test has teeth
    # <w'> coordinate by coordinate, hence the gradient gamma (w - <w'>)
    for k in range(len(gam)):
        assert_within(res.vectors["grad"][k], res.vectors["grad_sem"][k], cf["grad"][k], f"MALA grad F, k={k}")
    assert_within(p["grad_norm"], p["grad_norm_err"], np.linalg.norm(cf["grad"], axis=1), "MALA |grad F|")
    # F by thermodynamic integration (4 nodes: the quadrature error dominates and is estimated)
    assert_within(p["local_entropy"], p["local_entropy_err"], cf["local_entropy"], "MALA F (TI)")
    assert np.all(np.abs(p["accept_rate"] - 0.574) < 0.1)
    assert np.all(p["rhat"] < 1.05)
    # F(gamma_max) is anchored on importance sampling (ESS ~ J there); on a quadratic the asymptotic tail agrees
    assert res.anchor == "importance sampling" and res.warnings == []
    assert abs(p["tail_gap"]) <= Z * math.hypot(res.importance["local_entropy_err"][-1], p["virial_sem"][-1] / 2) \
        + p["tail_err"]
    # importance sampling: F and the self-normalized averages agree where its ESS is adequate
    imp = res.importance
    ok = imp["reliable"].astype(bool)
    assert ok[-2:].all()
    assert_within(imp["local_entropy"][ok], imp["local_entropy_err"][ok], cf["local_entropy"][ok], "IS F")
    assert_within(imp["mean_loss"][ok], imp["mean_loss_se"][ok], cf["mean_loss"][ok], "IS <L>")
    assert_within(imp["mean_sq_dist"][ok], imp["mean_sq_dist_se"][ok], cf["mean_sq_dist"][ok], "IS <|d|^2>")


def test_importance_sampling_degrades_far_from_the_minimum():
    """Away from the minimum at small gamma the weights collapse: the ESS says so and the flag is off."""
    obj, *_ = linear_problem(perturb=2.0)
    res = local_entropy(obj, [0.05], beta=200.0, sampler="mala", steps=50, burn_in=10, chains=2, is_samples=1000)
    assert res.importance["ess"][0] < 20 and not res.importance["reliable"][0]


# ---------------------------------------------------------------------------------------------------
# SGLD: its exact discrete-time law, and the bias shrinking with the step
# ---------------------------------------------------------------------------------------------------
def test_objective_minibatch_gradient_is_unbiased_with_covariance_over_m():
    """The Objective's minibatch scheme is the one the SGLD law below assumes."""
    obj, A, y, theta, H, g, L0 = linear_problem()
    pot = ObjectivePotential(obj)
    m, reps = 8, 4000
    W = torch.tensor(theta)[None].expand(reps, -1).contiguous()
    _, G = pot.minibatch_loss_grad(W, m, torch.Generator().manual_seed(0))
    G = G.numpy()
    per_sample = 2 * (A @ theta - y)[:, None] * A
    cov = np.cov(per_sample.T, bias=True) / m
    assert_within(G.mean(0), np.sqrt(np.diag(cov) / reps), g, "minibatch gradient mean")
    # the sample variance of each coordinate within 4 of its standard errors (normal theory: var * sqrt(2/reps),
    # inflated by the kurtosis of the per-sample gradients)
    v = G.var(0)
    kurt = np.array([np.mean((G[:, i] - G[:, i].mean()) ** 4) / v[i] ** 2 for i in range(G.shape[1])])
    assert_within(v, np.diag(cov) * np.sqrt((kurt - 1) / reps), np.diag(cov), "minibatch gradient variance")


@pytest.mark.parametrize("integrator", ["lm", "euler"])
def test_minibatch_sgld_matches_its_exact_stationary_law(integrator):
    _, A, y, theta, H, g, L0 = linear_problem()
    lam_max = float(np.linalg.eigvalsh(H).max())
    beta, m, c = 200.0, 8, 0.1
    gam = lam_max * np.array([0.1, 1.0, 10.0])
    res = local_entropy(LinearRegressionPotential(A, y), gam, center=torch.tensor(theta), beta=beta, sampler="sgld",
                        minibatch=m, step_fraction=c, lambda_max=lam_max, local_curvature=False, steps=2000,
                        burn_in=300, chains=CHAINS, seed=5, integrator=integrator, bias_check=False)
    p = res.per_gamma
    for k, gk in enumerate(gam):
        law = minibatch_sgld_law(A, y, theta, gk, beta, p["step_size"][k], m, integrator)
        for key in ("mean_loss", "mean_sq_dist", "virial"):
            assert_within(p[key][k], p[key + "_sem"][k], law[key], f"minibatch SGLD {key} at gamma={gk:.3g}")
        # the reported heating eta tr(Cov)/4 (32 minibatch draws at each of 4 chain states) bounds the exact bias
        # 1/2 tr(H dS) (A dS + dS A = eta Cov), and equals it where gamma << the curvature
        exact = law["mean_loss"] - minibatch_sgld_law(A, y, theta, gk, beta, p["step_size"][k], None,
                                                      integrator)["mean_loss"]
        assert 0 < exact <= 1.5 * p["minibatch_heating"][k]
        if gk < 0.2 * lam_max:
            assert p["minibatch_heating"][k] == pytest.approx(exact, rel=0.5)
    assert np.all(np.isfinite(p["minibatch_noise_ratio"]))


def test_two_size_minibatch_bias_estimate_matches_the_exact_laws():
    """Half the chains at m, half at 2m: the pooled average is the mean of the two exact minibatch laws,
    the estimated bias is that mean minus the full-batch law, and the folded error covers the
    distance to the full-batch law."""
    _, A, y, theta, H, g, L0 = linear_problem()
    lam_max = float(np.linalg.eigvalsh(H).max())
    beta, m, c = 200.0, 4, 0.1
    gam = lam_max * np.array([0.1, 1.0])
    res = local_entropy(LinearRegressionPotential(A, y), gam, center=torch.tensor(theta), beta=beta, sampler="sgld",
                        minibatch=m, step_fraction=c, lambda_max=lam_max, local_curvature=False, steps=1500,
                        burn_in=300, chains=CHAINS, seed=6)
    p = res.per_gamma
    for k, gk in enumerate(gam):
        eta = p["step_size"][k]
        laws = [minibatch_sgld_law(A, y, theta, gk, beta, eta, mm, "lm") for mm in (m, 2 * m, None)]
        for key in ("mean_loss", "mean_sq_dist"):
            pooled = 0.5 * (laws[0][key] + laws[1][key])
            assert_within(p[key][k], p[key + "_sem"][k], pooled, f"pooled {key} at gamma={gk:.3g}")
            assert_within(p[key + "_bias"][k], p[key + "_bias_sem"][k], pooled - laws[2][key],
                          f"{key} bias at gamma={gk:.3g}")
            assert_within(p[key][k], p[key + "_err"][k], laws[2][key], f"{key} vs the full-batch law")
    assert p["minibatch_biased"].any()


def test_full_batch_sgld_lm_has_no_step_bias_on_a_quadratic():
    """With exact gradients the Leimkuhler-Matthews noise gives the exact Gaussian q at a large stable step."""
    _, A, y, theta, H, g, L0 = linear_problem()
    lam_max = float(np.linalg.eigvalsh(H).max())
    beta = 200.0
    gam = lam_max * np.array([0.1, 1.0, 100.0])
    pot = QuadraticPotential(torch.tensor(H), torch.tensor(g), L0)
    res = local_entropy(pot, gam, center=torch.zeros(4, dtype=torch.float64), beta=beta, sampler="sgld",
                        step_fraction=0.8, lambda_max=lam_max, local_curvature=False, steps=2000, burn_in=200,
                        chains=CHAINS, seed=9, integrator="lm")
    cf = quadratic_closed_form(H, g, L0, gam, beta)
    p = res.per_gamma
    for key in ("mean_loss", "mean_sq_dist", "virial"):
        assert_within(p[key], p[key + "_sem"], cf[key], f"LM SGLD {key} at c=0.8")
    assert_within(p["local_entropy_direct"], p["local_entropy_direct_err"], cf["local_entropy"], "LM direct F")


def test_full_batch_sgld_bias_shrinks_with_the_step():
    _, A, y, theta, H, g, L0 = linear_problem()
    lam_max = float(np.linalg.eigvalsh(H).max())
    beta = 200.0
    gam = lam_max * np.array([0.1, 100.0])
    pot = QuadraticPotential(torch.tensor(H), torch.tensor(g), L0)
    cf = quadratic_closed_form(H, g, L0, gam, beta)
    errors = {}
    for c in (0.4, 0.1):
        res = local_entropy(pot, gam, center=torch.zeros(4, dtype=torch.float64), beta=beta, sampler="sgld",
                            step_fraction=c, lambda_max=lam_max, local_curvature=False, steps=3000, burn_in=300,
                            chains=CHAINS, seed=7, integrator="euler")
        p = res.per_gamma
        for k, gk in enumerate(gam):
            law = ula_law(H, g, L0, gk, beta, p["step_size"][k])
            assert_within(p["mean_sq_dist"][k], p["mean_sq_dist_sem"][k], law["mean_sq_dist"], f"ULA c={c}")
            assert_within(p["virial"][k], p["virial_sem"][k], law["virial"], f"ULA virial c={c}")
        errors[c] = (np.abs(p["mean_sq_dist"] - cf["mean_sq_dist"]), p["mean_sq_dist_sem"])
    # at c = 0.4 the step bias (about c/2 of the stiff variance) is resolved; at c = 0.1 it is 4x smaller
    big, big_sem = errors[0.4]
    small, small_sem = errors[0.1]
    assert np.all(big > Z * big_sem)
    assert np.all(small < big)
    assert np.all(small <= Z * small_sem + big / 4 * 1.5)


# ---------------------------------------------------------------------------------------------------
# the virial estimator against the direct one, and F by TI on a fine grid
# ---------------------------------------------------------------------------------------------------
def test_virial_estimator_beats_direct_with_flat_directions_and_ti_matches():
    """A minimum with 30 flat directions out of 40: both dF/dgamma estimators are unbiased, the virial
    one is many times less noisy, and F by TI on a fine grid agrees with the closed form."""
    rng = np.random.default_rng(2)
    lam = np.concatenate([np.geomspace(0.2, 2.0, 10), np.zeros(30)])
    Q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    H = Q @ np.diag(lam) @ Q.T
    g = np.zeros(40)
    beta = 100.0
    gam = np.geomspace(0.2, 200, 10)
    pot = QuadraticPotential(torch.tensor(H), torch.tensor(g), 0.0)
    res = local_entropy(pot, gam, center=torch.zeros(40, dtype=torch.float64), beta=beta, sampler="mala",
                        lambda_max=2.0, steps=600, burn_in=150, chains=CHAINS, seed=11)
    cf = quadratic_closed_form(H, g, 0.0, gam, beta)
    p = res.per_gamma
    assert_within(p["dF_dgamma"], p["dF_dgamma_sem"], cf["dF_dgamma"], "virial dF/dgamma")
    assert_within(p["dF_dgamma_direct"], p["dF_dgamma_direct_sem"], cf["dF_dgamma"], "direct dF/dgamma")
    assert np.all(p["dF_dgamma_sem"] < 0.3 * p["dF_dgamma_direct_sem"])
    assert_within(p["local_entropy"], p["local_entropy_err"], cf["local_entropy"], "F by TI (virial)")
    assert np.all(p["local_entropy_err"] < 0.1 * cf["local_entropy"])
    assert np.all(p["local_entropy_err"] < p["local_entropy_direct_err"])


# ---------------------------------------------------------------------------------------------------
# diagnostics, divergence, chain modes
# ---------------------------------------------------------------------------------------------------
def test_rhat_and_ess_on_known_processes():
    rng = np.random.default_rng(0)
    iid = rng.standard_normal((4, 2000))
    assert abs(split_rhat(iid) - 1) < 0.01
    assert effective_sample_size(iid) == pytest.approx(8000, rel=0.1)
    rho = 0.9
    ar = np.zeros((4, 20000))
    e = rng.standard_normal((4, 20000))
    for t in range(1, 20000):
        ar[:, t] = rho * ar[:, t - 1] + e[:, t]
    assert effective_sample_size(ar) == pytest.approx(80000 * (1 - rho) / (1 + rho), rel=0.2)
    drift = iid + np.linspace(0, 3, 2000)
    assert split_rhat(drift) > 1.1


def test_explicit_step_past_the_stability_limit_raises_and_auto_step_recovers():
    H = torch.diag(torch.tensor([1.0, 10.0], dtype=torch.float64))
    pot = QuadraticPotential(H, torch.zeros(2, dtype=torch.float64))
    c0 = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(SamplerDivergence, match="diverged"):
        local_entropy(pot, [1.0], center=c0, beta=10.0, step_size=2.5 / 11, steps=500, burn_in=0, chains=2)
    # the automatic rule given a wrong (10x too small) lambda_max diverges, retries with c/4 and says so
    res = local_entropy(pot, [1.0], center=c0, beta=10.0, lambda_max=1.0, local_curvature=False, steps=300,
                        burn_in=100, chains=4, step_fraction=1.5)
    assert any("retried" in w for w in res.warnings)
    assert res.per_gamma["step_size"][0] * 11 < 2
    # MALA with an absurd explicit step accepts nothing: an error, not an average of frozen chains
    with pytest.raises(FlatscopeError, match="accepted almost no proposal"):
        local_entropy(pot, [1.0], center=c0, beta=10.0, sampler="mala", step_size=50.0, steps=200, burn_in=0,
                      chains=2)


def test_bad_arguments_raise():
    pot = QuadraticPotential(torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    c0 = torch.zeros(2, dtype=torch.float64)
    for kw in ({"beta": 0.0}, {"beta": -1.0}, {"chains": 0}, {"steps": 0}, {"thin": 0}, {"burn_in": -1},
               {"step_size": -1.0}, {"sampler": "hmc"}, {"minibatch": 4}):
        with pytest.raises(FlatscopeError):
            local_entropy(pot, [1.0], center=c0, **dict({"beta": 1.0}, **kw))
    with pytest.raises(FlatscopeError):
        local_entropy(pot, [0.0], center=c0, beta=1.0)
    with pytest.raises(FlatscopeError):
        local_entropy(pot, [-1.0, 1.0], center=c0, beta=1.0)


def test_chain_modes_agree_and_power_iteration(samples):
    from flatscope.checkpoint import load_checkpoint
    from flatscope.data import load_data

    ck = load_checkpoint(str(samples / "mlp-sgd.pt"))
    data = load_data(ck.data_spec)
    obj = Objective(ck.model, data.X_train[:40], data.y_train[:40], loss="ce", batch_size=16)
    W = obj.w0 + 0.01 * torch.randn(3, obj.dim, generator=torch.Generator().manual_seed(0))
    pv, pl = ObjectivePotential(obj, chain_mode="vmap"), ObjectivePotential(obj, chain_mode="loop")
    (lv, gv), (ll, gl) = pv.loss_grad(W), pl.loss_grad(W)
    assert torch.allclose(lv, ll, rtol=1e-5) and torch.allclose(gv, gl, rtol=1e-4, atol=1e-7)
    ref = torch.stack([obj.loss_and_grad(w)[1] for w in W])
    assert torch.allclose(gv, ref, rtol=1e-4, atol=1e-7)
    (mv, mgv) = pv.minibatch_loss_grad(W, 8, torch.Generator().manual_seed(4))
    (ml, mgl) = pl.minibatch_loss_grad(W, 8, torch.Generator().manual_seed(4))
    assert torch.allclose(mv, ml, rtol=1e-5) and torch.allclose(mgv, mgl, rtol=1e-4, atol=1e-7)
    # a second loop call reuses the aliased buffers correctly
    assert torch.allclose(pl.loss_grad(W)[1], gl)
    # power iteration on an explicit matrix
    Hm = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64))
    assert power_lambda_max(lambda v: Hm @ v, 3, iters=60, dtype=torch.float64) == pytest.approx(3.0, rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
FAST = ["--steps", "60", "--burn-in", "20", "--chains", "2", "--gamma", "0.1x..10x:3", "--is-samples", "16",
        "--threads", "1"]


def test_cli_json_hdf5_and_plots(tmp_path, cli):
    ck, _, _ = make_regression_checkpoint(tmp_path)
    out = tmp_path / "res.h5"
    r = cli(["local-entropy", ck, "-o", out, "--json", "--minibatch", "8", *FAST])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    for key in ("gamma", "beta", "mean_loss", "mean_loss_sem", "mean_sq_dist", "mean_sq_dist_sem", "local_entropy",
                "local_entropy_err", "grad_norm", "rhat", "ess", "step_size", "importance", "summary", "warnings"):
        assert key in data, key
    assert len(data["gamma"]) == 3 and data["beta"] == 40.0  # auto beta = N
    assert data["sampler"] == "sgld" and data["minibatch"] == 8
    with h5py.File(out) as f:
        g = f["local_entropy"]
        assert g.attrs["kind"] == "local_entropy"
        assert g["traces/loss"].shape == (3, 2, 6)
        assert g["mean_params"].shape == (3, 4) and g["grad"].shape == (3, 4)
        assert "importance" in g and g["importance/ess"].shape == (3,)
        assert json.loads(g.attrs["summary"])["gamma_max"] == pytest.approx(data["gamma"][-1])
    for suffix in ("entropy", "distance", "traces"):
        assert (tmp_path / f"res.local_entropy.{suffix}.png").exists()
    # MALA, one gamma, and an overlay of two results files
    out2 = tmp_path / "res2.h5"
    r = cli(["local-entropy", ck, "-o", out2, "--sampler", "mala", "--json", *FAST[:-4], "--gamma", "0.5",
             "--is-samples", "0", "--no-plot"])
    assert r.exit_code == 0, r.stderr
    d2 = json.loads(r.stdout)
    assert d2["sampler"] == "mala" and 0 <= d2["accept_rate"][0] <= 1 and d2["importance"] is None
    assert any("one gamma" in w for w in d2["warnings"])
    r = cli(["plot", out, out2, "--threads", "1"])
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "overlay.local_entropy.entropy.png").exists()


def test_cli_split_both_and_human_output(tmp_path, cli):
    ck, _, _ = make_regression_checkpoint(tmp_path)
    out = tmp_path / "both.h5"
    r = cli(["local-entropy", ck, "-o", out, "--split", "both", "--no-plot", *FAST])
    assert r.exit_code == 0, r.stderr
    assert "F(gamma)" in r.stdout and "test" in r.stdout
    with h5py.File(out) as f:
        assert "local_entropy/train" in f and "local_entropy/test" in f


@pytest.mark.parametrize("args, message", [
    (["--gamma", "0"], "positive"),
    (["--gamma", "-1,1"], "positive"),
    (["--gamma", "1..0.1:3"], "end of a range must be above its start"),
    (["--gamma", "1..10:0"], "at least 1"),
    (["--beta", "0"], "--beta"),
    (["--beta", "-2"], "--beta"),
    (["--chains", "0"], "--chains"),
    (["--steps", "0"], "--steps"),
    (["--step-size", "-1"], "--step-size"),
    (["--step-size", "1e6"], "diverged"),
    (["--minibatch", "0x"], "--minibatch"),
    (["--sampler", "mala", "--minibatch", "8"], "full-batch"),
])
def test_cli_bad_input(tmp_path, cli, args, message):
    ck, _, _ = make_regression_checkpoint(tmp_path)
    out = tmp_path / "keep.h5"
    r = cli(["local-entropy", ck, "-o", out, "--no-plot", *FAST])
    assert r.exit_code == 0, r.stderr
    before = out.read_bytes()
    r = cli(["local-entropy", ck, "-o", out, "--no-plot", *FAST, *args])
    assert_one_line_error(r, 2, message)
    assert out.read_bytes() == before


# ------------------------------------------------------------------ plot: robust limits and the noise-floor flag
def test_plot_flags_noise_floor_and_keeps_unreliable_importance_sampling_off_the_limits(monkeypatch, tmp_path):
    """The local-entropy plot's logic (not its pixels): |grad F| is "at noise floor" exactly where it is less
    than 2 of its standard errors above the floor; an ESS = 1 importance-sampling estimate far outside the
    other values does not set the panel's limits (it is marked at the edge); the prior is drawn under the data."""
    from flatscope.plotting import local_entropy as lep

    gn, err, floor = np.array([1.0, 1.0, 1.0, 5.0, np.nan]), np.full(5, 0.1), np.array([0.85, 0.79, 1.2, 1.0, 1.0])
    assert lep.at_noise_floor(gn, err, floor).tolist() == [True, False, True, False, False]
    assert lep.at_noise_floor(gn, err, floor, z=2.2).tolist() == [True, True, True, False, False]
    assert not lep.at_noise_floor([1.0], [np.nan], [0.9]).any()            # unknown error: never flagged

    lo, hi = lep.robust_limits([0.0, 1.0], [1.5, 100.0], margin=0.0)       # 1.5 within 3 spans, 100 not
    assert (lo, hi) == (0.0, 1.5)
    lo, hi = lep.robust_limits([1e-3, 1e-1], [1.0, 1e6], log=True, margin=0.0)
    assert lo == pytest.approx(1e-3) and hi == pytest.approx(1.0)

    g = np.array([0.01, 0.1, 1.0, 10.0])
    F = np.array([0.5, 0.2, 0.05, 0.011])
    tree = {"gamma": g, "center_loss": 0.01, "beta": 100.0, "sampler": "sgld", "n_params": 50,
            "local_entropy": F, "local_entropy_err": np.full(4, 0.01), "mean_loss": F * 0.8,
            "mean_loss_err": np.full(4, 0.01), "mean_sq_dist": 50 / (100.0 * g), "mean_sq_dist_err": 0.01 / g,
            "grad_norm": np.array([1.0, 1.0, 3.0, 3.0]), "grad_norm_err": np.full(4, 0.1),
            "grad_noise_floor": np.array([0.95, 0.99, 1.0, 2.9]), "rhat": np.ones(4),
            "importance": {"local_entropy": np.array([40.0, 0.21, 0.05, 0.011]),
                           "local_entropy_err": np.full(4, 1e-3), "ess": np.array([1.0, 150, 300, 400])}}
    figs = []
    monkeypatch.setattr(lep, "save", lambda fig, base, suffix, fmt: figs.append(fig) or f"{base}.{suffix}.{fmt}")
    lep.plot([("ck", tree)], tmp_path / "x", "png")
    ax, axg = figs[0].axes[:2]
    assert ax.get_ylim()[1] < 1.0                          # not stretched to 40 by the ESS = 1 estimate
    assert any("ESS 1" in t.get_text() for t in ax.texts)  # the outlier is named at the edge
    a1, _, a2 = figs[1].axes[:3]
    assert "at noise floor at 3 of 4" in a2.get_title()
    assert any("at noise floor" in t.get_text() for t in a2.get_legend().get_texts())
    prior, data = a1.lines[0], a1.lines[1]                 # the prior band is drawn first, wider, under the data
    assert prior.get_zorder() < data.get_zorder() and prior.get_linewidth() > data.get_linewidth()
    import matplotlib.pyplot as plt

    for f in figs:
        plt.close(f)
