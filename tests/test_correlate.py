"""flatscope correlate end to end: stored measures reused, statistics equal the library's, bad input refused."""

import json

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli

from flatscope.checkpoint import save_checkpoint
from flatscope.correlation import kendall_tau, spearman_rho
from flatscope.data import load_data
from flatscope.models import build_model
from flatscope.training import TrainConfig, train

FAST = ["--max-samples", "200", "--resamples", "200", "--set", "hessian.top=1", "--set", "hessian.trace_probes=4",
        "--set", "local_energy.samples=4", "--set", "local_energy.sigma=0.05..0.5:3", "--device", "cpu"]
MEASURES = "hessian.lambda_max,hessian.trace,local_energy.train_target_sigma"


def _make(folder, name, lr, seed, width=8, data_spec=None):
    data_spec = data_spec or {"name": "digits", "kwargs": {}}
    data = load_data(data_spec)
    spec = {"name": "mlp", "kwargs": {"in_features": 64, "out_features": 10, "widths": [width]}}
    torch.manual_seed(seed)
    model = build_model(spec)
    rec = train(model, data, "ce", TrainConfig(opt="sgd", lr=lr, batch_size=64, budget=30, seed=seed),
                model_spec=spec, data_spec=data_spec)
    rec.pop("resume")
    path = folder / f"{name}.pt"
    save_checkpoint(str(path), model, spec, data_spec, "ce", rec)
    return path


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("family")
    paths = [_make(tmp, f"m-lr{lr}-s{s}", lr, s) for lr in (0.02, 0.1) for s in (0, 1)]
    out = tmp / "corr.h5"
    r = run_cli(["correlate", *paths, "--measures", MEASURES, "-o", out, "--json", *FAST])
    assert r.exit_code == 0, r.stderr
    return tmp, paths, out, json.loads(r.stdout)


def test_correlate_json_equals_library_statistics(family):
    res = family[3]
    assert res["schema"] == "flatscope.correlate/1"
    assert res["axes"] == ["lr"] and res["fixed"] == ["seed"]
    gaps = [c["gap"] for c in res["checkpoints"]]
    for c in res["checkpoints"]:
        q = c["quantities"]
        assert c["gap"] == pytest.approx(q["test_error"] - q["train_error"])
    for corr in res["correlations"]:
        vals = [c["measures"][corr["measure"]] for c in res["checkpoints"]]
        assert corr["n"] == 4
        assert corr["kendall"] == pytest.approx(kendall_tau(vals, gaps))
        assert corr["spearman"] == pytest.approx(spearman_rho(vals, gaps))
        lo, hi = corr["kendall_ci"]
        assert lo <= corr["kendall"] <= hi
        # psi over lr: two groups (seed 0, seed 1) of two models each, tau = sign agreement
        by_seed = {}
        for c, v, g in zip(res["checkpoints"], vals, gaps):
            by_seed.setdefault(c["axes"]["seed"], []).append((c["axes"]["lr"], v, g))
        taus = [kendall_tau([v for _, v, _ in grp], [g for _, _, g in grp]) for grp in by_seed.values()]
        taus = [t for t in taus if np.isfinite(t)]
        assert corr["psi"]["lr"] == pytest.approx(np.mean(taus))
    assert {c["flatter"] for c in res["correlations"]} == {"lower", "higher"}


def test_correlate_writes_the_group_and_plots(family):
    _, _, out, res = family
    with h5py.File(out, "r") as f:
        g = f["correlate"]
        assert g.attrs["kind"] == "correlate"
        assert g["values"].shape == (4, 3)
        np.testing.assert_allclose(g["kendall"][()], [c["kendall"] for c in res["correlations"]])
        assert json.loads(g.attrs["measures"]) == MEASURES.split(",")
    assert len(res["plots"]) == 3 and all(p.endswith(".png") for p in res["plots"])


def test_correlate_reuses_stored_results_without_recomputing(family, monkeypatch):
    tmp, paths, _, first = family

    def boom(*a, **k):
        raise AssertionError("recomputed")

    import flatscope.analyses.hessian as hess
    import flatscope.analyses.local_energy as le

    monkeypatch.setattr(hess, "hessian_analysis", boom)
    monkeypatch.setattr(le, "local_energy", boom)
    r = run_cli(["correlate", *paths, "--measures", MEASURES, "-o", tmp / "corr2.h5", "--json", *FAST])
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert all(s["cached"] for c in res["checkpoints"] for s in c["steps"])
    assert [c["kendall"] for c in res["correlations"]] == [c["kendall"] for c in first["correlations"]]
    # other options do recompute
    r = run_cli(["correlate", *paths, "--measures", MEASURES, "-o", tmp / "corr3.h5", *FAST,
                 "--set", "hessian.trace_probes=5"])
    assert r.exit_code == 3 and "recomputed" in r.stderr


def test_correlate_bad_input(family, tmp_path):
    paths = family[1]
    o = tmp_path / "c.h5"
    assert_one_line_error(run_cli(["correlate", *paths[:2], "-o", o]), contains="at least 3")
    assert_one_line_error(run_cli(["correlate", *paths, "-o", o, "--measures", "nothing.here"]),
                          contains="no analysis produces")
    assert_one_line_error(run_cli(["correlate", *paths, "-o", o, "--measures", "hessian.sharpest"]),
                          contains="no summary key")
    assert_one_line_error(run_cli(["correlate", *paths, "-o", o, "--gap", "val_error"]), contains="unknown quantity")
    assert_one_line_error(run_cli(["correlate", *paths, "-o", o, "--axes", "depth"]), contains="--axes")
    other = _make(tmp_path, "other", 0.05, 0, data_spec={"name": "digits", "kwargs": {"test_size": 0.3}})
    assert_one_line_error(run_cli(["correlate", *paths[:2], other, "-o", o, "--results-dir", tmp_path]),
                          contains="--allow-mixed")
    assert not o.exists()


def test_correlate_refuses_data_without_test_split(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 64)).astype(np.float32)
    y = rng.integers(0, 10, 60)
    npz = tmp_path / "notest.npz"
    np.savez(npz, X=X, y=y)
    paths = [_make(tmp_path, f"n{s}", 0.05, s, data_spec={"name": f"npz:{npz}", "kwargs": {}}) for s in range(3)]
    o = tmp_path / "c.h5"
    assert_one_line_error(run_cli(["correlate", *paths, "-o", o, *FAST]), contains="test split")
    assert not o.exists()
    assert not any(tmp_path.glob("*.flatscope.h5"))


def test_compare_report_has_the_gap_section(family):
    tmp, paths, _, _ = family
    r = run_cli(["compare", *paths[:3], "-o", tmp / "report", "--step", "hessian", "--no-interp", "--json",
                 "--max-samples", "200", "--set", "hessian.top=1", "--set", "hessian.trace_probes=4", "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    corr = {c["measure"]: c for c in out["correlations"]["correlations"]}
    assert set(corr) == {"hessian.lambda_max", "hessian.lambda_k", "hessian.trace"}
    gaps = [out["correlations"]["gaps"][lab] for lab in [c["label"] for c in out["checkpoints"]]]
    vals = [out["metrics"]["hessian.trace"][c["label"]] for c in out["checkpoints"]]
    assert corr["hessian.trace"]["kendall"] == pytest.approx(kendall_tau(vals, gaps))
    html = (tmp / "report" / "index.html").read_text()
    assert "Rank correlation with the generalization gap" in html
