"""flatscope sharpness: exact answers on quadratic losses (the trust-region problem), brute force in the
ℓ∞ box, invariance of adaptive sharpness under ReLU rescaling, m-sharpness, the average case's
expectations, bad input, the CLI, audit and plot.

Exact reference. For a linear model under torch's mean-reduction MSE the loss is exactly quadratic,
L(w + δ) − L(w) = gᵀδ + ½ δᵀHδ (g, H: the gradient and the Hessian at w, torch.func.hessian). In the
scaled variable u = δ ⊘ c the ℓ2 worst case is the trust-region problem

    max_{‖u‖₂ ≤ ρ} bᵀu + ½ uᵀMu,      b = c ⊙ g,  M = C H C,  C = diag(c),

whose maximizer is u(μ) = (μI − M)⁻¹ b with μ > λ_max(M) chosen so that ‖u(μ)‖ = ρ (M is positive
semi-definite, so the maximum is on the sphere; ‖u(μ)‖ decreases in μ and equals at most ρ at
μ = λ_max + ‖b‖/ρ, so bisection on that interval finds μ); at b = 0 the maximum is ρ² λ_max / 2.
flatscope's value is a loss reached at a feasible point, so it can never exceed the maximum beyond
rounding; the ascent is asked to reach 99% of it.
"""

from __future__ import annotations

import itertools
import json
import math

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error

from flatscope.analyses.sharpness import (
    average_directions,
    checked,
    parse_rhos,
    random_start,
    sharpness,
    sub_batches,
    summary_keys,
)
from flatscope.errors import FlatscopeError
from flatscope.objective import Objective, exact_hessian

torch.set_num_threads(1)
MLP_CKPT = "sample_checkpoints/mlp-sgd.pt"


# ------------------------------------------------------------------------------------------ helpers
def _linear_problem(N: int = 120, d: int = 5, seed: int = 0, at_min: bool = False):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    y = X @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = torch.nn.Linear(d, 1).double()
    if at_min:
        A = torch.cat([X, torch.ones(N, 1, dtype=X.dtype)], 1)
        theta = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
        with torch.no_grad():
            model.weight.copy_(theta[:d][None])
            model.bias.copy_(theta[d:])
    return Objective(model, X, y, loss="mse", dtype=torch.float64)


def trust_region_max(b: torch.Tensor, M: torch.Tensor, rho: float) -> float:
    """max_{‖u‖ ≤ ρ} bᵀu + ½uᵀMu for positive semi-definite M (module docstring)."""
    lam, Q = torch.linalg.eigh(M)
    a = Q.T @ b
    lmax = float(lam[-1])
    bn = float(torch.linalg.vector_norm(b))
    if bn <= 1e-12 * rho * max(lmax, 1e-300):   # b = 0 up to rounding (at a least-squares minimum)
        return 0.5 * rho**2 * lmax
    lo, hi = lmax, lmax + bn / rho
    for _ in range(300):
        mu = 0.5 * (lo + hi)
        if float(torch.sqrt(((a / (mu - lam)) ** 2).sum())) > rho:
            lo = mu
        else:
            hi = mu
    v = a / (hi - lam)            # the maximizer in the eigenbasis, ‖v‖ = ρ up to the bisection's width
    return float(a @ v + 0.5 * (lam * v * v).sum())


def _quadratic_data(obj, adaptive: bool, eta: float = 0.0):
    H = exact_hessian(obj)
    g = obj.grad()
    c = (obj.w0.abs() + eta) if adaptive else torch.ones_like(obj.w0)
    return c * g, c[:, None] * H * c[None, :]


def _worst(obj, rho, **kw):
    kw.setdefault("samples", 0)
    res = sharpness(obj, [rho], **kw)
    return res.curves["train"]


