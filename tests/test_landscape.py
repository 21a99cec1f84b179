"""Tests of ``flatscope landscape``: directions, exact slices of a quadratic loss, resume, I/O, bad input.

Exactness: for linear regression under MSE the loss is exactly quadratic in the parameters,
``L(w + a d) = L(w) + a g.d + a^2/2 d.H.d`` with ``H = 2 A^T A / N`` (``A = [X, 1]``), so every slice
computed in float64 must equal the closed form to float64 rounding: the evaluation sums N = 40 squared
residuals, so the error is a few N * 2^-53 relative; we allow 1e-12 relative.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from flatscope.analyses.landscape import (VMAP_MAX_SAMPLES, Grid, LandscapeResult, PointEvaluator, axis,
                                          choose_batching, compute, default_points_per_call, parse_grid,
                                          parse_range)
from flatscope.checkpoint import load_checkpoint, save_checkpoint
from flatscope.cli import common, main
from flatscope.data import load_data, subsample
from flatscope.directions import normalize_direction, pca_directions, random_directions
from flatscope.errors import FlatscopeError
from flatscope.objective import Objective
from flatscope.params import ParamLayout
from flatscope.results import find_analyses, read_tree

torch.set_num_threads(1)
SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"
RTOL_F64 = 1e-12


def run_cli(*args, expect=0):
    r = CliRunner().invoke(main, ["landscape", *map(str, args), "--threads", "1", "--no-plot"])
    assert r.exit_code == expect, (r.exit_code, r.stdout, r.stderr, r.exception)
    return r


def one_error_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    return lines[0]


def tree(path, name) -> dict:
    with h5py.File(path, "r") as f:
        return read_tree(f[f"landscape/{name}"])


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def linreg(tmp_path_factory):
    """A linear-regression checkpoint (5 inputs, 40 samples, MSE) and its exact L, g, H in float64."""
    d = tmp_path_factory.mktemp("linreg")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 5)).astype(np.float32)
    y = (X @ rng.standard_normal(5) + 0.3 * rng.standard_normal(40)).astype(np.float32)
    np.savez(d / "data.npz", X=X, y=y, X_test=X[:10], y_test=y[:10])
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    ckpt = d / "lin.pt"
    save_checkpoint(str(ckpt), model, {"name": "linear", "kwargs": {"in_features": 5, "out_features": 1}},
                    {"name": f"npz:{d / 'data.npz'}"}, "mse", {})
    A = np.hstack([X.astype(np.float64), np.ones((40, 1))])
    theta = np.concatenate([model.weight.detach().double().numpy().ravel(), model.bias.detach().double().numpy()])
    r = A @ theta - y.astype(np.float64)
    return {"dir": d, "ckpt": ckpt, "L": float(np.mean(r ** 2)), "g": 2 * A.T @ r / 40, "H": 2 * A.T @ A / 40,
            "layout": ParamLayout.of(model)}


@pytest.fixture(scope="module")
def mlp_pair(tmp_path_factory):
    """The sample MLP and two perturbed copies (b, c) saved as flatscope checkpoints."""
    d = tmp_path_factory.mktemp("pair")
    ck = load_checkpoint(str(SAMPLES / "mlp-sgd.pt"))
    shutil.copy(SAMPLES / "mlp-sgd.pt", d / "a.pt")
    g = torch.Generator().manual_seed(1)
    for name in ("b", "c"):
        m = load_checkpoint(str(SAMPLES / "mlp-sgd.pt")).model
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))
        save_checkpoint(str(d / f"{name}.pt"), m, ck.model_spec, ck.data_spec, ck.loss, {})
    return d


def own_loss(path, split="train", max_samples=None):
    ck = load_checkpoint(str(path))
    X, y = load_data(ck.data_spec).split(split)
    X, y = subsample(X, y, max_samples, 0)
    return Objective(ck.model, X, y, loss=ck.loss, batch_size=2048).evaluate()


# ------------------------------------------------------------------------------ grid parsing
def test_axis_is_exactly_centered_and_hits_endpoints():
    x = axis(-1, 1, 51)
    assert x[25] == 0.0 and x[0] == -1.0 and x[-1] == 1.0
    x = axis(-0.5, 1.5, 101)
    assert x[25] == 0.0 and x[75] == 1.0
    assert parse_range("-1:1,-0.5:0.5", 2, (-1, 1)) == [(-1.0, 1.0), (-0.5, 0.5)]
    assert parse_range("-2:3", 2, (-1, 1)) == [(-2.0, 3.0), (-2.0, 3.0)]
    assert parse_grid("51,26", 2) == [51, 26] and parse_grid(None, 1) == [51]
    for bad in ("1:1", "2:1", "a:b", "-1:1,0:1"):
        with pytest.raises(FlatscopeError):
            parse_range(bad, 1, (-1, 1))
    for bad in ("1", "0", "x", "5,5"):
        with pytest.raises(FlatscopeError):
            parse_grid(bad, 1)


def test_grid_coords_are_row_major_x_inner():
    g = Grid(np.array([0.0, 1.0, 2.0]), np.array([10.0, 20.0]))
    assert g.shape == (2, 3)
    c = g.coords().reshape(2, 3, 2)
    assert (c[1, 2] == [2.0, 20.0]).all() and (c[0, 1] == [1.0, 10.0]).all()
    assert g.index_of(1.0, 20.0) == 4


# ------------------------------------------------------------------------------ directions
@pytest.mark.parametrize("ckpt", ["cnn-sgd.pt", "resnet-sgd.pt"])
def test_filter_normalization_matches_each_filter_norm(ckpt):
    model = load_checkpoint(str(SAMPLES / ckpt)).model
    layout = ParamLayout.of(model)
    w = layout.flatten({n: p.detach() for n, p in model.named_parameters()}).double()
    dirs = random_directions(w, layout, 2, torch.Generator().manual_seed(0))
    for d in dirs.vectors:
        for (name, sl), shape in zip(layout.slices().items(), layout.shapes):
            dv, wv = d[sl].view(shape[0], -1), w[sl].view(shape[0], -1)
            if len(shape) >= 2:   # every output filter / neuron has its weights' norm
                torch.testing.assert_close(dv.norm(dim=1), wv.norm(dim=1), rtol=1e-12, atol=0)
            else:                 # biases and BatchNorm affine parameters are zeroed by default
                assert (d[sl] == 0).all(), name
    inc = random_directions(w, layout, 1, torch.Generator().manual_seed(0), bias_bn="include").vectors[0]
    lay = random_directions(w, layout, 1, torch.Generator().manual_seed(0), norm="layer", bias_bn="include").vectors[0]
    for (name, sl), shape in zip(layout.slices().items(), layout.shapes):
        if len(shape) == 1:
            torch.testing.assert_close(inc[sl].norm(), w[sl].norm(), rtol=1e-12, atol=0)
        torch.testing.assert_close(lay[sl].norm(), w[sl].norm(), rtol=1e-12, atol=0)
    raw = torch.randn(1, layout.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)[0]
    none = random_directions(w, layout, 1, torch.Generator().manual_seed(0), norm="none", bias_bn="include")
    assert torch.equal(none.vectors[0], raw)


def test_orthogonalized_pair_and_zero_filters():
    layout = ParamLayout(("w", "b"), ((3, 4), (3,)))
    w = torch.arange(15, dtype=torch.float64)
    w[:4] = 0    # an all-zero filter gets a zero direction
    d = normalize_direction(torch.ones(15, dtype=torch.float64), w, layout)
    assert (d[:4] == 0).all() and (d[12:] == 0).all()
    pair = random_directions(w, layout, 2, torch.Generator().manual_seed(3), orthogonalize=True).vectors
    assert abs(float(pair[0] @ pair[1])) < 1e-12 * float(pair[0].norm() * pair[1].norm())


def test_pca_recovers_a_planar_trajectory():
    layout = ParamLayout(("w",), ((50,),))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, generator=g, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(50, 2, generator=g, dtype=torch.float64))[0].T
    ab = torch.randn(6, 2, generator=g, dtype=torch.float64)
    dirs = pca_directions([w + c @ U for c in ab], w, layout)
    path = torch.as_tensor(dirs.info["path"])
    torch.testing.assert_close(path @ dirs.vectors, ab @ U, rtol=0, atol=1e-12)   # exactly in the plane
    assert abs(sum(dirs.info["explained_variance_ratio"]) - 1) < 1e-12
    torch.testing.assert_close(dirs.vectors @ dirs.vectors.T, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(FlatscopeError, match="at least 3"):
        pca_directions([w, w + 1], w, layout)


# ------------------------------------------------------------------------------ exact quadratic slices
@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_1d_slice_is_the_exact_parabola(linreg, tmp_path, batching):
    out = tmp_path / "r.h5"
    run_cli(linreg["ckpt"], "--dtype", "float64", "--bias-bn", "include", "--range", "-2:3", "--grid", "11",
            "--batching", batching, "-o", out)
    t = tree(out, "random-1d")
    d = t["directions"]["vectors"][0]
    a = t["x"]
    expected = linreg["L"] + a * (linreg["g"] @ d) + 0.5 * a ** 2 * (d @ linreg["H"] @ d)
    np.testing.assert_allclose(t["train"]["loss"], expected, rtol=RTOL_F64, atol=0)
    assert t["x"][4] == 0 and t["train"]["loss"][4] == t["train"]["plain_loss"]   # the centre is w itself
    assert json.loads(t["options"])["batching"] == batching


def test_2d_non_square_slice_is_the_exact_quadratic_form(linreg, tmp_path):
    out = tmp_path / "r.h5"
    r = run_cli(linreg["ckpt"], "--2d", "--dtype", "float64", "--bias-bn", "include", "--orthogonalize",
                "--range", "-1:1,-0.5:0.25", "--grid", "7,4", "--split", "both", "-o", out, "--json")
    t = tree(out, "random-2d")
    d1, d2 = t["directions"]["vectors"]
    g, H = linreg["g"], linreg["H"]
    assert t["x"].shape == (7,) and t["y"].shape == (4,) and t["train"]["loss"].shape == (4, 7)
    X, Y = np.meshgrid(t["x"], t["y"])            # X[j, i] = x[i], Y[j, i] = y[j]
    expected = (linreg["L"] + X * (g @ d1) + Y * (g @ d2)
                + 0.5 * (X ** 2 * (d1 @ H @ d1) + 2 * X * Y * (d1 @ H @ d2) + Y ** 2 * (d2 @ H @ d2)))
    np.testing.assert_allclose(t["train"]["loss"], expected, rtol=RTOL_F64, atol=0)
    assert not np.allclose(t["train"]["loss"][:, :4], expected.T[:4, :])   # a transposed grid would fail
    payload = json.loads(r.stdout)
    assert np.array(payload["loss"]).shape == (4, 7) and len(payload["x"]) == 7 and len(payload["y"]) == 4
    assert set(payload["splits"]) == {"train", "test"} and payload["complete"]
    np.testing.assert_allclose(np.array(payload["loss"]), expected, rtol=RTOL_F64, atol=0)


def test_hessian_directions_give_the_eigenvalue_parabolas(linreg, tmp_path):
    vals, vecs = np.linalg.eigh(linreg["H"])
    vals, vecs = vals[::-1], vecs[:, ::-1]
    hf = tmp_path / "hess.h5"
    with h5py.File(hf, "w") as f:
        grp = f.create_group("hessian")
        grp["eigenvalues"], grp["eigenvectors"] = vals[:3], vecs[:, :3].T
        grp.attrs["layout"] = json.dumps(linreg["layout"].to_attrs())
    out = tmp_path / "r.h5"
    run_cli(linreg["ckpt"], "--2d", "--directions", "hessian", "--hessian-from", hf, "--dtype", "float64",
            "--grid", "5,3", "-o", out)
    t = tree(out, "hessian-2d")
    X, Y = np.meshgrid(t["x"], t["y"])
    v1, v2 = vecs[:, 0], vecs[:, 1]
    expected = linreg["L"] + X * (linreg["g"] @ v1) + Y * (linreg["g"] @ v2) + 0.5 * (vals[0] * X ** 2 + vals[1] * Y ** 2)
    np.testing.assert_allclose(t["train"]["loss"], expected, rtol=RTOL_F64, atol=0)
    assert json.loads(t["summary"])["eigenvalue_1"] == pytest.approx(vals[0], rel=1e-15)
    # a file whose layout differs names the first mismatch
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        grp = f.create_group("hessian")
        grp["eigenvalues"], grp["eigenvectors"] = vals[:2], vecs[:, :2].T
        grp.attrs["layout"] = json.dumps({"names": ["weight", "bias"], "shapes": [[1, 4], [2]]})
    r = CliRunner().invoke(main, ["landscape", str(linreg["ckpt"]), "--directions", "hessian", "--hessian-from", str(bad)])
    assert "'weight' has shape [1, 4] there but [1, 5] here" in one_error_line(r)
    r = CliRunner().invoke(main, ["landscape", str(linreg["ckpt"]), "--directions", "hessian",
                                  "--hessian-from", str(tmp_path / "none.h5")])
    assert "flatscope hessian" in one_error_line(r) and "--save-eigenvectors" in r.stderr


def test_hessian_directions_are_computed_when_none_are_stored(linreg, tmp_path):
    vals = np.linalg.eigvalsh(linreg["H"])[::-1]
    out = tmp_path / "r.h5"
    run_cli(linreg["ckpt"], "--2d", "--directions", "hessian", "--dtype", "float64", "--grid", "5,3", "-o", out)
    t = tree(out, "hessian-2d")
    V = t["directions"]["vectors"]
    H = linreg["H"]
    for i in range(2):  # Lanczos converged eigenpairs: residual below its tolerance 1e-5 * lambda_max
        lam = V[i] @ H @ V[i]
        assert lam == pytest.approx(vals[i], rel=1e-8)
        assert np.linalg.norm(H @ V[i] - lam * V[i]) <= 1e-5 * vals[0]
    X, Y = np.meshgrid(t["x"], t["y"])
    d1, d2 = V
    expected = (linreg["L"] + X * (linreg["g"] @ d1) + Y * (linreg["g"] @ d2)
                + 0.5 * (X ** 2 * (d1 @ H @ d1) + 2 * X * Y * (d1 @ H @ d2) + Y ** 2 * (d2 @ H @ d2)))
    np.testing.assert_allclose(t["train"]["loss"], expected, rtol=RTOL_F64, atol=0)


# ------------------------------------------------------------------------------ interpolation
def test_interpolation_endpoints_are_the_checkpoints_own_losses(mlp_pair, tmp_path):
    out = tmp_path / "r.h5"
    r = run_cli(mlp_pair / "a.pt", mlp_pair / "b.pt", "--range", "-0.5:1.5", "--grid", "9", "--split", "both",
                "--max-samples", "300", "-o", out, "--json")
    t = tree(out, "interp")
    assert t["x"][2] == 0.0 and t["x"][6] == 1.0
    for split in ("train", "test"):
        for i, name in ((2, "a"), (6, "b")):
            loss, acc = own_loss(mlp_pair / f"{name}.pt", split, 300)
            assert t[split]["loss"][i] == pytest.approx(loss, rel=1e-6, abs=0)   # float32 rounding of the sum
            assert t[split]["accuracy"][i] == acc
    s = json.loads(r.stdout)["summary"]
    x, L = t["x"][2:7], t["train"]["loss"][2:7]
    assert s["train_barrier"] == pytest.approx(np.max(L - ((1 - x) * L[0] + x * L[-1])), rel=1e-12, abs=1e-15)
    assert json.loads(r.stdout)["anchors"]["labels"] == ["a", "b"]
    # three checkpoints: the plane through them, each corner its own checkpoint
    out3 = tmp_path / "r3.h5"
    run_cli(mlp_pair / "a.pt", mlp_pair / "b.pt", mlp_pair / "c.pt", "--range", "0:1", "--grid", "2",
            "--max-samples", "300", "--batching", "loop", "-o", out3)
    t = tree(out3, "interp-2d")
    L = t["train"]["loss"]
    for (j, i), name in (((0, 0), "a"), ((0, 1), "b"), ((1, 0), "c")):
        assert L[j, i] == own_loss(mlp_pair / f"{name}.pt", "train", 300)[0]   # loop: bit for bit


def test_interpolation_with_batchnorm_interpolates_running_statistics(tmp_path):
    ck = load_checkpoint(str(SAMPLES / "resnet-sgd.pt"))
    m = ck.model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * p.abs().mean() * torch.randn(p.shape, generator=g))
        for name, b in m.named_buffers():
            if "running_mean" in name:
                b.add_(0.5)
    save_checkpoint(str(tmp_path / "b.pt"), m, ck.model_spec, ck.data_spec, ck.loss, {})
    out = tmp_path / "r.h5"
    run_cli(SAMPLES / "resnet-sgd.pt", tmp_path / "b.pt", "--range", "0:1", "--grid", "3", "--max-samples", "64",
            "-o", out)
    t = tree(out, "interp")
    assert t["train"]["loss"][0] == own_loss(SAMPLES / "resnet-sgd.pt", "train", 64)[0]
    assert t["train"]["loss"][2] == own_loss(tmp_path / "b.pt", "train", 64)[0]


# ------------------------------------------------------------------------------ resume
@contextlib.contextmanager
def _patched_progress(monkeypatch, stop_after=None):
    log = {"totals": [], "advanced": 0}

    @contextlib.contextmanager
    def progress(self, total, description):
        log["totals"].append(total)
        calls = {"n": 0}

        def advance(n=1):
            calls["n"] += 1
            log["advanced"] += n
            if stop_after is not None and calls["n"] == stop_after:
                raise KeyboardInterrupt
        yield advance

    with monkeypatch.context() as mp:
        mp.setattr(common.Run, "progress", progress)
        yield log


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_resume_after_interrupt_equals_an_uninterrupted_run(monkeypatch, tmp_path, batching):
    args = [SAMPLES / "mlp-sgd.pt", "--2d", "--grid", "9,7", "--split", "both", "--batching", batching,
            "--points-per-call", "4", "--flush-every", "0", "--max-samples", "200"]
    full = tmp_path / "full.h5"
    run_cli(*args, "-o", full)
    part = tmp_path / "part.h5"
    with _patched_progress(monkeypatch, stop_after=5) as log:
        r = run_cli(*args, "-o", part, expect=130)
    assert "--resume" in r.stderr
    done_points = 5 * 4
    t = tree(part, "random-2d")
    assert t["done"].sum() == done_points and log["advanced"] == done_points
    assert np.isnan(t["train"]["loss"][~t["done"]]).all()
    with _patched_progress(monkeypatch) as log:
        run_cli(*args, "--resume", "-o", part)
    assert log["totals"] == [63 - done_points] and log["advanced"] == 63 - done_points   # nothing recomputed
    a, b = tree(full, "random-2d"), tree(part, "random-2d")
    assert b["done"].all()
    for split in ("train", "test"):
        for key in ("loss", "accuracy"):
            assert np.array_equal(a[split][key], b[split][key])
    assert np.array_equal(a["directions"]["vectors"], b["directions"]["vectors"])
    # resuming a finished run recomputes nothing; changing an option is refused
    with _patched_progress(monkeypatch) as log:
        run_cli(*args, "--resume", "-o", part)
    assert log["advanced"] == 0
    before = sha(part)
    r = CliRunner().invoke(main, ["landscape", *map(str, args), "--grid", "9,5", "--resume", "-o", str(part)])
    assert "option 'grid'" in one_error_line(r) and sha(part) == before


# ------------------------------------------------------------------------------ the model is never modified
def test_model_and_checkpoint_are_not_modified(tmp_path):
    ck = load_checkpoint(str(SAMPLES / "resnet-sgd.pt"))
    before = {k: v.clone() for k, v in ck.model.state_dict().items()}
    X, y = subsample(*load_data(ck.data_spec).split("train"), 64, 0)
    obj = Objective(ck.model, X, y, loss=ck.loss)
    w0 = obj.w0.clone()
    dirs = random_directions(obj.w0, obj.layout, 1, torch.Generator().manual_seed(0))
    res = LandscapeResult("t", dirs, Grid(axis(-1, 1, 3)), ["train"])
    compute(res, {"train": obj}, bn="recompute", bn_inputs=X)
    compute(LandscapeResult("t", dirs, Grid(axis(-1, 1, 3)), ["train"]), {"train": obj}, batching="vmap")
    assert all(torch.equal(before[k], v) for k, v in ck.model.state_dict().items())
    assert torch.equal(obj.w0, w0) and all(torch.equal(obj.buffers[k], before[k]) for k in obj.buffers)
    digest = sha(SAMPLES / "mlp-sgd.pt")
    run_cli(SAMPLES / "mlp-sgd.pt", "--grid", "3", "-o", tmp_path / "r.h5")
    assert sha(SAMPLES / "mlp-sgd.pt") == digest


@pytest.mark.parametrize("ckpt", ["mlp-sgd.pt", "cnn-sgd.pt", "resnet-sgd.pt"])
def test_point_evaluator_equals_objective_evaluate_bit_for_bit(ckpt):
    ck = load_checkpoint(str(SAMPLES / ckpt))
    X, y = subsample(*load_data(ck.data_spec).split("train"), 100, 0)
    obj = Objective(ck.model, X, y, loss=ck.loss, batch_size=32)      # unequal batches: 32, 32, 32, 4
    ev = PointEvaluator(obj)
    W = obj.w0 + 0.05 * torch.randn(3, obj.dim, generator=torch.Generator().manual_seed(0))
    bufs = obj.recompute_bn(W[1], X) if obj.has_batchnorm() else None
    for w, b in ((W[0], None), (W[1], bufs), (W[2], None), (obj.w0, None)):
        assert ev(w, b) == obj.evaluate(w, b)
    assert ev(obj.w0) == obj.evaluate()


def test_bn_recompute_is_centered_and_differs_from_eval(tmp_path):
    out = tmp_path / "r.h5"
    base = [SAMPLES / "resnet-sgd.pt", "--grid", "3", "--max-samples", "64", "-o", out]
    run_cli(*base, "--bn", "recompute", "--name", "rec")
    run_cli(*base, "--name", "eval")
    rec, ev = tree(out, "rec"), tree(out, "eval")
    assert rec["train"]["loss"][1] == rec["train"]["plain_loss"]          # centre = plain loss with fresh stats
    assert rec["train"]["plain_loss"] != ev["train"]["plain_loss"]
    assert json.loads(rec["options"])["batching"] == "loop"
    r = CliRunner().invoke(main, ["landscape", *map(str, base), "--bn", "recompute", "--batching", "vmap"])
    assert "--bn recompute" in one_error_line(r)


def test_auto_batching_rule():
    for name, full in (("mlp", "loop"), ("cnn", "loop"), ("resnet", "loop")):
        ck = load_checkpoint(str(SAMPLES / f"{name}-sgd.pt"))
        X, y = load_data(ck.data_spec).split("train")
        assert choose_batching(Objective(ck.model, X, y, batch_size=2048)) == full           # 1347 samples/forward
        small = Objective(ck.model, X, y, batch_size=VMAP_MAX_SAMPLES)
        assert choose_batching(small) == "vmap" and default_points_per_call(small, "vmap") == 32
        assert choose_batching(Objective(ck.model, X, y, batch_size=256)) == "loop"
        assert default_points_per_call(Objective(ck.model, X, y, batch_size=64), "vmap") == 32
        assert choose_batching(small, "loop") == "loop"
        assert choose_batching(small, per_point_buffers=True) == "loop"


# ------------------------------------------------------------------------------ directions-from, PCA, plots
def test_directions_from_reuses_the_plane(mlp_pair, tmp_path):
    out = tmp_path / "a.h5"
    run_cli(mlp_pair / "a.pt", "--2d", "--grid", "5,3", "--range", "-1:1,-0.5:0.5", "--max-samples", "200", "-o", out)
    again = tmp_path / "again.h5"
    run_cli(mlp_pair / "a.pt", "--directions-from", out, "--max-samples", "200", "-o", again)
    t0, t1 = tree(out, "random-2d"), tree(again, "random-2d")
    assert np.array_equal(t0["x"], t1["x"]) and np.array_equal(t0["y"], t1["y"])
    assert np.array_equal(t0["train"]["loss"], t1["train"]["loss"])
    other = tmp_path / "b.h5"
    run_cli(mlp_pair / "b.pt", "--directions-from", f"{out}:random-2d", "--max-samples", "200", "-o", other)
    assert tree(other, "random-2d")["train"]["loss"][1, 2] == own_loss(mlp_pair / "b.pt", "train", 200)[0]
    before = sha(other)
    r = CliRunner().invoke(main, ["landscape", str(SAMPLES / "cnn-sgd.pt"), "--directions-from", str(out),
                                  "-o", str(other), "--allow-mixed"])
    assert "parameter 0 is 'net.0.weight' there but 'features.0.weight' here" in one_error_line(r)
    assert sha(other) == before


def test_pca_of_a_training_trajectory_and_its_bad_inputs(tmp_path):
    ck = tmp_path / "run.pt"
    r = CliRunner().invoke(main, ["train", "--model", "mlp", "--model-kwargs", '{"widths": [8]}', "--epochs", "4",
                                  "--save-every", "1", "--threads", "1", "-q", "-o", str(ck)])
    assert r.exit_code == 0, r.stderr
    files = sorted(os.listdir(tmp_path / "run-traj"))
    assert files[0] == "epoch-0000.pt" and files[-1].endswith("-final.pt") and len(files) == 5
    r = run_cli(ck, "--directions", "pca", "--grid", "5", "-o", tmp_path / "r.h5", "--json")
    p = json.loads(r.stdout)
    assert p["name"] == "pca-2d" and len(p["path"]["x"]) == 5 and np.array(p["loss"]).shape == (5, 5)
    assert p["path"]["x"][-1] == 0 and p["path"]["y"][-1] == 0                     # the final point is w
    assert p["path"]["epoch"] == [0, 1, 2, 3, 4]
    ev = p["direction_info"]["explained_variance_ratio"]
    assert 0 < ev[1] <= ev[0] and sum(ev) <= 1 + 1e-12
    # bad inputs: fewer than 3 checkpoints, another architecture
    few = tmp_path / "few"
    few.mkdir()
    for f in files[:2]:
        shutil.copy(tmp_path / "run-traj" / f, few / f)
    r = CliRunner().invoke(main, ["landscape", str(ck), "--directions", "pca", "--trajectory", str(few)])
    assert "at least 3 trajectory checkpoints, found 2" in one_error_line(r)
    shutil.copy(SAMPLES / "cnn-sgd.pt", few / "epoch-0009.pt")
    r = CliRunner().invoke(main, ["landscape", str(ck), "--directions", "pca", "--trajectory", str(few)])
    assert "another architecture" in one_error_line(r)
    shutil.copy(SAMPLES / "mlp-sgd.pt", few / "epoch-0009.pt")   # an MLP of other widths
    r = CliRunner().invoke(main, ["landscape", str(ck), "--directions", "pca", "--trajectory", str(few)])
    assert "has shape [64, 64] there but [8, 64] here (another architecture)" in one_error_line(r)


def test_plots_and_vtp_export(mlp_pair, tmp_path):
    out = tmp_path / "r.h5"
    r = CliRunner().invoke(main, ["landscape", str(mlp_pair / "a.pt"), "--2d", "--grid", "5,4", "--max-samples", "100",
                                  "--threads", "1", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    plots = json.loads(r.stdout)["plots"]
    assert {Path(p).name.split(".")[-2] for p in plots} >= {"contour", "surface"}
    vtp = next(p for p in plots if p.endswith(".vtp"))
    piece = ET.parse(vtp).getroot().find("PolyData/Piece")
    assert piece.get("NumberOfPoints") == "20" and piece.get("NumberOfPolys") == "12"
    pts = np.array(piece.find("Points/DataArray").text.split(), dtype=float).reshape(-1, 3)
    t = tree(out, "random-2d")
    np.testing.assert_allclose(pts[:, 2], t["train"]["loss"].ravel(), rtol=1e-8)
    np.testing.assert_allclose(pts[:, 0], np.tile(t["x"], 4))
    conn = np.array(piece.find("Polys/DataArray[@Name='connectivity']").text.split(), dtype=int)
    assert conn.size == 48 and conn.max() == 19
    with h5py.File(out, "r") as f:     # `flatscope show` sees exactly one analysis group
        assert [n for n, _ in find_analyses(f)] == ["landscape/random-2d"]
    # 1-D overlay of two files
    for name in ("a", "b"):
        run_cli(mlp_pair / f"{name}.pt", "--grid", "5", "--max-samples", "100", "-o", tmp_path / f"{name}.h5")
    r = CliRunner().invoke(main, ["plot", str(tmp_path / "a.h5"), str(tmp_path / "b.h5"), "--outdir", str(tmp_path)])
    assert r.exit_code == 0 and (tmp_path / "overlay.landscape-random-1d.curve.png").exists()


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("args, message", [
    (["--range", "1:-1"], "--range 1:-1: the minimum 1 must be less than the maximum -1"),
    (["--range", "0:0"], "must be less than"),
    (["--grid", "1"], "--grid 1: each axis needs at least 2 points"),
    (["--2d", "--grid", "5,1"], "at least 2 points"),
    (["--directions", "interp"], "needs 2 checkpoints"),
    (["--resume", "--name", "nothing"], "nothing"),
    (["--name", "a/b"], "--name"),
])
def test_bad_input_is_one_error_line(tmp_path, args, message):
    out = tmp_path / "r.h5"
    run_cli(SAMPLES / "mlp-sgd.pt", "--grid", "3", "--max-samples", "50", "-o", out)
    before = sha(out)
    r = CliRunner().invoke(main, ["landscape", str(SAMPLES / "mlp-sgd.pt"), *args, "-o", str(out)])
    assert message in one_error_line(r)
    assert sha(out) == before


def test_too_many_checkpoints_and_mismatched_interpolation(tmp_path):
    p = str(SAMPLES / "mlp-sgd.pt")
    r = CliRunner().invoke(main, ["landscape", p, p, p, p])
    assert "1 to 3 checkpoints" in one_error_line(r)
    r = CliRunner().invoke(main, ["landscape", p, str(SAMPLES / "cnn-sgd.pt"), "-o", str(tmp_path / "r.h5")])
    assert "checkpoint" in one_error_line(r) and not (tmp_path / "r.h5").exists()
