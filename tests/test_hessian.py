"""flatscope hessian against exact Hessians, and the CLI end to end.

Exact answers: linear regression under torch's mean-reduction MSE with one output has the Hessian
``2 A^T A / N`` with ``A = [X, 1]``; small MLP and CNN on digits subsets have dense Hessians from
``torch.func.hessian`` (``flatscope.objective.exact_hessian``) in float64. Tolerances: Lanczos Ritz
values lie within their residual of an eigenvalue; float32 products add float32 rounding (the issue
asks 1e-4 relative); stochastic estimates are held to 3 of their own standard errors.
"""

import hashlib
import json

import h5py
import numpy as np
import pytest
import torch

from flatscope.analyses.hessian import HessianOperator, hessian_analysis, top_eigenvectors
from flatscope.checkpoint import save_checkpoint
from flatscope.data import load_data, subsample
from flatscope.models import CNN, MLP
from flatscope.objective import Objective, exact_hessian
from flatscope.params import ParamLayout

torch.set_num_threads(1)
SAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / "sample_checkpoints"
FAST = ["--threads", "1", "--top", "3", "--probes", "2", "--steps", "12", "--trace-probes", "9",
        "--max-samples", "120"]


# ------------------------------------------------------------------ helpers

def run_cli(args):
    from click.testing import CliRunner

    from flatscope.cli import main

    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 keeps stderr apart already
        runner = CliRunner()
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, contains):
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert contains.lower() in lines[0].lower(), lines[0]
    return lines[0]


def regression_checkpoint(folder, n=60, d=4, seed=0, name="lin.pt"):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = (X @ rng.standard_normal(d) + 0.3 * rng.standard_normal(n)).astype(np.float32)
    data = folder / f"{name}.npz"
    np.savez(data, X=X, y=y, X_test=X[:10], y_test=y[:10])
    torch.manual_seed(seed)
    model = torch.nn.Linear(d, 1)
    path = folder / name
    save_checkpoint(str(path), model, {"name": "linear", "kwargs": {"in_features": d, "out_features": 1}},
                    {"name": f"npz:{data}"}, "mse", {})
    A = np.hstack([X.astype(np.float64), np.ones((n, 1))])
    return path, model, X, y, 2 * A.T @ A / n


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def digits_subset():
    X, y = load_data({"name": "digits"}).split("train")
    return subsample(X, y, 150, 0)


def small_model(kind):
    torch.manual_seed(0)
    return MLP(widths=[8]) if kind == "mlp" else CNN(channels=[2, 4], hidden=8)


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def dense_case(request, digits_subset):
    X, y = digits_subset
    model = small_model(request.param)
    o64 = Objective(model, X, y, loss="ce", dtype=torch.float64)
    H = exact_hessian(o64).numpy()
    return request.param, model, X, y, o64, H


# ------------------------------------------------------------------ exact quadratic

def test_linear_regression_eigenvalues_and_trace_are_exact(tmp_path):
    path, model, X, y, H = regression_checkpoint(tmp_path)
    ev = np.linalg.eigvalsh(H)
    for dtype in (torch.float32, torch.float64):
        obj = Objective(model, torch.as_tensor(X), torch.as_tensor(y), loss="mse", dtype=dtype)
        res = hessian_analysis(obj, top=5, bottom=2, probes=3, steps=5, trace_probes=5, tol=1e-6)
        np.testing.assert_allclose(res.top.eigenvalues, ev[::-1], rtol=1e-5)
        np.testing.assert_allclose(res.bottom.eigenvalues, ev[:2], rtol=1e-5)
        assert res.traces.method == "exact"
        assert abs(res.traces.trace - np.trace(H)) <= 1e-5 * abs(np.trace(H))
        # per-tensor blocks: weight (4) and bias (1)
        assert res.top.converged.all() and res.summary()["converged"]
        s = res.summary()
        assert s["lambda_max"] == pytest.approx(ev[-1], rel=1e-5)
        assert s["effective_rank"] == pytest.approx(np.trace(H) / ev[-1], rel=1e-5)
        assert s["negative_mass"] == pytest.approx(0.0, abs=1e-6)