# ---------------------------------------------------------------------------------- ℓ2: trust region
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_l2_worst_case_matches_the_trust_region_solution(adaptive, rho):
    obj = _linear_problem()
    b, M = _quadratic_data(obj, adaptive)
    exact = trust_region_max(b, M, rho)
    c = _worst(obj, rho, norm="l2", adaptive=adaptive, steps=60, restarts=2)
    val = float(c.worst[0])
    assert val <= exact * (1 + 1e-9) + 1e-12, (val, exact)
    assert val >= 0.99 * exact, (val, exact)
    assert bool(c.on_sphere[0, 0])                        # a convex loss peaks on the sphere
    # the reported loss is the loss at the reported point, and the rise is measured from L(w)
    assert c.worst_loss[0, 0] - c.base_loss == pytest.approx(val, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("adaptive", [False, True])
def test_l2_worst_case_at_a_minimum_is_half_rho_squared_lambda_max(adaptive):
    obj = _linear_problem(at_min=True)
    b, M = _quadratic_data(obj, adaptive)
    assert float(torch.linalg.vector_norm(b)) < 1e-10 * float(torch.linalg.matrix_norm(M))
    rho = 0.3
    lmax = float(torch.linalg.eigvalsh(M)[-1])
    exact = 0.5 * rho**2 * lmax
    c = _worst(obj, rho, norm="l2", adaptive=adaptive, steps=100, restarts=2)
    val = float(c.worst[0])
    assert val <= exact * (1 + 1e-9), (val, exact)
    assert val >= 0.99 * exact, (val, exact)


# ---------------------------------------------------------------------------------- ℓ∞: brute force
def _box_grid_max(obj, c: torch.Tensor, rho: float, n: int) -> float:
    """The largest loss rise over an n^d grid of the box ‖u‖∞ ≤ ρ (its vertices included)."""
    axis = torch.linspace(-rho, rho, n, dtype=torch.float64)
    pts = torch.tensor(list(itertools.product(axis.tolist(), repeat=obj.dim)), dtype=torch.float64)
    W = obj.w0 + pts * c
    best = -math.inf
    for start in range(0, W.shape[0], 8192):
        losses, _ = obj.evaluate_many(W[start:start + 8192])
        best = max(best, float(losses.max()))
    return best - obj.loss()


def test_linf_worst_case_matches_brute_force_on_two_parameters():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(30, 1, generator=g, dtype=torch.float64)
    y = 1.5 * X[:, 0] + 0.2 * torch.randn(30, generator=g, dtype=torch.float64)
    torch.manual_seed(1)
    obj = Objective(torch.nn.Linear(1, 1).double(), X, y, loss="mse", dtype=torch.float64)
    for adaptive, rho in ((False, 0.4), (True, 0.5)):
        cvec = obj.w0.abs() if adaptive else torch.ones_like(obj.w0)
        brute = _box_grid_max(obj, cvec, rho, 201)   # convex: the maximum is at a vertex, on the grid
        val = float(_worst(obj, rho, norm="linf", adaptive=adaptive, steps=30, restarts=4).worst[0])
        assert val <= brute * (1 + 1e-9) + 1e-12 and val >= 0.99 * brute, (adaptive, val, brute)


def test_linf_worst_case_matches_brute_force_on_a_three_parameter_nonlinear_model():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(40, 1, generator=g, dtype=torch.float64)
    y = torch.tanh(1.3 * X[:, 0]) * 0.8 + 0.1 * torch.randn(40, generator=g, dtype=torch.float64)
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.Tanh(), torch.nn.Linear(1, 1)).double()
    obj = Objective(model, X, y, loss="mse", dtype=torch.float64)
    assert obj.dim == 3
    rho = 0.6
    cvec = torch.ones_like(obj.w0)
    brute = _box_grid_max(obj, cvec, rho, 41)
    val = float(_worst(obj, rho, norm="linf", adaptive=False, steps=60, restarts=8).worst[0])
    # the grid's maximum is a lower bound of the true one (spacing 0.03); the ascent must reach it
    assert val >= 0.99 * brute, (val, brute)
    assert val <= brute * 1.01, (val, brute)


# ---------------------------------------------------------------------------------- invariance
def _relu_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()


def _rescaled(model, scales):
    """Hidden unit i's incoming weights and bias times a_i > 0, its outgoing weights times 1/a_i."""
    import copy

    m2 = copy.deepcopy(model)
    with torch.no_grad():
        m2[0].weight.mul_(scales[:, None])
        m2[0].bias.mul_(scales)
        m2[2].weight.div_(scales[None, :])
    return m2


