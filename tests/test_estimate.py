"""--estimate: predicted products against the real runs' counts, one JSON object, nothing written."""

import json
import time

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error
from flatscope import estimate as E
from flatscope.linalg import dense_matvec, lanczos

SMALL = ["--max-samples", "256"]


def _json(result):
    assert result.exit_code == 0, (result.stdout, result.stderr)
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


@pytest.mark.parametrize(
    "args",
    [
        ["hessian", "--top", "3", "--probes", "2", "--steps", "5", "--trace-probes", "6"],
        ["local-energy", "--samples", "2", "--sigma", "0.1,0.2"],
        ["landscape", "--grid", "5"],
        ["sharpness", "--rho", "0.1", "--steps", "2", "--samples", "2"],
        ["local-entropy", "--gamma", "1,10", "--steps", "5", "--burn-in", "1", "--chains", "2"],
    ],
    ids=lambda a: a[0],
)
def test_estimate_json_is_one_object_and_writes_nothing(cli, samples, tmp_path, args):
    out = tmp_path / "r.h5"
    d = _json(cli([args[0], samples / "mlp-sgd.pt", *args[1:], *SMALL, "-o", out, "--estimate", "--json"]))
    assert d["estimate"] is True and d["analysis"] == args[0].replace("-", "_")
    assert d["products"] and all(n > 0 for n in d["products"].values())
    assert d["seconds"] > 0 and d["peak_memory_bytes"] > 0
    assert list(tmp_path.iterdir()) == []  # no results file, no plots
    assert not (samples / "mlp-sgd.flatscope.h5").exists()


def test_estimate_human_table(cli, samples, tmp_path):
    r = cli(["hessian", samples / "mlp-sgd.pt", "--top", "2", *SMALL, "--no-density", "-o", tmp_path / "r.h5", "--estimate"])
    assert r.exit_code == 0, r.stderr
    assert "estimate of hessian" in r.stdout and "predicted:" in r.stdout and "peak memory" in r.stdout
    assert list(tmp_path.iterdir()) == []


def test_estimate_bad_options_still_refused(cli, samples, tmp_path):
    r = cli(["hessian", samples / "mlp-sgd.pt", "--top", "0", "-o", tmp_path / "r.h5", "--estimate", "--json"])
    assert_one_line_error(r, contains="--top")
    assert r.stdout == ""


@pytest.mark.parametrize("name", ["mlp-sgd", "cnn-sgd"])
def test_hessian_hvp_count_within_20_percent(cli, samples, tmp_path, name):
    args = ["hessian", samples / f"{name}.pt", "--top", "10", "--no-density", "--trace-probes", "12", *SMALL]
    est = _json(cli([*args, "-o", tmp_path / "e.h5", "--estimate", "--json"]))
    real = _json(cli([*args, "-o", tmp_path / "r.h5", "--no-plot", "--json"]))
    assert abs(est["products"]["hvp"] - real["n_matvec"]) <= 0.2 * real["n_matvec"], (est["products"], real["n_matvec"])
    top = next(s for s in est["stages"] if s["stage"] == "top")
    assert not top["exact"] and abs(top["count"] - (real["n_matvec"] - 12)) <= 0.2 * (real["n_matvec"] - 12)


def test_lanczos_model_on_a_power_law_quadratic():
    """The model against the real count on lambda_i = 10 / i (a Hessian-like decay), k = 1..20."""
    dim = 400
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    A = (Q * (10.0 / np.arange(1, dim + 1))) @ Q.T
    for k in (1, 2, 5, 10, 20):
        real = lanczos(dense_matvec(A), dim, k, tol=1e-5, seed=0).n_matvec
        assert abs(E.lanczos_products(k, dim) - real) <= 0.2 * real, (k, real)
    # the model respects the budget and the dimension
    assert E.lanczos_products(10, dim, max_iter=20) == 20 + 10
    assert E.lanczos_products(3, 5) == 5 + 3


def test_hessian_exact_stage_counts():
    c = E.hessian_counts(1000, top=4, density=True, probes=3, steps=7, trace_probes=9)
    assert c["density"] == 21 and c["trace"] == 9
    c = E.hessian_counts(5, top=1, probes=3, steps=7, trace_probes=9)  # steps and probes capped at dim
    assert c["density"] == 15 and c["trace"] == 5


class _Counter:
    """Counts full-split evaluations: Objective.evaluate calls and PointEvaluator points."""

    def __init__(self, monkeypatch):
        from flatscope import objective

        self.n = 0
        ev, pe, em = objective.Objective.evaluate, objective.PointEvaluator.__call__, objective.Objective.evaluate_many

        def evaluate(obj, *a, **k):
            self.n += 1
            return ev(obj, *a, **k)

        def point(p, *a, **k):
            self.n += 1
            return pe(p, *a, **k)

        def many(obj, W, *a, **k):
            self.n += W.shape[0]
            return em(obj, W, *a, **k)

        monkeypatch.setattr(objective.Objective, "evaluate", evaluate)
        monkeypatch.setattr(objective.PointEvaluator, "__call__", point)
        monkeypatch.setattr(objective.Objective, "evaluate_many", many)