def test_linear_regression_larger_than_budget_uses_stochastic_trace(tmp_path):
    path, model, X, y, H = regression_checkpoint(tmp_path, n=200, d=40)
    obj = Objective(model, torch.as_tensor(X), torch.as_tensor(y), loss="mse", dtype=torch.float64)
    res = hessian_analysis(obj, top=4, probes=8, steps=20, trace_probes=18, tol=1e-10, per_layer=True)
    ev = np.linalg.eigvalsh(H)
    np.testing.assert_allclose(res.top.eigenvalues, ev[::-1][:4], rtol=1e-9)
    assert res.traces.method == "hutch++"
    assert abs(res.traces.trace - np.trace(H)) <= 3 * res.traces.stderr
    pl = res.per_layer
    assert pl["names"] == ["weight", "bias"]
    np.testing.assert_allclose(pl["lambda_max"], [np.linalg.eigvalsh(H[:40, :40])[-1], H[40, 40]], rtol=1e-9)
    assert np.all(np.abs(pl["trace"] - [np.trace(H[:40, :40]), H[40, 40]]) <= 3 * pl["trace_stderr"] + 1e-12)
    # density: a probability density whose mean is tr(H)/n within its SLQ standard error
    assert abs(np.trapezoid(res.values, res.grid) - 1) < 1e-6
    mean, se = res.density.integral(lambda x: x)
    assert abs(mean - np.trace(H) / 41) <= 3 * se


# ------------------------------------------------------------------ small nets vs dense Hessian

def test_top5_match_dense_hessian(dense_case):
    kind, model, X, y, o64, H = dense_case
    ev = np.linalg.eigvalsh(H)
    ref = ev[::-1][:5]
    # float32 products (the default): 1e-4 relative, as the issue asks
    o32 = Objective(model, X, y, loss="ce")
    r32 = hessian_analysis(o32, top=5, bottom=2, density=False, trace_probes=6, tol=1e-5).top
    assert r32.converged.all()
    np.testing.assert_allclose(r32.eigenvalues, ref, rtol=1e-4)
    # float64 products: within each Ritz pair's own residual
    r64 = hessian_analysis(o64, top=5, bottom=2, density=False, trace_probes=6, tol=1e-10)
    assert np.all(np.abs(r64.top.eigenvalues - ref) <= r64.top.residuals + 1e-12 * ev[-1])
    assert np.all(np.abs(r64.bottom.eigenvalues - ev[:2]) <= r64.bottom.residuals + 1e-12 * ev[-1])
    # eigenvectors: H v = lambda v with the dense Hessian
    V = r64.top.eigenvectors.numpy()
    assert np.all(np.linalg.norm(V @ H - r64.top.eigenvalues[:, None] * V, axis=1) <= 1e-9 * ev[-1])


def test_density_and_trace_against_dense_hessian(dense_case):
    kind, model, X, y, o64, H = dense_case
    n = H.shape[0]
    res = hessian_analysis(o64, top=2, probes=8, steps=30, trace_probes=45, per_layer=True, tol=1e-8)
    assert abs(np.trapezoid(res.values, res.grid) - 1) < 1e-6
    mean, se = res.density.integral(lambda x: x)
    assert abs(np.trapezoid(res.grid * res.values, res.grid) - mean) < 1e-6 * np.abs(res.grid).max()
    assert abs(mean - np.trace(H) / n) <= 3 * se
    assert abs(res.traces.trace - np.trace(H)) <= 3 * res.traces.stderr
    # per layer: top eigenvalue of each diagonal block, and block traces within 3 s.e.
    sl = o64.layout.slices()
    pl = res.per_layer
    for i, name in enumerate(pl["names"]):
        blk = H[sl[name], sl[name]]
        assert abs(pl["lambda_max"][i] - np.linalg.eigvalsh(blk)[-1]) <= pl["residuals"][i] + 1e-12 * np.abs(H).max()
        assert abs(pl["trace"][i] - np.trace(blk)) <= 3 * pl["trace_stderr"][i] + 1e-12
    # blocks no larger than the trace budget (the biases here) are exact
    small = pl["numel"] <= 45
    assert small.any() and np.all(pl["trace_stderr"][small] == 0)
    # flatness summaries follow their definitions
    s = res.summary()
    assert s["effective_rank"] == pytest.approx(s["trace"] / s["lambda_max"])
    assert s["lambda_ratio"] == pytest.approx(res.top.eigenvalues[0] / res.top.eigenvalues[1])
    assert 0 <= s["negative_mass"] <= 1 and 0 <= s["negative_fraction"] <= 1
    assert res.lambda_min[1] == "slq" and s["lambda_min"] >= np.linalg.eigvalsh(H)[0] - 1e-10