def test_adaptive_sharpness_is_invariant_to_relu_rescaling_and_standard_is_not():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)
    model = _relu_net()
    scales = torch.exp(torch.randn(8, generator=g, dtype=torch.float64) * 1.0)
    a = Objective(model, X, y, loss="ce", dtype=torch.float64)
    b = Objective(_rescaled(model, scales), X, y, loss="ce", dtype=torch.float64)
    assert a.loss() == pytest.approx(b.loss(), rel=1e-12)          # the same function
    for norm, rho in (("l2", 0.5), ("linf", 0.05)):
        kw = {"norm": norm, "steps": 15, "restarts": 2, "samples": 6, "seed": 3}
        ra = sharpness(a, [rho], adaptive=True, **kw).curves["train"]
        rb = sharpness(b, [rho], adaptive=True, **kw).curves["train"]
        assert float(ra.worst[0]) > 1e-4
        assert float(rb.worst[0]) == pytest.approx(float(ra.worst[0]), rel=1e-7)
        assert rb.average_draws == pytest.approx(ra.average_draws, rel=1e-7, abs=1e-13)
        sa = sharpness(a, [rho], adaptive=False, **kw).curves["train"]
        sb = sharpness(b, [rho], adaptive=False, **kw).curves["train"]
        assert abs(float(sb.worst[0]) / float(sa.worst[0]) - 1) > 0.1, (norm, sa.worst, sb.worst)


