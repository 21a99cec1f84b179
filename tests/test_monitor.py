"""CurvatureMonitor and ``flatscope train --track``: every measure against an exact answer, warm starts,
the untouched trajectory, the /track group (appendable, atomic), plot/show/audit reading it, the
Lightning and Hugging Face adapters, and each bad input."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from flatscope.checkpoint import load_checkpoint, save_checkpoint
from flatscope.cli import main
from flatscope.data import load_data
from flatscope.errors import FlatscopeError
from flatscope.models import build_model
from flatscope.monitor import (
    MEASURES,
    CurvatureMonitor,
    Measure,
    append_row,
    dense_early,
    read_track,
    register_measure,
    stability_threshold,
)
from flatscope.objective import Objective, exact_hessian

torch.set_num_threads(1)
SMALL = ["--model-kwargs", '{"widths": [16]}', "--threads", "1", "--batch-size", "128"]


@pytest.fixture(scope="module")
def digits():
    return load_data({"name": "digits", "kwargs": {}})


def mlp(data, widths=(16,), seed=0, **kw):
    torch.manual_seed(seed)
    return build_model({"name": "mlp", "kwargs": {"in_features": data.in_features, "out_features": data.n_outputs,
                                                  "widths": list(widths), **kw}})


def sgd_steps(model, data, opt, n, seed=0, batch=64):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(0, data.X_train.shape[0], (batch,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data.X_train[idx]), data.y_train[idx]).backward()
        opt.step()
        yield


def cli(*args):
    return CliRunner().invoke(main, [*map(str, args)])


def one_error_line(r):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), r.stderr
    return lines[0]


# ------------------------------------------------------------------ exact answers

def _quadratic(n=60, d=4, seed=0):
    """Linear regression with MSE: L(w) = mean((Xw + b - y)^2), H = 2/n [X 1]^T [X 1], constant in w."""
    rng = np.random.default_rng(seed)
    X = torch.tensor(rng.standard_normal((n, d)) * [1.0, 2.0, 0.5, 3.0][:d], dtype=torch.float64)
    y = torch.tensor(rng.standard_normal(n), dtype=torch.float64)
    Xa = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)
    H = 2.0 / n * Xa.T @ Xa
    torch.manual_seed(seed)
    model = torch.nn.Linear(d, 1).double()
    return model, X, y, float(torch.linalg.eigvalsh(H)[-1])


def _gd(model, X, y, lr, steps, mon=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        if mon is not None:
            mon.step(step, lr=lr, optimizer=opt)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X).squeeze(-1), y)
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
    return losses


def test_quadratic_gd_lambda_max_is_the_closed_form_at_every_step():
    model, X, y, lam = _quadratic()
    lr = 1.0 / lam                                  # stable: lambda * lr = 1 < 2
    mon = CurvatureMonitor(model, "mse", (X, y), every=5, samples=None, measures=["lambda_max"], tol=1e-8)
    losses = _gd(model, X, y, lr, 30, mon)
    assert losses[-1] < losses[0]
    col = mon.columns()
    assert len(col["step"]) == 6 and list(col["step"]) == [0, 5, 10, 15, 20, 25]
    err = col["lambda_max_residual"] + 1e-10 * lam   # |theta - lambda| <= ||H v - theta v||
    assert np.all(np.abs(col["lambda_max"] - lam) <= err), (col["lambda_max"], lam)
    assert np.all(col["two_over_lr"] == pytest.approx(2 * lam))
    assert np.all(col["lambda_max"] * col["lr"] < 2)


def test_quadratic_gd_beyond_two_over_eta_diverges_and_the_first_row_shows_it():
    model, X, y, lam = _quadratic()
    lr = 2.2 / lam
    mon = CurvatureMonitor(model, "mse", (X, y), every=10, samples=None, measures=["lambda_max"], tol=1e-8)
    losses = _gd(model, X, y, lr, 41, mon)
    assert losses[-1] > 1e3 * losses[0]            # |1 - lr lambda| = 1.2 > 1 along the top direction
    first = mon.rows[0]
    assert first["step"] == 0 and first["lambda_max"] * first["lr"] > 2
    assert first["lambda_max"] > first["two_over_lr"] == first["threshold"]
    assert abs(first["lambda_max"] - lam) <= first["lambda_max_residual"] + 1e-10 * lam


def test_every_measure_against_the_dense_hessian():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    X = torch.randn(50, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (50,))
    dim = sum(p.numel() for p in model.parameters())
    mon = CurvatureMonitor(model, "ce", (X, y), every=1, samples=None, tol=1e-9,
                           measures=["lambda_max:3", "lambda_min", f"trace:{dim}", "grad_norm", "local_energy:0.1"])
    row = mon.measure(0)
    obj = Objective(model, X, y, loss="ce", dtype=torch.float64)
    ev = torch.linalg.eigvalsh(exact_hessian(obj))
    for i, name in enumerate(["lambda_max", "lambda_2", "lambda_3"]):
        assert abs(row[name] - float(ev[-1 - i])) <= row[f"{name}_residual"] + 1e-9 * float(ev.abs().max())
    assert abs(row["lambda_min"] - float(ev[0])) <= row["lambda_min_residual"] + 1e-9 * float(ev.abs().max())
    assert row["trace"] == pytest.approx(float(ev.sum()), rel=1e-9) and row["trace_stderr"] == 0
    assert row["grad_norm"] == pytest.approx(float(torch.linalg.norm(obj.grad())), rel=1e-12)
    from flatscope.analyses.local_energy import local_energy
    le = local_energy(obj, [0.1], samples=16, seed=0).curves["train"]
    assert row["local_energy_0p1"] == pytest.approx(float(le.delta_loss_mean[0]), rel=1e-9, abs=1e-15)
    assert row["local_energy_0p1_stderr"] == pytest.approx(float(le.delta_loss_sem[0]), rel=1e-9)
    assert row["loss"] == pytest.approx(obj.loss(), rel=1e-12)
    assert row["hvps"] == row["lambda_max_hvps"] + row["lambda_min_hvps"] + row["trace_hvps"]


def test_adam_preconditioned_sharpness_equals_the_dense_closed_form():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    X = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (40,))
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    mon = CurvatureMonitor(model, "ce", (X, y), every=1, samples=None, tol=1e-9, optimizer=opt,
                           measures=["lambda_max", "pre_lambda_max"])
    assert math.isnan(mon.measure(0, lr=0.01, optimizer=opt)["pre_lambda_max"])   # no state before a step
    for _ in range(7):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    row = mon.measure(7, lr=0.01, optimizer=opt)
    obj = Objective(model, X, y, loss="ce", dtype=torch.float64)
    H = exact_hessian(obj)
    P = []
    for p in model.parameters():           # P = (1 - b1^t)(sqrt(v / (1 - b2^t)) + eps), in layout order
        st = opt.state[p]
        t = float(st["step"])
        P.append(((1 - 0.8 ** t) * ((st["exp_avg_sq"] / (1 - 0.99 ** t)).sqrt() + 1e-6)).reshape(-1))
    Pinv = torch.cat(P).reciprocal()
    ref = float(torch.linalg.eigvals(Pinv[:, None] * H).real.max())     # lambda_max(P^-1 H)
    scale = float(Pinv.max() * torch.linalg.eigvalsh(H).abs().max())
    assert abs(row["pre_lambda_max"] - ref) <= row["pre_lambda_max_residual"] + 1e-7 * scale
    assert row["threshold"] == pytest.approx((2 + 2 * 0.8) / ((1 - 0.8) * 0.01))


def test_stability_thresholds():
    assert stability_threshold(0.1) == pytest.approx(20)
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    assert stability_threshold(0.1, sgd) == pytest.approx(38)
    nesterov = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9, nesterov=True)
    assert stability_threshold(0.1, nesterov) == pytest.approx(3.8 / 0.28)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_threshold_is_where_torch_sgd_turns_unstable_on_a_quadratic(nesterov):
    def grows(lam):
        x = torch.ones(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD([x], lr=0.1, momentum=0.9, nesterov=nesterov)
        for _ in range(1000):
            opt.zero_grad()
            (0.5 * lam * x ** 2).sum().backward()
            opt.step()
        return float(x.detach().abs()) > 1
    thr = stability_threshold(0.1, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9,
                                                   nesterov=nesterov))
    assert not grows(0.99 * thr) and grows(1.01 * thr)
    adam = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.1)
    assert stability_threshold(0.1, adam) == pytest.approx(20)
    assert stability_threshold(0.1, adam, preconditioned=True) == pytest.approx(380)
    assert math.isnan(stability_threshold(None))


def test_lambda_max_equals_flatscope_hessian_on_each_saved_checkpoint(tmp_path, digits):
    model = mlp(digits)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = CurvatureMonitor(model, "ce", digits, every=15, samples=300, seed=3, measures=["lambda_max"], tol=1e-6)
    saved = []
    for step, _ in enumerate(sgd_steps(model, digits, opt, 31)):
        if mon.step(step, lr=0.1) is not None:
            path = tmp_path / f"step{step}.pt"
            save_checkpoint(str(path), model, {"name": "mlp", "kwargs": {"in_features": 64, "out_features": 10,
                                                                          "widths": [16]}},
                            {"name": "digits", "kwargs": {}}, "ce", {})
            saved.append(path)
    assert len(saved) == 3
    for row, path in zip(mon.rows, saved):
        r = cli("hessian", path, "--top", "1", "--no-density", "--trace-probes", "2", "--tol", "1e-6",
                "--max-samples", 300, "--seed", 3, "--threads", 1, "--json", "--no-plot",
                "-o", tmp_path / f"h-{path.stem}.h5")
        assert r.exit_code == 0, r.output
        h = json.loads(r.stdout)
        bound = row["lambda_max_residual"] + h["residuals"][0] + 1e-5 * abs(h["lambda_max"])   # float32 products
        assert abs(row["lambda_max"] - h["lambda_max"]) <= bound, (row, h["lambda_max"], h["residuals"])


# ------------------------------------------------------------------ warm starts, schedules

def test_warm_start_uses_fewer_products_than_a_cold_start(digits):
    model = mlp(digits, widths=(32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    warm = CurvatureMonitor(model, "ce", digits, every=5, samples=256, measures=["lambda_max"], tol=1e-5)
    cold = CurvatureMonitor(model, "ce", digits, every=5, samples=256, measures=["lambda_max"], tol=1e-5,
                            warm_start=False)
    for step, _ in enumerate(sgd_steps(model, digits, opt, 51)):
        warm.step(step)
        cold.step(step)
    w, c = warm.columns(), cold.columns()
    assert w["lambda_max_hvps"][0] == c["lambda_max_hvps"][0]        # the first call has nothing to start from
    assert w["lambda_max_hvps"][1:].sum() < 0.8 * c["lambda_max_hvps"][1:].sum(), (w["lambda_max_hvps"],
                                                                                  c["lambda_max_hvps"])
    assert np.all(np.abs(w["lambda_max"] - c["lambda_max"]) <= w["lambda_max_residual"] + c["lambda_max_residual"]
                  + 1e-5 * np.abs(c["lambda_max"]))


def test_schedules():
    due = dense_early(50, dense_every=5, dense_until=100)
    assert [s for s in range(301) if due(s)] == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80,
                                                 85, 90, 95, 100, 150, 200, 250, 300]
    model, X, y, _ = _quadratic()
    mon = CurvatureMonitor(model, "mse", (X, y), schedule=[3, 7], samples=None, measures=["grad_norm"])
    assert [s for s in range(10) if mon.step(s) is not None] == [3, 7]
    assert mon.step(4, force=True)["step"] == 4


# ------------------------------------------------------------------ the trajectory is untouched

def test_tracking_leaves_a_dropout_batchnorm_loop_bit_identical(digits):
    def run(track: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                    torch.nn.Dropout(0.3), torch.nn.Linear(16, 10))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        mon = CurvatureMonitor(model, "ce", digits, every=4, samples=128, optimizer=opt,
                               measures=["lambda_max", "trace:6", "local_energy:0.05", "pre_lambda_max"])
        model.train()
        for step, _ in enumerate(sgd_steps(model, digits, opt, 13)):
            if track:
                mon.step(step, lr=1e-2, optimizer=opt)
        assert model.training
        return model.state_dict(), opt.state_dict(), torch.get_rng_state(), len(mon.rows)

    a, b = run(False), run(True)
    assert a[3] == 0 and b[3] == 4
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    for sa, sb in zip(a[1]["state"].values(), b[1]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a[2], b[2])


@pytest.mark.parametrize("opt, extra", [("sgd", []), ("rsgd", ["--replicas", "2"]), ("sam", []),
                                        ("esgd", ["--inner-steps", "3"]), ("adam", [])])
def test_train_track_leaves_the_weights_bit_identical(tmp_path, opt, extra):
    plain, tracked = tmp_path / "a.pt", tmp_path / "b.pt"
    log = tmp_path / "t.h5"
    r = cli("train", *SMALL, "--opt", opt, *extra, "--budget", 24, "-o", plain)
    assert r.exit_code == 0, r.output
    r = cli("train", *SMALL, "--opt", opt, *extra, "--budget", 24, "--track", "lambda_max,grad_norm",
            "--track-every", 4, "--track-samples", 100, "--json", "-o", tracked, "--log", log)
    assert r.exit_code == 0, r.output
    sa, sb = load_checkpoint(str(plain)).model.state_dict(), load_checkpoint(str(tracked)).model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    payload = json.loads(r.stdout)
    k = load_checkpoint(str(tracked)).train["evals_per_step"]
    steps = 24 // k
    assert payload["grad_evals"] == 24                        # tracking is charged nothing
    tr = payload["tracking"]
    assert tr["rows"] == steps // 4 + 1 and tr["hvps"] > 0 and tr["cost_s"] > 0
    col = read_track(str(log))
    assert list(col["step"]) == list(range(0, steps + 1, 4))
    assert np.all(np.isfinite(col["lambda_max"])) and np.all(col["lambda_max_converged"] == 1)
    lr = load_checkpoint(str(tracked)).train["hparams"]["lr"]
    assert np.all(col["two_over_lr"] == pytest.approx(2 / lr))


def test_train_track_resume_appends_rows(tmp_path):
    a, b, log = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "t.h5"
    assert cli("train", *SMALL, "--budget", 10, "--track", "grad_norm", "--track-every", 5, "-o", a,
               "--log", log).exit_code == 0
    r = cli("train", "--threads", 1, "--resume", a, "--budget", 20, "--track", "grad_norm", "--track-every", 5, "-o", b,
            "--log", log)
    assert r.exit_code == 0, r.output
    assert list(read_track(str(log))["step"]) == [0, 5, 10, 15, 20]


# ------------------------------------------------------------------ the /track group

def test_track_group_is_appendable_and_readable(tmp_path, digits):
    log = tmp_path / "run.h5"
    model = mlp(digits)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = CurvatureMonitor(model, "ce", digits, every=5, samples=128, measures=["lambda_max", "trace:6"], log=str(log))
    for step, _ in enumerate(sgd_steps(model, digits, opt, 11)):
        mon.step(step, lr=0.1, optimizer=opt, batch_loss=1.0 + step)
    col = read_track(str(log))
    mine = mon.columns()
    assert col.keys() == mine.keys()
    for k in col:
        assert np.array_equal(np.asarray(col[k], dtype=np.float64), mine[k], equal_nan=True), k
    with h5py.File(log, "r") as f:
        g = f["track"]
        assert g.attrs["kind"] == "track"
        s = json.loads(g.attrs["summary"])
        opts = json.loads(g.attrs["options"])
    assert s["rows"] == 3 and s["last_step"] == 10 and s["lambda_max_last"] == pytest.approx(mine["lambda_max"][-1])
    assert s["lambda_max_max"] == pytest.approx(mine["lambda_max"].max())
    assert s["hvps_total"] == pytest.approx(mine["hvps"].sum())
    assert s["lambda_max_lr_last"] == pytest.approx(mine["lambda_max"][-1] * 0.1)
    assert opts["measures"] == ["lambda_max", "trace"] and opts["n_eval"] == 128
    assert list(col["batch_loss"]) == [1.0, 6.0, 11.0]
    # a new monitor on the same log starts a fresh track; resume=True appends
    CurvatureMonitor(model, "ce", digits, every=1, samples=16, measures=["grad_norm"], log=str(log)).measure(99)
    assert list(read_track(str(log))["step"]) == [99]
    CurvatureMonitor(model, "ce", digits, every=1, samples=16, measures=["lambda_min"], log=str(log),
                     resume=True).measure(100)
    col = read_track(str(log))
    assert list(col["step"]) == [99, 100] and np.isnan(col["lambda_min"][0]) and np.isnan(col["grad_norm"][1])


def test_a_killed_write_keeps_every_row_already_written(tmp_path, monkeypatch):
    log = str(tmp_path / "run.h5")
    for s in range(3):
        append_row(log, {"step": s, "lambda_max": float(s)}, fresh=s == 0)
    real = h5py.Dataset.resize

    def crash(self, *a, **k):
        real(self, *a, **k)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(h5py.Dataset, "resize", crash)
    with pytest.raises(KeyboardInterrupt):
        append_row(log, {"step": 3, "lambda_max": 3.0})
    monkeypatch.setattr(h5py.Dataset, "resize", real)
    col = read_track(log)
    assert list(col["step"]) == [0, 1, 2] and list(col["lambda_max"]) == [0.0, 1.0, 2.0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_plot_show_and_audit_read_the_track(tmp_path):
    out, log = tmp_path / "m.pt", tmp_path / "train.h5"
    r = cli("train", *SMALL, "--budget", 22, "--track", "lambda_max,trace:6", "--track-every", 5, "-o", out,
            "--log", log)
    assert r.exit_code == 0, r.output
    r = cli("plot", log)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "train.track.sharpness.png").stat().st_size > 0
    assert (tmp_path / "train.track.measures.png").stat().st_size > 0
    shown = json.loads(cli("show", log, "--json").stdout)
    s = shown["analyses"]["track"]["summary"]
    assert shown["analyses"]["track"]["kind"] == "track" and s["rows"] == 5 and s["last_step"] == 20
    lam = s["lambda_max_last"]
    common = ["audit", out, "-o", log, "--step", "hessian", "--set", "hessian.top=1", "--set", "hessian.density=false",
              "--set", "hessian.trace_probes=2", "--threads", 1, "--json"]
    r = cli(*common, "--fail-if", f"track.lambda_max_last > {lam * 2}")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metrics"]["track.lambda_max_last"] == pytest.approx(lam)
    r = cli(*common, "--fail-if", f"track.lambda_max_last > {lam / 2}")
    assert r.exit_code == 1, r.output
    assert "track.lambda_max_last" in r.stderr
    one_error_line(cli(*common, "--fail-if", "track.lambda_mx_last > 1"))


# ------------------------------------------------------------------ extending the registry

def test_a_new_measure_is_one_registered_class():
    class Half(Measure):
        name = "half_lambda_max"

        def __call__(self, ctx):
            res, _ = ctx.eig(self.key, ctx.hvp, 1, "largest")
            return {"half_lambda_max": float(res.eigenvalues[0]) / 2}

    register_measure(Half)
    try:
        model, X, y, lam = _quadratic()
        row = CurvatureMonitor(model, "mse", (X, y), samples=None, measures=["half_lambda_max"], tol=1e-9).measure(0)
        assert row["half_lambda_max"] == pytest.approx(lam / 2, rel=1e-7)
    finally:
        MEASURES.pop("half_lambda_max")


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("every", [0, -3, 2.5, True])
def test_bad_every(every):
    model, X, y, _ = _quadratic()
    with pytest.raises(FlatscopeError, match="every"):
        CurvatureMonitor(model, "mse", (X, y), every=every)


@pytest.mark.parametrize("spec, match", [("lambda_maxx", "unknown measure"), ("sharpness:0.05", "not available yet"),
                                         ("local_energy", "noise scale"), ("local_energy:-1", "positive"),
                                         ("lambda_max:0", "at least 1"), ("trace:x", "whole number"),
                                         ("grad_norm:3", "no argument"), ("lambda_max,lambda_max", "twice"), ("", "unknown")])
def test_bad_measures(spec, match):
    model, X, y, _ = _quadratic()
    with pytest.raises(FlatscopeError, match=match):
        CurvatureMonitor(model, "mse", (X, y), measures=spec)


def test_bad_log_and_optimizer(tmp_path):
    model, X, y, _ = _quadratic()
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    for log, match in ((text, "not an HDF5"), (tmp_path / "run.csv", "HDF5"), (tmp_path / "no" / "r.h5", "does not exist")):
        with pytest.raises(FlatscopeError, match=match):
            CurvatureMonitor(model, "mse", (X, y), log=str(log))
    assert text.read_text() == "not hdf5" and not (tmp_path / "run.csv").exists()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FlatscopeError, match="second-moment"):
        CurvatureMonitor(model, "mse", (X, y), measures=["pre_lambda_max"], optimizer=sgd)
    mon = CurvatureMonitor(model, "mse", (X, y), measures=["pre_lambda_max"])
    with pytest.raises(FlatscopeError, match="second-moment"):
        mon.measure(0, lr=0.1, optimizer=sgd)
    with pytest.raises(FlatscopeError, match="needs the optimizer"):
        mon.measure(0)
    with pytest.raises(FlatscopeError, match="unknown loss"):
        CurvatureMonitor(model, "hinge", (X, y))


@pytest.mark.parametrize("args, match", [
    (["--track", "lambda_max", "--track-every", "0"], "--track-every"),
    (["--track", "lambda_maxx"], "unknown measure"),
    (["--track", "pre_lambda_max"], "second moments"),
    (["--track", "lambda_max", "--track-samples", "0"], "--track-samples"),
])
def test_train_track_bad_input_writes_nothing(tmp_path, args, match):
    out, log = tmp_path / "m.pt", tmp_path / "t.h5"
    line = one_error_line(cli("train", *SMALL, "--budget", 4, *args, "-o", out, "--log", log))
    assert match in line
    assert not out.exists() and not log.exists()
    line = one_error_line(cli("train", *SMALL, "--budget", 4, "--track", "lambda_max", "-o", out))
    assert "--log" in line and not out.exists()
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    one_error_line(cli("train", *SMALL, "--budget", 4, "--track", "lambda_max", "-o", out, "--log", notes))
    assert notes.read_text() == "x" and not out.exists()


# ------------------------------------------------------------------ framework adapters

class _HFStyle(torch.nn.Module):
    """Returns logits for ``model(x)`` (what the monitor calls) and ``(loss, logits)`` with labels (the Trainer)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 10)

    def forward(self, x, labels=None):
        out = self.lin(x)
        return out if labels is None else (torch.nn.functional.cross_entropy(out, labels), out)