def test_hvp_modes_and_batches_agree(digits_subset):
    X, y = digits_subset
    model = small_model("mlp")
    V = torch.randn(3, 610, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    outs = {}
    for mode in ("cached", "double-backward"):
        for bs in (None, 64):
            obj = Objective(model, X, y, loss="ce", dtype=torch.float64, batch_size=bs)
            op = HessianOperator(obj, mode=mode)
            outs[mode, bs] = op(V)
            assert op.n_matvec == 3
            assert torch.allclose(op(V[0]), outs[mode, bs][0], rtol=1e-12, atol=1e-14)
    ref = outs["double-backward", None]
    for key, out in outs.items():
        assert torch.allclose(out, ref, rtol=1e-10, atol=1e-13), key


def test_top_eigenvectors_entry_point(dense_case):
    kind, model, X, y, o64, H = dense_case
    r = top_eigenvectors(o64, k=2, tol=1e-10)
    assert r.eigenvectors.shape == (2, o64.dim) and r.eigenvectors.dtype == torch.float64
    np.testing.assert_allclose(r.eigenvalues, np.linalg.eigvalsh(H)[::-1][:2], rtol=1e-9)
    # the generic entry point on the objective's own forward-over-reverse products
    from flatscope.linalg import lanczos

    r2 = lanczos(o64.hvp, o64.dim, k=2, tol=1e-10)
    np.testing.assert_allclose(r2.eigenvalues, r.eigenvalues, rtol=1e-9)


def test_nonfinite_product_keeps_earlier_stages(monkeypatch, digits_subset):
    X, y = digits_subset
    obj = Objective(small_model("mlp"), X, y, loss="ce")
    original = HessianOperator.__call__

    def flaky(self, V):
        out = original(self, V)
        if self.n_matvec > 40:
            out = out * float("nan")
        return out

    monkeypatch.setattr(HessianOperator, "__call__", flaky)
    res = hessian_analysis(obj, top=2, probes=2, steps=30, trace_probes=6)
    assert res.top is not None and len(res.top.eigenvalues) == 2
    assert res.density is not None and res.density.nonfinite_at is not None
    assert "SLQ product" in res.nonfinite and res.traces is None


# ------------------------------------------------------------------ CLI

def test_cli_json_and_hdf5_layout(tmp_path):
    out = tmp_path / "r.h5"
    r = run_cli(["hessian", SAMPLES / "mlp-sgd.pt", *FAST, "--bottom", "2", "--per-layer", "--save-eigenvectors",
                 "--json", "-o", out])
    assert r.exit_code == 0, r.stderr
    payload = json.loads(r.stdout)
    for key in ("eigenvalues", "residuals", "eigen_converged", "bottom_eigenvalues", "bottom_residuals",
                "trace", "trace_stderr", "lambda_max", "lambda_min", "lambda_ratio", "effective_rank",
                "negative_mass", "negative_fraction", "converged", "n_matvec", "density", "per_layer", "results"):
        assert key in payload, key
    assert len(payload["eigenvalues"]) == 3 and len(payload["bottom_eigenvalues"]) == 2
    with h5py.File(out, "r") as f:
        g = f["hessian"]
        assert g.attrs["kind"] == "hessian"
        for name in ("eigenvalues", "residuals", "converged", "bottom_eigenvalues", "bottom_residuals",
                     "bottom_converged", "trace", "trace_stderr", "density/grid", "density/values",
                     "density/nodes", "density/weights", "per_layer/lambda_max", "per_layer/trace",
                     "per_layer/trace_stderr", "eigenvectors"):
            assert name in g, name
        assert g["density/nodes"].shape == (2, 12) and g["eigenvectors"].shape == (3, 8970)
        summary = json.loads(g.attrs["summary"])
        assert summary["lambda_max"] == pytest.approx(payload["eigenvalues"][0])
        layout = ParamLayout.from_attrs(json.loads(g.attrs["layout"]))
        assert layout.size == 8970 and layout.names[0] == "net.0.weight"
        V = g["eigenvectors"][()]
        np.testing.assert_allclose(np.linalg.norm(V, axis=1), 1, rtol=1e-12)
        assert json.loads(g["per_layer"].attrs["names"])[0] == "net.0.weight"
    # the stored eigenvectors are eigenvectors of this Hessian (same subset via --max-samples/--seed)
    from flatscope.checkpoint import load_checkpoint

    ck = load_checkpoint(str(SAMPLES / "mlp-sgd.pt"))
    Xs, ys = subsample(*load_data(ck.data_spec).split("train"), 120, 0)
    obj = Objective(ck.model, Xs, ys, loss="ce")
    HV = HessianOperator(obj)(torch.as_tensor(V)).double().numpy()
    lam = np.asarray(payload["eigenvalues"])
    assert np.all(np.linalg.norm(HV - lam[:, None] * V, axis=1) <= 1e-5 * lam[0] + np.asarray(payload["residuals"]))


def test_cli_plots_and_overlay(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    r = run_cli(["hessian", SAMPLES / "cnn-sgd.pt", *FAST, "--per-layer", "--bottom", "1", "-q", "-o", a])
    assert r.exit_code == 0, r.stderr
    for suffix in ("eigenvalues", "density", "per_layer"):
        assert (tmp_path / f"a.hessian.{suffix}.png").exists()
    r = run_cli(["hessian", SAMPLES / "cnn-sgd.pt", *FAST, "--per-layer", "--seed", "1", "-q", "--no-plot", "-o", b])
    assert r.exit_code == 0, r.stderr
    r = run_cli(["plot", a, b, "--outdir", tmp_path])
    assert r.exit_code == 0, r.stderr
    for suffix in ("eigenvalues", "density", "per_layer"):
        assert (tmp_path / f"overlay.hessian.{suffix}.png").exists()


def test_cli_linear_regression_exact(tmp_path):
    path, model, X, y, H = regression_checkpoint(tmp_path)
    r = run_cli(["hessian", path, "--top", "5", "--probes", "2", "--steps", "5", "--trace-probes", "5",
                 "--json", "--no-plot", "--threads", "1"])
    assert r.exit_code == 0, r.stderr
    p = json.loads(r.stdout)
    np.testing.assert_allclose(p["eigenvalues"], np.linalg.eigvalsh(H)[::-1], rtol=1e-5)
    assert p["trace"] == pytest.approx(np.trace(H), rel=1e-5) and p["trace_stderr"] == 0
    assert p["trace_method"] == "exact" and p["converged"] is True


def test_cli_not_converged_warns_and_stores(tmp_path):
    out = tmp_path / "r.h5"
    r = run_cli(["hessian", SAMPLES / "mlp-sgd.pt", *FAST, "--max-iter", "3", "--tol", "1e-9", "--no-density",
                 "--no-plot", "-o", out, "--json"])
    assert r.exit_code == 0, r.stderr
    assert "did not converge" in r.stderr
    p = json.loads(r.stdout)
    assert p["converged"] is False and p["eigen_status"] == "max_iter"
    with h5py.File(out, "r") as f:
        assert not f["hessian/converged"][()].all() and len(f["hessian/eigenvalues"]) == 3


@pytest.mark.parametrize("args, message", [
    (["--top", "0"], "--top must be at least 1"),
    (["--top", "9000"], "larger than the number of parameters"),
    (["--bottom", "9000"], "larger than the number of parameters"),
    (["--probes", "0"], "--probes must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--trace-probes", "1"], "--trace-probes must be at least 2"),
    (["--tol", "0"], "--tol must be a positive number"),
    (["--max-iter", "2"], "--max-iter 2 is below"),
    (["--block-size", "0"], "--block-size must be at least 1"),
    (["--split", "both"], "one split at a time"),
])
def test_cli_bad_input_one_line_and_file_untouched(tmp_path, args, message):
    out = tmp_path / "r.h5"
    assert run_cli(["hessian", SAMPLES / "mlp-sgd.pt", *FAST, "--no-density", "--no-plot", "-q", "-o", out]).exit_code == 0
    before = sha(out)
    r = run_cli(["hessian", SAMPLES / "mlp-sgd.pt", *FAST, "--no-plot", "-o", out, *args])
    one_line_error(r, message)
    assert sha(out) == before


def test_cli_nonfinite_weights(tmp_path):
    # (a linear model under MSE would not do: its Hessian does not depend on the weights)
    bad = small_model("mlp")
    with torch.no_grad():
        bad.net[0].weight[0, 0] = float("nan")
    save_checkpoint(str(tmp_path / "nan.pt"), bad, {"name": "mlp", "kwargs": {"widths": [8]}},
                    {"name": "digits"}, "ce", {})
    r = run_cli(["hessian", tmp_path / "nan.pt", "--allow-nonfinite", "--top", "2", "--no-plot",
                 "--max-samples", "50"])
    one_line_error(r, "non-finite Hessian-vector product at Lanczos iteration 1")
    assert not (tmp_path / "nan.flatscope.h5").exists()


def test_cli_nonfinite_midway_stores_earlier_stages(tmp_path, monkeypatch):
    original = HessianOperator.__call__

    def flaky(self, V):
        out = original(self, V)
        return out * float("nan") if self.n_matvec > 30 else out

    monkeypatch.setattr(HessianOperator, "__call__", flaky)
    out = tmp_path / "r.h5"
    r = run_cli(["hessian", SAMPLES / "mlp-sgd.pt", *FAST, "--steps", "20", "--no-plot", "-q", "-o", out])
    msg = one_line_error(r, "non-finite Hessian-vector product at SLQ product")
    assert "stored in" in msg
    with h5py.File(out, "r") as f:
        assert len(f["hessian/eigenvalues"]) == 3 and "SLQ" in f["hessian"].attrs["nonfinite"]


def test_cli_no_trainable_parameters(tmp_path, monkeypatch):
    (tmp_path / "frozen_factory.py").write_text(
        "import torch\n"
        "def frozen(in_features=4, out_features=1):\n"
        "    m = torch.nn.Linear(in_features, out_features)\n"
        "    m.requires_grad_(False)\n"
        "    return m\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path, model, X, y, H = regression_checkpoint(tmp_path)
    r = run_cli(["hessian", path, "--model", "frozen_factory:frozen", "--no-plot"])
    one_line_error(r, "no trainable parameters")
