"""The training methods against exact answers (quadratic losses) and their contracts.

Quadratic: ``--model linear --loss mse`` on synthetic data, full batch, float64, is
f(w) = 1/2 (w - c)^T A (w - c) + const with A = 2 Z^T Z / N, Z = [X, 1], c the least-squares
solution. The local-entropy measure q_{x,tau} (García Trillos et al. 2019, arXiv:1901.10082, eq. 2.6) is then Gaussian with
mean p(x) = (A + gamma I)^{-1} (A c + gamma x), gamma = 1/tau, and the local entropy
F_tau(x) = 1/2 (x - c)^T (A^{-1} + tau I)^{-1} (x - c) + const has gradient (I + tau A)^{-1} A (x - c).
Stochastic methods are compared with the exact mean and covariance of their (linear, Gaussian)
recursions, within 4 standard errors.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from flatscope.data import Dataset
from flatscope.errors import FlatscopeError
from flatscope.methods import get, names
from flatscope.methods._flat import gamma_at, reinitialized, tau_at
from flatscope.methods.esgd import esgd_outer_update
from flatscope.methods.importance import WeightedMean
from flatscope.methods.rsgd import REPLICA_SEED_STRIDE, coupling_factor
from flatscope.methods.sam import sam_perturbation
from flatscope.models import build_model
from flatscope.objective import Objective, loss_value
from flatscope.training import BatchStream, TrainConfig, train

torch.set_num_threads(1)
Z4 = 4.0   # tolerance in standard errors


# ------------------------------------------------------------------------------------------ fixtures
class Quad:
    """A linear least-squares problem as an exact quadratic."""

    def __init__(self, n=48, d=3, seed=0):
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((n, d))
        y = X @ rng.standard_normal(d) + 0.3 * rng.standard_normal(n) + 0.5
        Z = np.hstack([X, np.ones((n, 1))])
        self.A = 2 * Z.T @ Z / n
        self.c = np.linalg.lstsq(Z, y, rcond=None)[0]
        self.dim = d + 1
        self.data = Dataset(torch.tensor(X), torch.tensor(y), None, None, name="quad")
        self.n = n
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(d, 1).double()

    def x0(self):
        return np.concatenate([self.model.weight.detach().numpy().ravel(), self.model.bias.detach().numpy()])

    def grad_local_entropy(self, x, tau):
        return np.linalg.solve(np.eye(self.dim) + tau * self.A, self.A @ (x - self.c))

    def method(self, opt, seed=0, **kw):
        extra = kw.pop("extra", {})
        cfg = TrainConfig(opt=opt, batch_size=self.n, seed=seed, extra=extra, **kw)
        model = copy.deepcopy(self.model)
        m = get(opt)(model, lambda f, xb, yb: loss_value(f(xb), yb, "mse"), cfg)
        stream = BatchStream(self.data.X_train, self.data.y_train, self.n, seed)
        m.setup(stream)
        return m, stream


@pytest.fixture(scope="module")
def quad():
    return Quad()


@pytest.fixture(scope="module")
def digits_small():
    from flatscope.data import load_data

    d = load_data({"name": "digits"})
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(d.X_train.shape[0], generator=g)[:256]
    return Dataset(d.X_train[tr], d.y_train[tr], d.X_test[:128], d.y_test[:128], name="digits")


MLP = {"name": "mlp", "kwargs": {"in_features": 64, "out_features": 10, "widths": [16]}}
RESNET = {"name": "resnet", "kwargs": {"in_features": 64, "out_features": 10, "width": 2}}
FAST = {  # tiny inner loops so that a few dozen evaluations exercise every code path
    "sgd": {}, "adam": {}, "sam": {"rho": 0.05},
    "esgd": {"inner_steps": 4}, "heat": {"inner_steps": 3}, "hr": {"inner_steps": 2, "samples": 2},
    "is": {"inner_steps": 5}, "rsgd": {"replicas": 3, "replica_exec": "loop"},
}


def run(data, opt, budget, seed=0, spec=MLP, model=None, resume=None, batch_size=32, **kw):
    extra = dict(FAST[opt], **kw.pop("extra", {}))
    if model is None:
        torch.manual_seed(seed)
        model = build_model(spec)
    cfg = TrainConfig(opt=opt, budget=budget, batch_size=batch_size, seed=seed, extra=extra, **kw)
    rec = train(model, data, "ce", cfg, model_spec=spec, data_spec={"name": "digits"},
                resume_state=resume and resume["resume"], history=resume and resume["history"])
    return model, rec


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ------------------------------------------------------------------------------------------ eSGD
def test_local_entropy_gradient_closed_form_by_quadrature():
    """F_tau(x) = -log int exp(-f(x')) phi_{x,tau}(x') dx' (García Trillos et al. 2019, eq. 2.2), 1-D, by quadrature."""
    a, c, tau = 3.0, 0.7, 0.4
    grid = np.linspace(-12, 12, 200001)
    dx = grid[1] - grid[0]

    def F(x):
        integrand = np.exp(-0.5 * a * (grid - c) ** 2 - (grid - x) ** 2 / (2 * tau)) / np.sqrt(2 * np.pi * tau)
        return -np.log(integrand.sum() * dx)

    for x in (-1.0, 0.2, 2.5):
        h = 1e-4
        fd = (F(x + h) - F(x - h)) / (2 * h)
        assert fd == pytest.approx(a * (x - c) / (1 + tau * a), rel=1e-6)


def test_esgd_outer_step_with_exact_expectation_is_gd_on_local_entropy(quad):
    """García Trillos et al. 2019, eq. 3.5: x - eta gamma (x - E_q[X]) = x - eta grad F_tau(x), tau = 1/gamma."""
    x = quad.x0() + 1.0
    for gamma, eta in ((0.5, 0.3), (2.0, 0.1), (10.0, 0.05)):
        tau = 1 / gamma
        mu = np.linalg.solve(quad.A + gamma * np.eye(quad.dim), quad.A @ quad.c + gamma * x)
        x1 = esgd_outer_update(torch.tensor(x), torch.tensor(mu), gamma, eta).numpy()
        np.testing.assert_allclose(x1, x - eta * quad.grad_local_entropy(x, tau), rtol=0, atol=1e-12)


def test_esgd_method_noise_free_converges_to_the_exact_outer_step(quad):
    """The real Entropy-SGD step (eps = 0, long inner loop): mu -> prox point = E_q[X] for a quadratic."""
    gamma, eta, L = 2.0, 0.3, 400
    m, stream = quad.method("esgd", lr=eta, momentum=0.0,
                            extra={"inner_steps": L, "inner_lr": 0.05, "noise": 0.0, "gamma": gamma,
                                   "gamma_growth": 0.0})
    x = quad.x0()
    for _ in range(L):
        m.step(stream, eta)
    assert m.t == 1 and stream.evals == L and stream.by_kind["inner"] == L
    expect = x - eta * quad.grad_local_entropy(x, 1 / gamma)
    np.testing.assert_allclose(m.x.numpy(), expect, rtol=0, atol=1e-10)


def _esgd_exact_moments(quad, x, gamma, eta, lr_in, eps, alpha, L):
    """Exact mean and covariance of Entropy-SGD's outer update on the quadratic (linear Gaussian recursion)."""
    d = quad.dim
    M = np.eye(d) - lr_in * (quad.A + gamma * np.eye(d))
    b = lr_in * (quad.A @ quad.c + gamma * x)
    # state s = (x', mu): x' <- M x' + b + sqrt(lr_in) eps xi ; mu <- (1-alpha) mu + alpha x'(new)
    T = np.block([[M, np.zeros((d, d))], [alpha * M, (1 - alpha) * np.eye(d)]])
    u = np.concatenate([b, alpha * b])
    N = np.vstack([np.eye(d), alpha * np.eye(d)]) * math.sqrt(lr_in) * eps
    m, P = np.concatenate([x, x]), np.zeros((2 * d, 2 * d))
    for _ in range(L):
        m, P = T @ m + u, T @ P @ T.T + N @ N.T
    mu_m, mu_P = m[d:], P[d:, d:]
    return x - eta * gamma * (x - mu_m), (eta * gamma) ** 2 * mu_P


def test_esgd_method_with_langevin_noise_matches_exact_moments(quad):
    """With noise, one outer update is Gaussian with known moments; its mean is x - eta grad F_tau(x)."""
    gamma, eta, L, lr_in, eps, alpha = 2.0, 0.3, 300, 0.05, math.sqrt(2.0), 0.1
    x = quad.x0()
    mean, cov = _esgd_exact_moments(quad, x, gamma, eta, lr_in, eps, alpha, L)
    np.testing.assert_allclose(mean, x - eta * quad.grad_local_entropy(x, 1 / gamma), atol=1e-12)
    m, stream = quad.method("esgd", lr=eta, momentum=0.0, seed=3,
                            extra={"inner_steps": L, "inner_lr": lr_in, "noise": eps, "alpha": alpha,
                                   "gamma": gamma, "gamma_growth": 0.0})
    for _ in range(L):
        m.step(stream, eta)
    se = np.sqrt(np.diag(cov))
    assert np.all(np.abs(m.x.numpy() - mean) < Z4 * se), (m.x.numpy() - mean) / se


def test_gamma_scoping_advances(digits_small):
    g0, g1, L = 0.03, 0.05, 4
    model, rec = run(digits_small, "esgd", budget=8 * 8 + 2, extra={"gamma": g0, "gamma_growth": g1, "inner_steps": L})
    h = rec["history"]
    t = rec["resume"]["method"]["t"]
    assert t == (8 * 8 + 2) // L == 16          # the outer-update counter really increments
    np.testing.assert_allclose(h["outer_steps"], [e // L for e in h["grad_evals"]])
    np.testing.assert_allclose(h["gamma"], [g0 * (1 + g1) ** k for k in h["outer_steps"]], rtol=1e-12)
    assert h["gamma"][-1] == pytest.approx(g0 * 1.05 ** 16) and h["gamma"][-1] > 2 * g0
    lr = rec["hparams"]["lr"]
    np.testing.assert_allclose(h["eff_outer_step"][1:], [lr * g0 * (1 + g1) ** (k - 1) for k in h["outer_steps"][1:]])


@pytest.mark.parametrize("opt", ["heat", "hr", "is"])
def test_tau_scoping_advances(digits_small, opt):
    tau0, tau1 = 1e-4, 0.1
    _, rec = run(digits_small, opt, budget=60, extra={"tau": tau0, "tau_decay": tau1})
    h = rec["history"]
    per = {"heat": 3, "hr": 4, "is": 5}[opt]
    assert rec["resume"]["method"]["k"] == 60 // per
    np.testing.assert_allclose(h["tau"], [tau0 / (1 + tau1) ** k for k in h["outer_steps"]], rtol=1e-12)
    assert h["tau"][-1] < h["tau"][0]


def test_schedules():
    assert gamma_at(0.1, 0.01, 0) == 0.1 and gamma_at(0.1, 0.01, 100) == pytest.approx(0.1 * 1.01 ** 100)
    assert tau_at(1.5, 0.01, 0) == 1.5 and tau_at(1.5, 0.01, 30) == pytest.approx(1.5 / 1.01 ** 30)


# ------------------------------------------------------------------------------------------ heat, hr, is, sam
def test_heat_gradient_estimate_within_its_standard_error(quad):
    """grad F^H_tau = A (x - c) exactly for a quadratic; L Gaussian samples give covariance tau A^2 / L."""
    tau, L, eta = 0.05, 200, 0.1
    m, stream = quad.method("heat", lr=eta, momentum=0.0, seed=1, extra={"inner_steps": L, "tau": tau, "tau_decay": 0.0})
    x = quad.x0()
    for _ in range(L):
        m.step(stream, eta)
    ghat = (x - m.x.numpy()) / eta
    se = np.sqrt(tau * np.diag(quad.A @ quad.A) / L)
    assert np.all(np.abs(ghat - quad.A @ (x - quad.c)) < Z4 * se)


def test_hr_robbins_monro_matches_exact_moments(quad):
    """Algorithm 5 on a quadratic is a linear Gaussian recursion toward x* = (I + tau A)^{-1}(x_k + tau A c)."""
    tau, J, M, c, p = 0.2, 300, 2, 0.5, 0.6
    m, stream = quad.method("hr", seed=2, extra={"inner_steps": J, "samples": M, "tau": tau, "tau_decay": 0.0,
                                                 "rm_c": c, "rm_power": p})
    xk = quad.x0()
    H = np.eye(quad.dim) + tau * quad.A
    target = xk + tau * quad.A @ quad.c
    mean, P = xk.copy(), np.zeros((quad.dim, quad.dim))
    S = tau ** 3 * quad.A @ quad.A / M          # covariance of tau/M sum_m grad f(z_m), z_m ~ N(x, tau I)
    for j in range(1, J + 1):
        a = c * j ** (-p)
        T = np.eye(quad.dim) - a * H
        mean = T @ mean + a * target
        P = T @ P @ T.T + a * a * S
    for _ in range(J * M):
        m.step(stream, None)
    assert m.k == 1
    np.testing.assert_allclose(mean, np.linalg.solve(H, target), atol=1e-5)   # the transient has (nearly) died out
    se = np.sqrt(np.diag(P))
    assert np.all(np.abs(m.xk.numpy() - mean) < Z4 * se)


def test_weighted_mean_is_overflow_safe_and_exact():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 3))
    logw = rng.standard_normal(50) * 30 - 800          # exp() underflows in float64
    acc = WeightedMean(torch.zeros(3))
    for x, lw in zip(X, logw):
        acc.add(torch.tensor(x), float(lw))
    w = np.exp(logw - logw.max())
    np.testing.assert_allclose(acc.mean().numpy(), (w[:, None] * X).sum(0) / w.sum(), rtol=1e-12)
    assert acc.ess == pytest.approx(w.sum() ** 2 / (w ** 2).sum())


def test_importance_sampling_mean_of_the_local_entropy_measure(quad):
    """Algorithm 4 estimates E_q[X] = (A + I/tau)^{-1}(A c + x/tau); R independent outer steps, 4 SE."""
    tau, J, R = 0.3, 400, 12
    x = quad.x0()
    exact = np.linalg.solve(quad.A + np.eye(quad.dim) / tau, quad.A @ quad.c + x / tau)
    ests = []
    for r in range(R):
        m, stream = quad.method("is", seed=10 + r, extra={"inner_steps": J, "tau": tau, "tau_decay": 0.0})
        for _ in range(J):
            m.step(stream, None)
        assert stream.by_kind["forward"] == J and stream.evals == J
        ests.append(m.x.numpy())
    ests = np.array(ests)
    se = ests.std(0, ddof=1) / np.sqrt(R)
    # self-normalized IS has an O(1/J) bias; it is far below the standard error here
    assert np.all(np.abs(ests.mean(0) - exact) < Z4 * se + 1e-12)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_closed_form(quad, adaptive):
    rho, lr = 0.1, 0.05
    m, stream = quad.method("sam", lr=lr, momentum=0.0, extra={"rho": rho, "adaptive": adaptive})
    w = quad.x0()
    g = quad.A @ (w - quad.c)
    if adaptive:
        T = np.abs(w) + 0.01
        e = rho * T * T * g / np.linalg.norm(T * g)
    else:
        e = rho * g / np.linalg.norm(g)
    m.step(stream, lr)
    np.testing.assert_allclose(m.w.numpy(), w - lr * quad.A @ (w + e - quad.c), atol=1e-12)
    np.testing.assert_allclose(sam_perturbation(torch.tensor(w), torch.tensor(g), rho, adaptive).numpy(), e)
    assert stream.evals == 2 and stream.by_kind == {"outer": 1, "inner": 0, "extra": 1, "forward": 0}


# ------------------------------------------------------------------------------------------ rSGD
def test_coupling_factor():
    assert coupling_factor("exact", 0.0) == 1.0
    assert coupling_factor("exact", 50.0) == pytest.approx(math.exp(-50.0))
    assert coupling_factor("explicit", 3.0) == -2.0        # overshoots; |factor| > 1 diverges
    assert coupling_factor("clipped", 3.0) == 0.0
    for s in np.linspace(0, 1e3, 50):
        assert 0 < coupling_factor("exact", s) <= 1 or s > 700


def test_reinitialized_equals_building_with_that_seed():
    for spec in (MLP, RESNET, {"name": "cnn", "kwargs": {"in_features": 64, "out_features": 10}}):
        torch.manual_seed(0)
        m0 = build_model(spec)
        torch.manual_seed(17)
        ref = build_model(spec)
        state = torch.get_rng_state()
        m1 = reinitialized(m0, 17)
        assert torch.equal(torch.get_rng_state(), state)          # the global RNG is left alone
        for (n, a), (_, b) in zip(ref.state_dict().items(), m1.state_dict().items()):
            assert torch.equal(a, b), n


def test_rsgd_gamma_zero_is_independent_sgd_runs(digits_small):
    y, n = 3, 30
    torch.manual_seed(0)
    model = build_model(MLP)
    init = copy.deepcopy(model)
    _, rec = run(digits_small, "rsgd", budget=y * n, model=model, extra={"gamma": 0.0, "replicas": y})
    for a in range(y):
        s = REPLICA_SEED_STRIDE * a
        start = copy.deepcopy(init) if a == 0 else reinitialized(init, s)
        sgd_model, sgd_rec = run(digits_small, "sgd", budget=n, seed=s, model=start)
        assert sgd_rec["grad_evals"] == n
        for name, p in sgd_model.state_dict().items():
            assert torch.equal(rec["replicas"][a][name], p), (a, name)


def test_rsgd_huge_gamma_collapses_replicas_without_diverging(digits_small):
    kw = dict(budget=90, extra={"replicas": 3})
    _, free = run(digits_small, "rsgd", **dict(kw, extra={"replicas": 3, "gamma": 0.0}))
    _, tight = run(digits_small, "rsgd", **dict(kw, extra={"replicas": 3, "gamma": 1e6, "gamma_growth": 0.01}))
    h = tight["history"]
    assert all(math.isfinite(v) for v in h["train_loss"]) and h["train_loss"][-1] < h["train_loss"][0]
    assert h["pull"][-1] == 1.0                                   # full contraction, never beyond
    assert h["replica_dist_max"][-1] < 0.02 * free["history"]["replica_dist_max"][-1]
    assert not tight["warnings"]
    with pytest.raises(FlatscopeError, match="diverged"):
        run(digits_small, "rsgd", **dict(kw, extra={"replicas": 3, "gamma": 1e6, "coupling": "explicit"}))
    _, clipped = run(digits_small, "rsgd", **dict(kw, extra={"replicas": 3, "gamma": 1e6, "coupling": "clipped"}))
    assert any("clipped" in w for w in clipped["warnings"])


def test_rsgd_vmap_equals_loop(digits_small):
    for spec in (MLP, RESNET):
        out = {}
        for mode in ("loop", "vmap"):
            _, rec = run(digits_small, "rsgd", budget=24, spec=spec, extra={"replicas": 4, "replica_exec": mode})
            out[mode] = rec
        for a in range(4):
            for name, t in out["loop"]["replicas"][a].items():
                torch.testing.assert_close(out["vmap"]["replicas"][a][name], t, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ budgets, resume, seeds
@pytest.mark.parametrize("opt", names())
def test_budget_is_exact_and_counted(digits_small, opt):
    _, rec = run(digits_small, opt, budget=30)
    assert rec["grad_evals"] == rec["budget"] == 30
    assert sum(rec["grad_evals_by_kind"].values()) == 30
    assert rec["effective_epochs"] == pytest.approx(30 / rec["batches_per_epoch"])
    assert rec["history"]["grad_evals"][-1] == 30


def test_budget_rounds_down_to_whole_steps(digits_small):
    _, rec = run(digits_small, "rsgd", budget=31, extra={"replicas": 4})
    assert rec["grad_evals"] == 28 and rec["budget"] == 31
    with pytest.raises(FlatscopeError, match="less than one step"):
        run(digits_small, "sam", budget=1)


RESUME_BUDGET = {"sgd": 26, "adam": 26, "esgd": 26, "heat": 26, "hr": 26, "is": 26, "sam": 26, "rsgd": 24}


def _same(rec_a, model_a, rec_b, model_b):
    for (n, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), n
    ha, hb = rec_a["history"], rec_b["history"]
    assert set(ha) == set(hb)
    for k in ha:
        if k != "wall_time_s":
            np.testing.assert_array_equal(ha[k], hb[k], err_msg=k)

    def tensors(x, path=""):
        if isinstance(x, torch.Tensor):
            yield path, x
        elif isinstance(x, dict):
            for k, v in x.items():
                yield from tensors(v, f"{path}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                yield from tensors(v, f"{path}/{i}")

    ta, tb = dict(tensors(rec_a["resume"])), dict(tensors(rec_b["resume"]))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("opt", names())
def test_resume_is_bit_identical(digits_small, opt, tmp_path):
    """N evaluations straight == N/2 (mid-epoch, mid-inner-loop), saved, loaded, resumed to N."""
    from flatscope.checkpoint import load_checkpoint, save_checkpoint

    N = RESUME_BUDGET[opt]
    straight_model, straight = run(digits_small, opt, budget=N, momentum=0.9, nesterov=True)
    half_model, half = run(digits_small, opt, budget=N // 2, momentum=0.9, nesterov=True)
    save_checkpoint(str(tmp_path / "half.pt"), half_model, MLP, {"name": "digits"}, "ce", half)
    ck = load_checkpoint(str(tmp_path / "half.pt"))
    resumed_model, resumed = run(digits_small, opt, budget=N, model=ck.model, resume=ck.train, momentum=0.9,
                                 nesterov=True)
    _same(straight, straight_model, resumed, resumed_model)


@pytest.mark.parametrize("opt", ["esgd", "rsgd", "heat", "is", "sam"])
def test_seed_reproduces_a_run(digits_small, opt):
    m1, _ = run(digits_small, opt, budget=24, seed=5)
    m2, _ = run(digits_small, opt, budget=24, seed=5)
    m3, _ = run(digits_small, opt, budget=24, seed=6)
    assert torch.equal(flat(m1), flat(m2))
    assert not torch.equal(flat(m1), flat(m3))


def test_unknown_or_inapplicable_hyperparameters(digits_small):
    with pytest.raises(FlatscopeError, match="--rho does not apply to --opt esgd"):
        run(digits_small, "esgd", budget=4, extra={"rho": 0.1})
    with pytest.raises(FlatscopeError, match=r"--alpha must be in \(0, 1\]"):
        run(digits_small, "esgd", budget=4, extra={"alpha": 1.5})
    with pytest.raises(FlatscopeError, match="--coupling must be one of"):
        run(digits_small, "rsgd", budget=6, extra={"coupling": "magic"})
    with pytest.raises(FlatscopeError, match="unknown optimizer"):
        get("nope")


def test_esgd_warns_when_the_outer_step_overshoots(digits_small):
    _, rec = run(digits_small, "esgd", budget=8, lr=50.0, extra={"gamma": 0.03})
    assert any("eta*gamma = 1.5 > 1" in w for w in rec["warnings"])


# ------------------------------------------------------------------------------------------ BatchNorm policy
def test_bn_running_stats_never_steer_training(digits_small):
    """Training evaluations use batch statistics: garbage running statistics change nothing."""
    for opt in ("esgd", "heat", "hr", "is", "sam", "rsgd"):
        torch.manual_seed(0)
        a = build_model(RESNET)
        b = copy.deepcopy(a)
        with torch.no_grad():
            for n, buf in b.named_buffers():
                if "running" in n:
                    buf.add_(3.0)
        m_a, rec_a = run(digits_small, opt, budget=12, spec=RESNET, model=a)
        m_b, rec_b = run(digits_small, opt, budget=12, spec=RESNET, model=b)
        assert torch.equal(flat(m_a), flat(m_b)), opt


@pytest.mark.parametrize("opt", ["esgd", "heat", "hr", "is"])
def test_bn_statistics_recomputed_exactly_at_the_outer_iterate(digits_small, opt):
    model, rec = run(digits_small, opt, budget=20, spec=RESNET)
    obj = Objective(model, digits_small.X_train, digits_small.y_train, batch_size=4096)
    exact = obj.recompute_bn(obj.w0, digits_small.X_train)
    for n, b in model.named_buffers():
        torch.testing.assert_close(b, exact[n], rtol=1e-5, atol=1e-6, msg=n)


def test_bn_sam_updates_running_stats_once_per_step(digits_small):
    model, rec = run(digits_small, "sam", budget=20, spec=RESNET)
    assert int(model.stem[1].num_batches_tracked) == 10            # the ascent pass does not count
    sgd, _ = run(digits_small, "sgd", budget=20, spec=RESNET)
    assert int(sgd.stem[1].num_batches_tracked) == 20


def test_bn_rsgd_center_buffers_are_the_replica_average(digits_small):
    model, rec = run(digits_small, "rsgd", budget=24, spec=RESNET, extra={"replicas": 3})
    reps = rec["replicas"]
    for n, b in model.named_buffers():
        vals = torch.stack([r[n] for r in reps])
        if torch.is_floating_point(b):
            torch.testing.assert_close(b, vals.mean(0), rtol=0, atol=1e-7)
            assert not torch.equal(vals[0], vals[1])                # each replica keeps its own statistics
        else:
            assert all(int(v) == 8 for v in vals)                   # one evaluation per round each