def test_hf_trainer_callback_drives_the_monitor(tmp_path, digits):
    pytest.importorskip("transformers")
    from transformers import TrainerControl, TrainerState

    from flatscope.integrations.hf_trainer import CurvatureCallback

    torch.manual_seed(0)
    model = _HFStyle()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    cb = CurvatureCallback(loss="ce", data=digits, every=2, samples=64, measures=["lambda_max"],
                           log=str(tmp_path / "hf.h5"))
    state, control = TrainerState(), TrainerControl()
    cb.on_train_begin(None, state, control, model=model, optimizer=opt, lr_scheduler=sched)
    for _ in sgd_steps(model, digits, opt, 5):
        sched.step()
        state.global_step += 1
        cb.on_step_end(None, state, control, model=model, optimizer=opt, lr_scheduler=sched)
        if state.global_step == 4:    # the row equals a fresh cold measurement of the same weights
            ref = CurvatureMonitor(model, "ce", digits, samples=64, measures=["lambda_max"]).measure(4)
            mine = cb.monitor.rows[-1]
            assert abs(mine["lambda_max"] - ref["lambda_max"]) <= (mine["lambda_max_residual"]
                                                                  + ref["lambda_max_residual"] + 1e-5 * ref["lambda_max"])
    col = read_track(str(tmp_path / "hf.h5"))
    assert list(col["step"]) == [0, 2, 4] and list(col["lr"]) == [0.1, 0.1, 0.05]