@pytest.mark.parametrize(
    "args",
    [
        ["local-energy", "--samples", "3", "--sigma", "0.05,0.1,0.3"],
        ["local-energy", "--samples", "2", "--sigma", "0.1,0.2", "--split", "both"],
        ["landscape", "--grid", "7"],
        ["landscape", "--2d", "--grid", "4,3", "--split", "both"],
    ],
    ids=["le", "le-both", "ls-1d", "ls-2d-both"],
)
def test_forward_pass_counts_are_exact(cli, samples, tmp_path, monkeypatch, args):
    est = _json(cli([args[0], samples / "mlp-sgd.pt", *args[1:], *SMALL, "-o", tmp_path / "e.h5", "--estimate", "--json"]))
    counter = _Counter(monkeypatch)
    r = cli([args[0], samples / "mlp-sgd.pt", *args[1:], *SMALL, "-o", tmp_path / "r.h5", "--no-plot", "--json"])
    assert r.exit_code == 0, r.stderr
    assert est["products"]["forward"] == counter.n


def test_bisection_count_model(cli, samples, tmp_path):
    est = _json(
        cli(["local-energy", samples / "mlp-sgd.pt", "--samples", "2", "--sigma", "0.05..1:4", "--target-error", "0.05",
             *SMALL, "-o", tmp_path / "e.h5", "--estimate", "--json"])  # fmt: skip
    )
    real = _json(
        cli(["local-energy", samples / "mlp-sgd.pt", "--samples", "2", "--sigma", "0.05..1:4", "--target-error", "0.05",
             *SMALL, "-o", tmp_path / "r.h5", "--no-plot", "--json"])  # fmt: skip
    )
    bis = next(s for s in est["stages"] if s["stage"] == "bisection")
    assert not bis["exact"]
    assert 0 < real["target"]["evaluations"] <= 60 * 2
    assert 0.5 <= bis["count"] / real["target"]["evaluations"] <= 2, (bis["count"], real["target"]["evaluations"])


def test_bisection_steps():
    # [0, 0.1] from its middle: log2(0.1 / (1e-3 * 0.05)) = 10.97 -> 11; [0.1, 0.2]: log2(0.1 / 1.5e-4) -> 10
    assert E.bisection_steps([0.1, 0.2], rtol=1e-3, max_iter=60) == 11
    assert E.bisection_steps([0.1, 0.2], rtol=1e-3, max_iter=5) == 5


def test_sharpness_gradient_count_is_exact(cli, samples, tmp_path, monkeypatch):
    from flatscope import objective

    args = ["sharpness", samples / "mlp-sgd.pt", "--rho", "0.1,0.2", "--steps", "3", "--restarts", "2", *SMALL]
    est = _json(cli([*args, "--samples", "0", "-o", tmp_path / "e.h5", "--estimate", "--json"]))
    calls = []
    lg = objective.Objective.loss_and_grad
    monkeypatch.setattr(objective.Objective, "loss_and_grad", lambda o, *a, **k: calls.append(1) or lg(o, *a, **k))
    r = cli([*args, "--samples", "0", "-o", tmp_path / "r.h5", "--no-plot", "--json"])
    assert r.exit_code == 0, r.stderr
    assert est["products"]["gradient"] == len(calls)


def test_eta_rule():
    assert E.eta_seconds(10, 0, 0.0, None) is None
    assert E.eta_seconds(10, 0, 0.0, 0.5) == 5.0
    assert E.eta_seconds(10, 5, 2.0, 0.5) == 4.0  # observed speed wins once an item is done


def test_hessian_operator_times_its_products(samples):
    from flatscope.analyses.hessian import HessianOperator
    from flatscope.checkpoint import load_checkpoint
    from flatscope.data import load_data, subsample_source
    from flatscope.objective import Objective

    ck = load_checkpoint(str(samples / "mlp-sgd.pt"))
    obj = Objective(ck.model, data=subsample_source(load_data(ck.data_spec).source("train"), 64, 0), loss=ck.loss)
    op = HessianOperator(obj)
    v = torch.ones(obj.dim)
    op(v)
    assert op.seconds_per_product is None  # the first product (it builds the cache) is not a unit cost
    op(torch.ones(3, obj.dim))
    assert op.seconds_per_product is not None and op.seconds_per_product > 0


def test_bfloat16_on_a_cuda_device_without_it(cli, samples, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    r = cli(["hessian", samples / "mlp-sgd.pt", "--device", "cuda", "--dtype", "bfloat16", "-o", tmp_path / "r.h5"])
    assert_one_line_error(r, contains="bfloat16")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp-sgd", "cnn-sgd"])
def test_estimate_predicts_time_within_2x(samples, tmp_path, name):
    """Timing: the predicted wall time within a factor 2 of the real run's, each in a fresh process on the
    same machine (one-off costs such as torch.func's first transform are paid once per process)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "flatscope", "hessian", str(samples / f"{name}.pt"), "--top", "5", "--probes", "4",
            "--steps", "30", "--trace-probes", "24", "--threads", "1"]  # fmt: skip
    e = subprocess.run([*args, "-o", str(tmp_path / "e.h5"), "--estimate", "--json"], capture_output=True, text=True,
                       env=env, check=True)  # fmt: skip
    est = json.loads(e.stdout)
    t = time.perf_counter()
    r = subprocess.run([*args, "-o", str(tmp_path / "r.h5"), "--no-plot", "--json"], capture_output=True, text=True,
                       env=env, check=True)  # fmt: skip
    wall = time.perf_counter() - t
    real = json.loads(r.stdout)
    assert abs(est["products"]["hvp"] - real["n_matvec"]) <= 0.2 * real["n_matvec"]
    assert 0.5 <= est["wall_seconds"] / wall <= 2.0, (est["wall_seconds"], wall, est["seconds"], real["seconds"])
