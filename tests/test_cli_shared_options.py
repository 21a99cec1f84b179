"""Shared options that every analysis accepts, run end to end through the CLI."""

import json

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error


def test_data_kwargs_reach_the_dataset_in_train_and_info(cli, tmp_path):
    out = tmp_path / "t.pt"
    kw = '{"n_train": 120, "n_test": 40, "d": 12, "hidden": 3, "seed": 4}'
    r = cli(["train", "--data", "teacher", "--data-kwargs", kw, "--model-kwargs", '{"widths": [8]}',
             "--epochs", "2", "--batch-size", "40", "-o", out, "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["grad_evals"] == 2 * 3
    info = json.loads(cli(["info", out, "--json"]).stdout)
    assert info["data"] == {"name": "teacher", "kwargs": json.loads(kw)}
    assert (info["n_train"], info["n_test"]) == (120, 40) and info["n_params"] == 12 * 8 + 8 + 8 * 2 + 2
    # overriding the stored data with other kwargs changes the split sizes
    other = json.loads(cli(["info", out, "--data", "teacher", "--data-kwargs",
                            '{"n_train": 50, "n_test": 10, "d": 12}', "--json"]).stdout)
    assert (other["n_train"], other["n_test"]) == (50, 10)


def test_kwargs_without_their_name_are_refused(cli, samples):
    assert_one_line_error(cli(["info", samples / "mlp-sgd.pt", "--data-kwargs", "{}"]), contains="--data")
    assert_one_line_error(cli(["info", samples / "mlp-sgd.pt", "--model-kwargs", "{}"]), contains="--model")
    assert_one_line_error(cli(["info", samples / "mlp-sgd.pt", "--model", "mlp", "--model-kwargs", "[1]"]))


def test_split_test_max_samples_and_float64_use_the_right_data(cli, samples, tmp_path):
    from flatscope.checkpoint import load_checkpoint
    from flatscope.data import load_data, subsample
    from flatscope.objective import Objective

    ck = load_checkpoint(str(samples / "mlp-sgd.pt"))
    d = load_data(ck.data_spec)
    out = tmp_path / "r.h5"
    r = cli(["local-energy", samples / "mlp-sgd.pt", "--split", "test", "--sigma", "0.1", "--samples", "2",
             "--max-samples", "100", "--dtype", "float64", "--no-plot", "-o", out, "--json"])
    assert r.exit_code == 0, r.stderr
    payload = json.loads(r.stdout)
    X, y = subsample(d.X_test, d.y_test, 100, 0)
    ref = Objective(ck.model, X, y, dtype=torch.float64).evaluate()
    text = json.dumps(payload)
    assert "test" in text and "train" not in json.dumps(payload.get("splits", ["test"]))
    base = payload["base_loss"] if "base_loss" in payload else payload["test"]["base_loss"]
    assert base == pytest.approx(ref[0], rel=1e-12)


def test_plot_formats_svg_and_pdf(cli, samples, tmp_path):
    out = tmp_path / "r.h5"
    assert cli(["landscape", samples / "mlp-sgd.pt", "--grid", "5", "--no-plot", "-o", out]).exit_code == 0
    for fmt, magic in (("pdf", b"%PDF"), ("svg", b"<?xml")):
        r = cli(["plot", out, "--plot-format", fmt, "--json"])
        assert r.exit_code == 0, r.stderr
        paths = json.loads(r.stdout)["plots"]
        assert paths and all(p.endswith(f".{fmt}") for p in paths)
        assert all(open(p, "rb").read(5).startswith(magic) for p in paths)
