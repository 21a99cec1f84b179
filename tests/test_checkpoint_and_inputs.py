"""Every bad input of the foundation issue gets one line, exit code 2, and no damage."""

import json
import os
import pickle
import shutil

import h5py
import numpy as np
import pytest
import torch

from conftest import assert_one_line_error


@pytest.fixture
def mlp(samples, tmp_path):
    p = tmp_path / "mlp.pt"
    shutil.copy(samples / "mlp-sgd.pt", p)
    return p


def test_missing_file(cli, tmp_path):
    assert_one_line_error(cli(["info", tmp_path / "nope.pt"]), contains="not found")


def test_not_a_checkpoint(cli, tmp_path):
    p = tmp_path / "notes.pt"
    p.write_text("hello, I am text")
    assert_one_line_error(cli(["info", p]), contains="not a PyTorch checkpoint")


def test_markdown_is_not_called_pickled(cli, tmp_path):
    """A text file (here one that starts like a README) is named for what it is, not 'pickled objects'."""
    p = tmp_path / "README.md"
    p.write_text("# flatscope\n\nflatscope measures how flat a minimum is.\n")
    line = assert_one_line_error(cli(["hessian", p]), contains="not a PyTorch checkpoint")
    assert "pickled" not in line


def test_truncated_checkpoint(cli, mlp):
    data = mlp.read_bytes()
    mlp.write_bytes(data[: len(data) // 2])
    assert_one_line_error(cli(["info", mlp]))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_malicious_pickle_is_refused_and_never_runs(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Evil()}, p)
    with open(tmp_path / "evil.pkl", "wb") as f:  # a raw pickle, not a torch zip file
        pickle.dump(_Evil(), f)
    assert_one_line_error(cli(["info", p, "--model", "mlp"]), contains="refused")
    assert_one_line_error(cli(["info", tmp_path / "evil.pkl", "--model", "mlp"]))
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_unknown_model_and_data_names(cli, mlp):
    assert_one_line_error(cli(["info", mlp, "--model", "transformer9000"]), contains="unknown model")
    assert_one_line_error(cli(["info", mlp, "--data", "imagenet"]), contains="unknown data")
    assert_one_line_error(cli(["train", "--model", "nope", "-o", mlp.parent / "x.pt"]), contains="unknown model")


def test_stored_factory_is_not_imported_unless_given(cli, tmp_path, samples):
    obj = torch.load(samples / "mlp-sgd.pt", weights_only=True)
    obj["model"] = {"name": "os:system", "kwargs": {"command": "touch PWNED"}}
    p = tmp_path / "factory.pt"
    torch.save(obj, p)
    line = assert_one_line_error(cli(["info", p]), contains="imports code only when you pass it")
    assert "--model os:system" in line


def test_state_dict_that_does_not_fit(cli, mlp, tmp_path):
    line = assert_one_line_error(cli(["info", mlp, "--model", "mlp", "--model-kwargs", '{"widths": [32, 64]}']))
    assert "mis-shaped net.0.weight" in line
    sd = torch.load(mlp, weights_only=True)["state_dict"]
    sd.pop("net.4.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bare.pt")
    line = assert_one_line_error(cli(["info", tmp_path / "bare.pt", "--model", "mlp"]))
    assert "missing net.4.bias" in line and "unexpected extra.weight" in line


def test_bare_state_dict_needs_and_accepts_model(cli, mlp, tmp_path):
    sd = torch.load(mlp, weights_only=True)["state_dict"]
    torch.save({"model_state_dict": sd}, tmp_path / "bare.pt")
    assert_one_line_error(cli(["info", tmp_path / "bare.pt"]), contains="--model")
    r = cli(["info", tmp_path / "bare.pt", "--model", "mlp", "--data", "digits", "--loss", "ce", "--json"])
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "state_dict" and info["metrics"]["test"]["accuracy"] > 0.9


def test_nonfinite_weights_refused_unless_allowed(cli, mlp, tmp_path):
    obj = torch.load(mlp, weights_only=True)
    obj["state_dict"]["net.0.weight"][0, 0] = float("nan")
    p = tmp_path / "nan.pt"
    torch.save(obj, p)
    assert_one_line_error(cli(["info", p]), contains="NaN or Inf")
    r = cli(["info", p, "--allow-nonfinite", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["train"]["loss"] is None  # NaN -> null in JSON


def test_max_samples_zero_and_missing_cuda(cli, mlp):
    assert_one_line_error(cli(["info", mlp, "--max-samples", "0"]), contains="max-samples")
    if not torch.cuda.is_available():
        assert_one_line_error(cli(["info", mlp, "--device", "cuda"]), contains="no CUDA device")
    assert_one_line_error(cli(["info", mlp, "--device", "tpu"]))


def test_export_program_loads_without_model_code(cli, mlp, tmp_path):
    from flatscope.checkpoint import load_checkpoint

    model = load_checkpoint(str(mlp)).model
    batch = torch.export.Dim("batch")
    ep = torch.export.export(model, (torch.randn(2, 64),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, tmp_path / "mlp.pt2")
    r = cli(["info", tmp_path / "mlp.pt2", "--data", "digits", "--loss", "ce", "--json"])
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    ref = json.loads(cli(["info", mlp, "--json"]).stdout)
    assert info["metrics"]["train"]["loss"] == pytest.approx(ref["metrics"]["train"]["loss"], rel=1e-6)
    static = torch.export.export(model, (torch.randn(2, 64),))
    torch.export.save(static, tmp_path / "static.pt2")
    assert_one_line_error(cli(["info", tmp_path / "static.pt2", "--data", "digits", "--loss", "ce"]),
                          contains="dynamic batch")


def test_data_files_npz_and_h5(cli, mlp, tmp_path):
    from flatscope.data import load_data

    d = load_data({"name": "digits"})
    np.savez(tmp_path / "d.npz", X=d.X_train.numpy(), y=d.y_train.numpy(), X_test=d.X_test.numpy(),
             y_test=d.y_test.numpy())
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["X"], f["y"] = d.X_train.numpy(), d.y_train.numpy()
    a = json.loads(cli(["info", mlp, "--json"]).stdout)["metrics"]
    b = json.loads(cli(["info", mlp, "--data", f"npz:{tmp_path / 'd.npz'}", "--json"]).stdout)["metrics"]
    c = json.loads(cli(["info", mlp, "--data", f"h5:{tmp_path / 'd.h5'}", "--json"]).stdout)["metrics"]
    assert a == b and c["train"] == a["train"] and "test" not in c
    np.savez(tmp_path / "bad.npz", X=np.zeros((3, 64)), y=np.zeros(4, dtype=int))
    assert_one_line_error(cli(["info", mlp, "--data", f"npz:{tmp_path / 'bad.npz'}"]), contains="rows")
    assert_one_line_error(cli(["info", mlp, "--data", "npz:/does/not/exist.npz"]), contains="not found")


def test_digits_split_is_fixed_stratified_and_standardized():
    from flatscope.data import load_data

    a, b = load_data({"name": "digits"}), load_data({"name": "digits"})
    assert torch.equal(a.X_train, b.X_train) and a.X_train.shape == (1347, 64) and a.X_test.shape == (450, 64)
    assert torch.allclose(a.X_train.mean(0), torch.zeros(64), atol=1e-5)
    counts_tr = torch.bincount(a.y_train, minlength=10).float() / len(a.y_train)
    counts_te = torch.bincount(a.y_test, minlength=10).float() / len(a.y_test)
    assert (counts_tr - counts_te).abs().max() < 0.01


def test_teacher_data_is_seeded_and_balanced():
    from flatscope.data import load_data

    d = load_data({"name": "teacher", "kwargs": {"n_train": 400, "n_test": 100, "d": 20, "hidden": 3}})
    e = load_data({"name": "teacher", "kwargs": {"n_train": 400, "n_test": 100, "d": 20, "hidden": 3}})
    assert torch.equal(d.X_train, e.X_train) and torch.equal(d.y_train, e.y_train)
    assert d.X_train.shape == (400, 20) and 0.35 < d.y_train.float().mean() < 0.65
