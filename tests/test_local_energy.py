"""flatscope local-energy: exact answers on quadratic losses, statistics of the estimator, the σ
grammar, filter normalization, common random numbers, the target-σ bisection, and the CLI.

Exact reference (linear model, torch's mean-reduction MSE). With k outputs, N samples and
a_n = [x_n, 1], L(θ) = 1/(N k) Σ_n Σ_o (a_n·θ_o − y_no)², where θ_o = [W_o, b_o]. Its Hessian is
block diagonal, H[(o,i),(o,j)] = 2/(N k) Σ_n a_ni a_nj (for k = 1: H = 2 AᵀA / N, A = [X, 1]), and
its gradient g_(o,i) = 2/(N k) Σ_n r_no a_ni with residuals r = Aθ − y. For a direction u = D z
(D = diag(θ) for multiplicative noise, I for additive) the loss is exactly quadratic:

    δ(σ) = L(θ + σu) − L(θ) = σ gᵀD z + σ²/2 zᵀ M z,     M = D H D,

so E δ = σ²/2 tr M (= σ²/2 Σ_i H_ii θ_i², or σ²/2 tr H for additive noise), and, z being Gaussian,
its cumulants are κ2 = σ²|Dg|² + σ⁴/2 tr M², κ4 = 48 tr B⁴ + 48 aᵀB²a with B = σ²/2 M,
a = σ D g. The standard error of the mean of n draws is sqrt(κ2 / n) exactly; the sample standard
error fluctuates around it with relative s.d. ½ sqrt((κ4/κ2² + 2n/(n−1)) / n) (delta method on the
sample variance). Every tolerance below is 3 of these standard deviations.
"""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from flatscope.analyses.local_energy import (Directions, choose_batched, draw_normal, filter_normalize,
                                              local_energy, parse_sigmas)
from flatscope.checkpoint import save_checkpoint
from flatscope.cli import main
from flatscope.errors import FlatscopeError
from flatscope.models import CNN
from flatscope.objective import Objective, exact_hessian

torch.set_num_threads(1)
MLP_CKPT = "sample_checkpoints/mlp-sgd.pt"
RESNET_CKPT = "sample_checkpoints/resnet-sgd.pt"


# ------------------------------------------------------------------------------------------ helpers
def _linear_problem(k: int = 1, N: int = 200, d: int = 5, seed: int = 0, at_min: bool = False):
    """A float64 linear regression objective: at a random point (the gradient term is live and
    dominates the variance) or at the least-squares minimum (δ is a pure quadratic form)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, d, generator=g, dtype=torch.float64)
    y = X @ torch.randn(d, k, generator=g, dtype=torch.float64) + 0.3 * torch.randn(N, k, generator=g,
                                                                                   dtype=torch.float64)
    torch.manual_seed(seed)
    model = torch.nn.Linear(d, k).double()
    if at_min:
        A = torch.cat([X, torch.ones(N, 1, dtype=X.dtype)], 1)
        theta = torch.linalg.lstsq(A, y).solution                 # (d+1, k)
        with torch.no_grad():
            model.weight.copy_(theta[:d].T)
            model.bias.copy_(theta[d])
    obj = Objective(model, X, y.squeeze(1) if k == 1 else y, loss="mse", dtype=torch.float64)
    return obj, X, y


def _exact_quadratic(obj, X, y):
    """(H, g) of torch's mean-reduction MSE for a Linear(d, k) model, flat order [W (k×d), b (k)]."""
    N, d = X.shape
    k = y.shape[1]
    A = torch.cat([X, torch.ones(N, 1, dtype=X.dtype)], 1)
    W, b = obj.w0[: k * d].reshape(k, d), obj.w0[k * d:]
    R = X @ W.T + b - y                                          # (N, k) residuals
    idx = [[o * d + i for i in range(d)] + [k * d + o] for o in range(k)]
    H = torch.zeros(obj.dim, obj.dim, dtype=X.dtype)
    g = torch.zeros(obj.dim, dtype=X.dtype)
    for o in range(k):
        ii = torch.tensor(idx[o])
        H[ii[:, None], ii[None, :]] = 2.0 / (N * k) * A.T @ A
        g[ii] = 2.0 / (N * k) * A.T @ R[:, o]
    return H, g