# ---------------------------------------------------------------------------------- m-sharpness
def _classification_problem(N=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    return Objective(_relu_net(seed), X, y, loss="ce", dtype=torch.float64)


def test_m_sharpness_with_m_equal_to_n_is_the_full_batch_worst_case():
    obj = _classification_problem()
    kw = {"norm": "l2", "steps": 10, "restarts": 2, "samples": 0, "seed": 1}
    full = sharpness(obj, [0.1, 0.5], **kw).curves["train"]
    mN = sharpness(obj, [0.1, 0.5], m=obj.n, **kw).curves["train"]
    assert mN.worst_restarts.shape == full.worst_restarts.shape == (2, 1, 2)
    np.testing.assert_allclose(mN.worst_restarts, full.worst_restarts, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(mN.worst_loss, full.worst_loss, rtol=1e-12)
    assert np.isnan(mN.worst_sem).all()                        # one sub-batch: no standard error


def test_m_sharpness_is_the_mean_of_per_sub_batch_maxima():
    obj = _classification_problem(N=100)
    kw = {"norm": "linf", "steps": 8, "restarts": 1, "samples": 0, "seed": 4}
    res = sharpness(obj, [0.05], m=24, **kw).curves["train"]
    parts = sub_batches(obj.n, 24, 4)
    assert len(parts) == 4 and res.n_used == 96                # 100 // 24 sub-batches, 4 samples left out
    flat = np.concatenate(parts)
    assert len(set(flat.tolist())) == 96 and all((np.diff(p) > 0).all() for p in parts)
    each = [float(sharpness(obj.subset(torch.as_tensor(p)), [0.05], **kw).curves["train"].worst[0]) for p in parts]
    assert float(res.worst[0]) == pytest.approx(np.mean(each), rel=1e-10)
    assert float(res.worst_sem[0]) == pytest.approx(np.std(each, ddof=1) / 2, rel=1e-8)
    # the maximum over sub-batches is at least that of the whole split (each sub-batch has its own δ)
    assert float(res.worst[0]) >= float(sharpness(obj, [0.05], **kw).curves["train"].worst[0]) - 1e-12


# ---------------------------------------------------------------------------------- average case
@pytest.mark.parametrize("norm,average", [("l2", "surface"), ("l2", "gaussian"), ("linf", "surface"),
                                          ("linf", "gaussian")])
def test_average_case_matches_its_expectation_on_a_quadratic(norm, average):
    """At a least-squares minimum δ(u) = ½ uᵀMu exactly, so E δ = ½ ρ² tr(M) s² with s² the
    per-coordinate second moment of ũ: 1/d (ℓ2 surface and Gaussian), 1/3 (ℓ∞ Gaussian), and
    1/d + (d−1)/(3d) on the cube's surface (one coordinate at ±1, the others uniform)."""
    obj = _linear_problem(at_min=True, d=4)
    _, M = _quadratic_data(obj, adaptive=True)
    d = obj.dim
    s2 = {("l2", "surface"): 1 / d, ("l2", "gaussian"): 1 / d, ("linf", "gaussian"): 1 / 3,
          ("linf", "surface"): 1 / d + (d - 1) / (3 * d)}[(norm, average)]
    rhos = [0.1, 0.4]
    res = sharpness(obj, rhos, norm=norm, average=average, samples=400, steps=1, seed=2).curves["train"]
    for i, r in enumerate(rhos):
        expect = 0.5 * r**2 * float(torch.trace(M)) * s2
        assert abs(res.average[i] - expect) < 4 * res.average_sem[i], (res.average[i], expect, res.average_sem[i])
    # common random numbers: at a minimum each draw's rise scales exactly like ρ²
    np.testing.assert_allclose(res.average_draws[1] / 0.4**2, res.average_draws[0] / 0.1**2, rtol=1e-7)


def test_average_directions_lie_on_the_surface():
    mask = torch.ones(50, dtype=torch.bool)
    mask[:5] = False
    u2 = average_directions(50, mask, "l2", "surface", 20, 0)
    ui = average_directions(50, mask, "linf", "surface", 20, 0)
    np.testing.assert_allclose(torch.linalg.vector_norm(u2, dim=1).numpy(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(ui.abs().amax(dim=1).numpy(), 1.0, rtol=1e-12)
    assert (u2[:, :5] == 0).all() and (ui[:, :5] == 0).all()
    s = random_start(50, mask, 0.3, "l2", 0, 1)
    assert float(torch.linalg.vector_norm(s)) == pytest.approx(0.3, rel=1e-12)
    assert float(random_start(50, mask, 0.3, "linf", 0, 1).abs().max()) <= 0.3


# ---------------------------------------------------------------------------------- bad input
def test_bad_arguments_raise_clear_errors():
    obj = _classification_problem(N=40)
    with pytest.raises(FlatscopeError, match="positive"):
        sharpness(obj, [0.0])
    with pytest.raises(FlatscopeError, match="positive"):
        sharpness(obj, [-0.1])
    with pytest.raises(FlatscopeError, match="--steps"):
        sharpness(obj, [0.1], steps=0)
    with pytest.raises(FlatscopeError, match="larger than"):
        sharpness(obj, [0.1], m=41)
    with pytest.raises(FlatscopeError, match="--samples"):
        sharpness(obj, [0.1], samples=1)
    with pytest.raises(FlatscopeError, match="--restarts"):
        sharpness(obj, [0.1], restarts=0)
    with pytest.raises(FlatscopeError, match="--step-size"):
        sharpness(obj, [0.1], step_size=0.0)
    for spec in ("0", "-0.1", "0..1", "abc"):
        with pytest.raises(FlatscopeError, match="--rho"):
            parse_rhos(spec)


def test_a_bad_metric_function_is_one_clear_error():
    obj = _classification_problem(N=40)

    def raises(w):
        raise ValueError("boom")

    with pytest.raises(FlatscopeError, match="raised ValueError.*boom"):
        sharpness(obj, [0.1], samples=2, value_fn=raises)
    with pytest.raises(FlatscopeError, match="one number"):
        sharpness(obj, [0.1], samples=2, value_fn=lambda w: torch.ones(3))
    with pytest.raises(FlatscopeError, match="one number"):
        sharpness(obj, [0.1], samples=2, value_fn=lambda w: "high")
    with pytest.raises(FlatscopeError, match="nan"):
        sharpness(obj, [0.1], samples=2, value_fn=lambda w: float("nan"))
    calls = []

    def nan_later(w):
        calls.append(1)
        return 1.0 if len(calls) < 3 else float("nan")

    with pytest.raises(FlatscopeError, match="ρ = 0.1, draw"):
        sharpness(obj, [0.1], samples=4, value_fn=nan_later)
    assert checked(lambda w: np.float32(2.5))(obj.w0) == 2.5
    assert checked(lambda w: torch.tensor([[3.0]]))(obj.w0) == 3.0


def test_a_value_function_replaces_the_loss_in_the_average_case_and_is_reported_at_the_worst_point():
    obj = _classification_problem(N=60)
    kw = {"norm": "l2", "steps": 5, "samples": 4, "seed": 0}
    plain = sharpness(obj, [0.3], **kw).curves["train"]
    twice = sharpness(obj, [0.3], value_fn=lambda w: 2 * obj.loss(w), **kw).curves["train"]
    np.testing.assert_allclose(twice.average_draws, 2 * plain.average_draws, rtol=1e-10)
    np.testing.assert_allclose(twice.worst_value, 2 * plain.per_batch, rtol=1e-9)
    assert plain.worst_value is None


def test_summary_keys_are_known_before_computing():
    obj = _classification_problem(N=40)
    res = sharpness({"train": obj, "test": obj}, [0.1, 0.2], steps=3, samples=2)
    assert list(res.summary()) == summary_keys(["train", "test"])
    assert "train_worst_at_rho_max" in res.summary() and "test_average_at_rho_max" in res.summary()


# ---------------------------------------------------------------------------------- CLI
@pytest.fixture
def mlp(tmp_path, samples):
    import shutil

    p = tmp_path / "mlp.pt"
    shutil.copy(samples / "mlp-sgd.pt", p)
    return p


def test_cli_writes_results_summary_and_plot(cli, mlp):
    r = cli(["sharpness", mlp, "--rho", "0.1,1", "--steps", "4", "--samples", "3", "--max-samples", "200", "--json"])
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["split"] == "train" and len(out["worst"]) == 2 and out["norm"] == "l2" and out["adaptive"] is True
    assert out["worst"][1] > out["worst"][0] > 0
    assert out["plots"] and out["plots"][0].endswith(".sharpness.rho.png")
    with h5py.File(out["results"], "r") as f:
        g = f["sharpness"]
        assert g.attrs["kind"] == "sharpness"
        summ = json.loads(g.attrs["summary"])
        assert summ["train_worst_at_rho_max"] == pytest.approx(out["worst"][1])
        assert g["train"]["worst_restarts"].shape == (2, 1, 1)
        assert g["train"]["average_draws"].shape == (2, 3)


def test_cli_m_sharpness_and_linf(cli, mlp):
    r = cli(["sharpness", mlp, "--rho", "0.002", "--norm", "linf", "--no-adaptive", "--steps", "3", "--restarts", "2",
             "--m", "50", "--samples", "0", "--max-samples", "200", "--no-plot", "--json"])
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["m"] == 50 and out["n_used"] == 200 and out["worst_sem"][0] is not None
    assert "average" not in out and out["average_mode"] == "surface"


@pytest.mark.parametrize("args,msg", [
    (["--rho", "0"], "--rho"), (["--rho", "-0.1"], "--rho"), (["--steps", "0"], "--steps"),
    (["--m", "100000"], "larger than"), (["--m", "0"], "--m"), (["--samples", "1"], "--samples"),
    (["--step-size", "-1"], "--step-size"), (["--eta", "x"], "--eta"), (["--params", "nomatch"], "no parameter"),
])
def test_cli_bad_input_is_one_error_line_and_writes_nothing(cli, mlp, args, msg):
    r = cli(["sharpness", mlp, "--max-samples", "100"] + args)
    assert_one_line_error(r, contains=msg)
    assert not (mlp.parent / "mlp.flatscope.h5").exists()


def test_audit_fail_if_reads_sharpness_metrics(cli, mlp):
    r = cli(["audit", mlp, "--step", "sharpness", "--set", "sharpness.rho=0.5", "--set", "sharpness.steps=3",
             "--set", "sharpness.samples=2", "--max-samples", "100", "--no-plot",
             "--fail-if", "sharpness.train_worst_at_rho_max > 1000", "--json"])
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["metrics"]["sharpness.train_worst_at_rho_max"] > 0
    r = cli(["audit", mlp, "--step", "sharpness", "--set", "sharpness.rho=0.5", "--set", "sharpness.steps=3",
             "--set", "sharpness.samples=2", "--max-samples", "100", "--no-plot",
             "--fail-if", "sharpness.train_worst_at_rho_max > 0", "--json"])
    assert r.exit_code == 1                                   # reused from the file, and the threshold fails
    assert json.loads(r.stdout)["steps"][0]["cached"] is True
    r = cli(["audit", mlp, "--step", "sharpness", "--fail-if", "sharpness.train_worst_at_rho > 0"])
    assert_one_line_error(r, contains="did you mean")


def test_plot_overlays_several_checkpoints(tmp_path):
    from flatscope.plotting import plot_function

    obj = _classification_problem(N=40)
    items = []
    for k, m in enumerate((None, 10)):
        res = sharpness({"train": obj, "test": obj}, [0.1, 0.3], steps=3, samples=3, m=m, restarts=2)
        items.append((f"ck{k}", res.to_tree()))
    paths = plot_function("sharpness")(items, tmp_path / "overlay.sharpness", "png")
    assert len(paths) == 1 and paths[0].exists() and paths[0].stat().st_size > 10_000