def test_hf_trainer_end_to_end(tmp_path, digits):
    pytest.importorskip("accelerate")              # transformers' Trainer needs it
    from transformers import Trainer, TrainingArguments

    from flatscope.integrations.hf_trainer import CurvatureCallback

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 256

        def __getitem__(self, i):
            return {"x": digits.X_train[i], "labels": digits.y_train[i]}

    torch.manual_seed(0)
    cb = CurvatureCallback(loss="ce", data=digits, every=2, samples=64, measures=["lambda_max"])
    args = TrainingArguments(output_dir=str(tmp_path / "o"), max_steps=4, per_device_train_batch_size=32,
                             learning_rate=0.05, report_to=[], use_cpu=True, save_strategy="no")
    Trainer(model=_HFStyle(), args=args, train_dataset=DS(), callbacks=[cb]).train()
    assert [r["step"] for r in cb.monitor.rows] == [0, 2, 4]


def test_lightning_callback(tmp_path, digits):
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")
    from flatscope.integrations.lightning import CurvatureCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 10)

        def forward(self, x):
            return self.lin(x)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(digits.X_train[:256], digits.y_train[:256]),
                                         batch_size=32)
    cb = CurvatureCallback(loss="ce", data=digits, every=2, samples=64, measures=["lambda_max"])
    pl.Trainer(max_steps=4, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
               default_root_dir=str(tmp_path), accelerator="cpu").fit(Module(), loader)
    assert [r["step"] for r in cb.monitor.rows] == [0, 2, 4]
    assert all(r["lr"] == 0.1 for r in cb.monitor.rows)