def _moments(H, g, D, sigma):
    """Exact mean, κ2 and κ4 of δ(σ) for u = D z (D a vector: the diagonal)."""
    M = D[:, None] * H * D[None, :]
    B = sigma ** 2 / 2 * M
    a = sigma * D * g
    mean = float(torch.trace(B))
    k2 = float(a @ a + 2 * torch.trace(B @ B))
    k4 = float(48 * torch.trace(B @ B @ B @ B) + 48 * a @ B @ B @ a)
    return mean, k2, k4


def _sem_rel_sd(k2, k4, n):
    return 0.5 * math.sqrt((k4 / k2 ** 2 + 2 * n / (n - 1)) / n)


# ------------------------------------------------------------------------------------------ σ grammar
@pytest.mark.parametrize("spec, expected", [
    ("0.01..1", np.geomspace(0.01, 1, 10)),
    ("0.01..1:3", [0.01, 0.1, 1.0]),
    ("0.01..1:3:log", [0.01, 0.1, 1.0]),
    ("0..1:5:lin", [0, 0.25, 0.5, 0.75, 1.0]),
    ("0.1..0.3:3:LIN", [0.1, 0.2, 0.3]),
    ("0.2,0.05, 0.1", [0.05, 0.1, 0.2]),
    ("0.1,0.1,1e-1", [0.1]),
    ("0.5", [0.5]),
    ("1e-3..1e-1:3,0.5", [1e-3, 1e-2, 1e-1, 0.5]),
    ("0.1..0.2:1", [0.1]),
    (" 0.01 .. 1 : 2 : log ", [0.01, 1.0]),
])
def test_sigma_grammar(spec, expected):
    np.testing.assert_allclose(parse_sigmas(spec), expected, rtol=1e-12)


@pytest.mark.parametrize("spec, message", [
    ("0.5..0.01", "end of a range must be above its start"),
    ("0.1..0.1", "end of a range must be above its start"),
    ("0..1", "log-spaced range needs a positive start"),
    ("0..1:5:log", "log-spaced range needs a positive start"),
    ("-0.1..1:5:lin", "cannot be negative"),
    ("-0.1", "cannot be negative"),
    ("abc", "'abc' is not a number"),
    ("0.1..x", "end 'x' is not a number"),
    ("0.1..1:ten", "whole number"),
    ("0.1..1:2.5", "whole number"),
    ("0.1..1:0", "at least 1"),
    ("0.1..1:-3", "at least 1"),
    ("0.1..1:5:cubic", "lin or log"),
    ("0.1..1:5:lin:x", "a range is a..b"),
    ("0.1,,0.2", "empty item"),
    ("", "empty"),
    ("nan", "finite"),
    ("0.1..inf", "finite"),
    ("0.5:3", "no range"),
])
def test_sigma_grammar_errors(spec, message):
    with pytest.raises(FlatscopeError, match=message):
        parse_sigmas(spec)


# ------------------------------------------------------------------------------------------ exactness
def test_reference_hessian_is_torchs():
    """The hand-derived H and g above are those of torch's mean-reduction MSE (k = 1 and k = 3)."""
    for k in (1, 3):
        obj, X, y = _linear_problem(k=k)
        H, g = _exact_quadratic(obj, X, y)
        torch.testing.assert_close(exact_hessian(obj), H, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(obj.grad(), g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("at_min", [False, True], ids=["random_point", "at_minimum"])
@pytest.mark.parametrize("noise", ["multiplicative", "additive"])
def test_quadratic_mean_within_three_standard_errors(noise, at_min):
    obj, X, y = _linear_problem(at_min=at_min)
    H, g = _exact_quadratic(obj, X, y)
    if at_min:
        assert float(g.abs().max()) < 1e-12
    D = obj.w0 if noise == "multiplicative" else torch.ones_like(obj.w0)
    sigmas = np.array([0.03, 0.1, 0.3, 1.0])
    n = 256
    res = local_energy(obj, sigmas, samples=n, noise=noise, seed=3)
    c = res.curves["train"]
    for i, s in enumerate(sigmas):
        mean, k2, k4 = _moments(H, g, D, s)
        # the closed forms of the issue
        closed = s ** 2 / 2 * float((torch.diag(H) * obj.w0 ** 2).sum() if noise == "multiplicative"
                                    else torch.trace(H))
        assert mean == pytest.approx(closed, rel=1e-12)
        se = math.sqrt(k2 / n)
        assert abs(c.delta_loss_mean[i] - mean) <= 3 * se, (s, c.delta_loss_mean[i], mean, se)
        # the reported standard error is the exact one, up to its own sampling error
        assert abs(c.delta_loss_sem[i] / se - 1) <= 3 * _sem_rel_sd(k2, k4, n), (s, c.delta_loss_sem[i], se)
    assert np.isnan(c.delta_err_mean).all() and math.isnan(c.base_error)  # regression: no error rate


def test_quadratic_with_parameter_mask_and_several_outputs():
    """k = 3 outputs, noise on the weight matrix only (regex): E δ = σ²/2 Σ_{i∈mask} H_ii θ_i²."""
    obj, X, y = _linear_problem(k=3, seed=1)
    H, g = _exact_quadratic(obj, X, y)
    mask = obj.layout.mask("^weight$").to(torch.float64)
    D = obj.w0 * mask
    n, sigmas = 256, np.array([0.1, 0.5])
    c = local_energy(obj, sigmas, samples=n, params="^weight$", seed=4).curves["train"]
    for i, s in enumerate(sigmas):
        mean, k2, _ = _moments(H, g, D, s)
        assert abs(c.delta_loss_mean[i] - mean) <= 3 * math.sqrt(k2 / n)


def test_standard_error_shrinks_as_one_over_sqrt_samples():
    obj, X, y = _linear_problem(seed=2)
    H, g = _exact_quadratic(obj, X, y)
    s = 0.3
    _, k2, k4 = _moments(H, g, obj.w0, s)
    sems = {}
    for n in (32, 128, 512):
        sems[n] = local_energy(obj, [s], samples=n, seed=5).curves["train"].delta_loss_sem[0]
        assert abs(sems[n] / math.sqrt(k2 / n) - 1) <= 3 * _sem_rel_sd(k2, k4, n), (n, sems[n])
    # ratios at n and 4n near 2; the draws are nested, which correlates the two estimates
    # positively and only narrows the spread of the ratio below this independent-draws tolerance
    for n in (32, 128):
        tol = 2 * 3 * math.hypot(_sem_rel_sd(k2, k4, n), _sem_rel_sd(k2, k4, 4 * n))
        assert abs(sems[n] / sems[4 * n] - 2) <= tol, (n, sems[n] / sems[4 * n], tol)


# ------------------------------------------------------------------------------------------ directions
def test_filter_normalization():
    torch.manual_seed(0)
    model = CNN(in_features=64, out_features=10, channels=(3, 4), hidden=6).double()
    X = torch.randn(20, 64, dtype=torch.float64)
    obj = Objective(model, X, torch.randint(0, 10, (20,)), dtype=torch.float64)
    layout, w = obj.layout, obj.w0
    z = draw_normal(7, 0, 3, obj.dim)
    d = filter_normalize(z, w, layout)
    for name, sl, shape in zip(layout.names, layout.slices().values(), layout.shapes):
        rows = shape[0] if len(shape) >= 2 else 1
        dr, zr, wr = (t.reshape(*lead, rows, -1) for t, lead in ((d[:, sl], (3,)), (z[:, sl], (3,)), (w[sl], ())))
        torch.testing.assert_close(dr.norm(dim=-1), wr.norm(dim=-1).expand(3, rows), rtol=1e-12, atol=0)
        cos = (dr * zr).sum(-1) / (dr.norm(dim=-1) * zr.norm(dim=-1))
        torch.testing.assert_close(cos, torch.ones_like(cos), rtol=1e-12, atol=1e-12)
    # with params="weights" the 1-D tensors (biases) get no noise: Li et al.'s convention
    dirs = Directions(w, layout, "filter", layout.mask("weights"), seed=7).block(0, 3)
    for sl, shape in zip(layout.slices().values(), layout.shapes):
        if len(shape) < 2:
            assert (dirs[:, sl] == 0).all()
        else:
            torch.testing.assert_close(dirs[:, sl], d[:, sl])


def test_common_random_numbers():
    obj, _, _ = _linear_problem()
    # additive noise on a quadratic: δ_j(σ) = σ a_j + σ² b_j with the same (a_j, b_j) at every σ
    s = np.array([0.1, 0.4, 1.3])
    c = local_energy(obj, s, samples=16, noise="additive", seed=9).curves["train"]
    D = c.delta_loss_draws
    b = (D[1] / s[1] - D[0] / s[0]) / (s[1] - s[0])
    a = D[0] / s[0] - b * s[0]
    np.testing.assert_allclose(D[2], a * s[2] + b * s[2] ** 2, rtol=1e-8, atol=1e-12)
    # a σ shared by two grids sees the same draws; more draws extend fewer
    c2 = local_energy(obj, [0.4, 2.0], samples=32, noise="additive", seed=9).curves["train"]
    np.testing.assert_array_equal(c2.delta_loss_draws[0, :16], D[1])
    # every split sees the same draws: the same objective twice gives identical curves
    both = local_energy({"train": obj, "test": obj}, s, samples=8, noise="additive", seed=9).curves
    np.testing.assert_array_equal(both["train"].delta_loss_draws, both["test"].delta_loss_draws)


def test_batched_and_loop_agree_and_auto_rule():
    import flatscope.checkpoint as ck

    c = ck.load_checkpoint(MLP_CKPT)
    from flatscope.data import load_data, subsample

    X, y = subsample(*load_data(c.data_spec).split("train"), 200, 0)
    obj = Objective(c.model, X, y, loss="ce", dtype=torch.float64)
    kw = dict(samples=6, seed=1, chunk=4, target_error=0.01)
    loop = local_energy(obj, [0.1, 0.5], batched="off", **kw)
    vm = local_energy(obj, [0.1, 0.5], batched="on", **kw)
    assert not loop.batched and vm.batched
    a, b = loop.curves["train"], vm.curves["train"]
    # the loop writes points into a private flat-parameter model; it reproduces Objective.evaluate,
    # over several batches too (to float32 rounding: BLAS kernels may differ with memory alignment)
    from flatscope.analyses.local_energy import _Evaluator

    obj3 = Objective(c.model, X, y, loss="ce", batch_size=64)
    ev = _Evaluator(obj3, batched=False, bn_data=None)
    w = obj3.w0 + 0.2 * torch.randn(obj3.dim, generator=torch.Generator().manual_seed(0))
    ev.flat.copy_(w)
    base_loss, base_acc = obj3.evaluate()
    for (l1, a1), (l2, a2) in [(ev._in_place(), obj3.evaluate(w)), (ev.base(), (base_loss, 1 - base_acc))]:
        assert l1 == pytest.approx(l2, rel=1e-6) and a1 == a2
    np.testing.assert_allclose(a.delta_loss_draws, b.delta_loss_draws, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(a.delta_err_draws, b.delta_err_draws)
    assert a.target.sigma == b.target.sigma
    assert choose_batched("auto", torch.device("cpu"), "eval") is False
    assert choose_batched("auto", torch.device("cuda"), "eval") is True
    assert choose_batched("auto", torch.device("cuda"), "recompute") is False
    with pytest.raises(FlatscopeError, match="--batched on cannot be used with --bn recompute"):
        choose_batched("on", torch.device("cpu"), "recompute")


# ------------------------------------------------------------------------------------------ target σ
def _two_class_problem():
    g = torch.Generator().manual_seed(11)
    N, d = 60, 4
    Wt = torch.randn(2, d, generator=g, dtype=torch.float64)
    X = torch.randn(N, d, generator=g, dtype=torch.float64)
    y = (X @ Wt.T).argmax(1)
    model = torch.nn.Linear(d, 2).double()
    with torch.no_grad():
        model.weight.copy_(Wt)
        model.bias.zero_()
    return Objective(model, X, y, loss="ce", dtype=torch.float64), X, y


def test_target_sigma_bisection_matches_exact_crossing():
    """A linear classifier's margins are linear in σ along each draw, so the mean error on fixed draws
    is a known step function: with all samples right at σ = 0, sample i turns wrong on draw j at
    σ_ij = −m_i / s_ij when s_ij < 0, and δE_err(σ) = #{σ_ij ≤ σ} / (n N). The target σ* for ε is the
    ⌈ε n N⌉-th smallest σ_ij."""
    obj, X, y = _two_class_problem()
    assert obj.evaluate()[1] == 1.0
    n, eps, rtol = 24, 0.05, 1e-4
    res = local_energy(obj, parse_sigmas("0.01..10:7"), samples=n, target_error=eps, rtol=rtol, seed=2)
    tg = res.curves["train"].target
    D = Directions(obj.w0, obj.layout, "multiplicative", obj.layout.mask("all"), seed=2).block(0, n)
    W, b = obj.w0[:8].reshape(2, 4), obj.w0[8:]
    other = 1 - y
    rows = torch.arange(len(y))
    m = ((X @ W.T + b)[rows, y] - (X @ W.T + b)[rows, other])                 # (N,)
    flips = []
    for dj in D:
        Dw, Db = dj[:8].reshape(2, 4), dj[8:]
        s = (X @ Dw.T + Db)[rows, y] - (X @ Dw.T + Db)[rows, other]
        flips += (-m[s < 0] / s[s < 0]).tolist()
    flips = np.sort(flips)
    exact = flips[math.ceil(eps * n * len(y) - 1e-9) - 1]
    assert tg.reached
    assert tg.lo < exact <= tg.hi and tg.hi - tg.lo <= rtol * tg.hi
    assert tg.sigma == tg.hi and tg.delta_err_mean >= eps - 1e-12
    # never reached in the bracket: NaN, with the largest grid σ as a lower bound
    far = local_energy(obj, [0.01, 0.1], samples=4, target_error=0.5, seed=2).curves["train"].target
    assert not far.reached and math.isnan(far.sigma) and far.lower_bound == 0.1 and far.evaluations == 0


def test_bn_recompute_on_resnet():
    import flatscope.checkpoint as ck
    from flatscope.data import load_data, subsample

    c = ck.load_checkpoint(RESNET_CKPT)
    data = load_data(c.data_spec)
    X, y = subsample(*data.split("train"), 120, 0)
    obj = Objective(c.model, X, y, loss="ce")
    res = local_energy(obj, [1e-6, 0.2], samples=3, bn="recompute", bn_data=X, seed=0)
    cur = res.curves["train"]
    base = obj.evaluate(obj.w0, obj.recompute_bn(obj.w0, X))
    assert cur.base_loss == pytest.approx(base[0], rel=1e-6)
    assert abs(cur.delta_loss_mean[0]) < 1e-4   # δE → 0 as σ → 0 with statistics recomputed at w too
    ev = local_energy(obj, [1e-6, 0.2], samples=3, seed=0).curves["train"]
    assert ev.base_loss == pytest.approx(obj.evaluate()[0], rel=1e-9)
    assert not np.allclose(ev.delta_loss_draws[1], cur.delta_loss_draws[1])


def test_library_input_errors():
    obj, _, _ = _linear_problem()
    for kw, msg in [({"samples": 1}, "at least 2"), ({"noise": "gaussian"}, "unknown --noise"),
                    ({"chunk": 0}, "--chunk"), ({"params": "nomatch"}, "no parameter matches"),
                    ({"target_error": 0.1}, "needs class labels"), ({"bn": "train"}, "unknown --bn")]:
        with pytest.raises(FlatscopeError, match=msg):
            local_energy(obj, [0.1], **kw)
    with pytest.raises(FlatscopeError, match="increasing"):
        local_energy(obj, [0.2, 0.1])


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def regression_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lereg")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((80, 3)).astype(np.float32)
    y = (X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.standard_normal(80)).astype(np.float32)
    data = tmp / "reg.npz"
    np.savez(data, X=X, y=y, X_test=X[:20], y_test=y[:20])
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    path = tmp / "reg.pt"
    save_checkpoint(str(path), model, {"name": "linear", "kwargs": {"in_features": 3, "out_features": 1}},
                    {"name": f"npz:{data}"}, "mse", {})
    return path


def _invoke(args):
    return CliRunner().invoke(main, ["local-energy", *args, "--threads", "1"])


def test_cli_json_hdf5_and_plot(tmp_path):
    out = tmp_path / "r.h5"
    r = _invoke([MLP_CKPT, "--sigma", "0.05..0.5:3", "--samples", "4", "--split", "both", "--max-samples", "150",
                 "--target-error", "0.01", "--json", "-o", str(out)])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert p["split"] == "both" and len(p["sigma"]) == 3 and p["samples"] == 4
    for split in ("train", "test"):
        s = p[split]
        for key in ("delta_loss_mean", "delta_loss_sem", "delta_err_mean", "delta_err_sem"):
            assert len(s[key]) == 3
        assert {"base_loss", "base_error", "target_sigma", "target"} <= set(s)
    assert p["plots"] and all(path.endswith(".png") for path in p["plots"])
    with h5py.File(out) as f:
        g = f["local_energy"]
        assert g.attrs["kind"] == "local_energy" and g.attrs["noise"] == "multiplicative"
        np.testing.assert_allclose(g["sigma"][()], p["sigma"])
        for split in ("train", "test"):
            assert g[split]["delta_loss_draws"].shape == (3, 4) and g[split]["delta_err_draws"].shape == (3, 4)
            assert g[split]["base_loss"][()] == pytest.approx(p[split]["base_loss"])
            assert g[split]["base_error"][()] == pytest.approx(p[split]["base_error"])
            np.testing.assert_allclose(g[split]["delta_err_mean"][()], p[split]["delta_err_mean"])
            assert "epsilon" in g[split]["target"]
        summary = json.loads(g.attrs["summary"])
        assert {"train_base_loss", "test_target_sigma", "train_delta_err_at_sigma_max"} <= set(summary)
    # several results files overlay
    out2 = tmp_path / "r2.h5"
    r = _invoke([MLP_CKPT, "--sigma", "0.05,0.2", "--samples", "3", "--max-samples", "100", "--noise", "filter",
                 "--params", "weights", "--json", "--no-plot", "-o", str(out2)])
    assert r.exit_code == 0, r.output
    single = json.loads(r.stdout)
    assert single["split"] == "train" and len(single["delta_loss_mean"]) == 2 and "train" not in single
    r = CliRunner().invoke(main, ["plot", str(out), str(out2), "--outdir", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "overlay.local_energy.curves.png").exists()


def test_cli_regression_checkpoint(regression_ckpt, tmp_path):
    out = tmp_path / "reg.h5"
    r = _invoke([str(regression_ckpt), "--sigma", "0.1..1:3", "--samples", "5", "--noise", "additive",
                 "--json", "-o", str(out)])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert all(v is None for v in p["delta_err_mean"]) and p["base_error"] is None
    assert all(v > 0 for v in p["delta_loss_mean"])
    assert (tmp_path / "reg.local_energy.curves.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--sigma", "0.5..0.01"], "end of a range must be above its start"),
    (["--sigma", "0..1"], "positive start"),
    (["--sigma", "a..b"], "not a number"),
    (["--sigma", "0.1..1:0"], "at least 1"),
    (["--samples", "1"], "--samples must be at least 2"),
    (["--samples", "many"], "--samples must be a whole number"),
    (["--chunk", "0"], "--chunk must be at least 1"),
    (["--target-error", "0"], "--target-error must be in (0, 1]"),
    (["--target-error", "1.5"], "--target-error must be in (0, 1]"),
    (["--target-error", "abc"], "is not a number"),
    (["--params", "nomatch"], "no parameter matches"),
    (["--params", "("], "bad parameter regex"),
])
def test_cli_bad_inputs(tmp_path, args, message):
    out = tmp_path / "keep.h5"
    r = _invoke([MLP_CKPT, "--sigma", "0.1", "--samples", "2", "--max-samples", "50", "--no-plot", "-o", str(out)])
    assert r.exit_code == 0, r.output
    before = out.read_bytes()
    r = _invoke([MLP_CKPT, "--max-samples", "50", "--no-plot", "-o", str(out), *args])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], r.stderr
    assert "Traceback" not in r.output and r.stdout == ""
    assert out.read_bytes() == before


def test_cli_bad_combinations(regression_ckpt, tmp_path):
    r = _invoke([RESNET_CKPT, "--bn", "recompute", "--batched", "on", "-o", str(tmp_path / "x.h5")])
    assert r.exit_code == 2 and r.stderr.startswith("Error: --batched on cannot be used with --bn recompute")
    r = _invoke([str(regression_ckpt), "--target-error", "0.1", "-o", str(tmp_path / "y.h5")])
    assert r.exit_code == 2 and "needs class labels" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "y.h5").exists()
