"""train, info, show and plot end to end; the results store's atomicity; exit codes."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from conftest import assert_one_line_error
from flatscope import results as store


def test_train_writes_a_complete_checkpoint(cli, tmp_path):
    out = tmp_path / "runs" / "mlp.pt"
    r = cli(["train", "--model", "mlp", "--model-kwargs", '{"widths": [16]}', "--epochs", "2", "--batch-size", "128",
             "--save-every", "1", "-o", out, "--json", "--threads", "1"])
    assert r.exit_code == 0, r.stderr
    payload = json.loads(r.stdout)
    assert payload["grad_evals"] == 2 * 11 and payload["effective_epochs"] == 2.0
    ck = torch.load(out, weights_only=True)
    assert ck["format"] == "flatscope-checkpoint" and ck["model"]["kwargs"]["widths"] == [16]
    assert ck["data"] == {"name": "digits", "kwargs": {}} and ck["loss"] == "ce"
    h = ck["train"]["history"]
    assert h["epoch"] == [0.0, 1.0, 2.0] and h["grad_evals"] == [0.0, 11.0, 22.0]
    assert set(h) >= {"train_loss", "train_acc", "test_loss", "test_acc", "wall_time_s"}
    traj = sorted(os.listdir(tmp_path / "runs" / "mlp-traj"))
    assert traj == ["epoch-0000.pt", "epoch-0001.pt", "epoch-0002-final.pt"]
    info = json.loads(cli(["info", out, "--json"]).stdout)
    assert info["training"]["grad_evals"] == 22
    assert info["metrics"]["train"]["loss"] == pytest.approx(h["train_loss"][-1], rel=1e-6)


def test_train_is_reproducible_by_seed_and_budget_counts(cli, tmp_path):
    args = ["train", "--model", "mlp", "--model-kwargs", '{"widths": [8]}', "--budget", "7", "--batch-size", "100",
            "--threads", "1", "-q"]
    cli(args + ["-o", tmp_path / "a.pt"])
    cli(args + ["-o", tmp_path / "b.pt"])
    cli(args + ["--seed", "1", "-o", tmp_path / "c.pt"])
    a, b, c = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in "abc")
    assert a["train"]["grad_evals"] == 7
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert not torch.equal(a["state_dict"]["net.0.weight"], c["state_dict"]["net.0.weight"])


def test_train_regression_linear_mse(cli, tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 3)).astype(np.float32)
    y = (X @ np.array([1.0, -2.0, 0.5]) + 0.1).astype(np.float32)
    np.savez(tmp_path / "r.npz", X=X, y=y)
    r = cli(["train", "--model", "linear", "--data", f"npz:{tmp_path / 'r.npz'}", "--epochs", "60", "--lr", "0.05",
             "--batch-size", "16", "-o", tmp_path / "lin.pt", "--json"])
    assert r.exit_code == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["train_loss"] < 1e-3 and p["train_acc"] is None and p["test_loss"] is None
    sd = torch.load(tmp_path / "lin.pt", weights_only=True)["state_dict"]
    np.testing.assert_allclose(sd["weight"].numpy().ravel(), [1.0, -2.0, 0.5], atol=0.02)


def _write_fake_analysis(path, name="demo", value=1.5):
    with store.update(str(path)) as f:
        store.write_analysis(f, name, {"x": np.arange(3.0), "sub": {"y": np.ones(2)}, "note": "hi"},
                             kind="demo", summary={"headline": value}, options={"a": 1},
                             provenance={"seed": 0, "command": "flatscope demo", "timestamp": "now"})


def test_show_lists_analyses_with_headlines(cli, tmp_path):
    path = tmp_path / "r.h5"
    _write_fake_analysis(path)
    _write_fake_analysis(path, name="landscape/one", value=2.5)
    r = cli(["show", path, "--json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["analyses"]["demo"]["summary"] == {"headline": 1.5}
    assert d["analyses"]["landscape/one"]["summary"] == {"headline": 2.5}
    human = cli(["show", path]).stdout
    assert "/demo" in human and "headline" in human and "2.5" in human
    with h5py.File(path) as f:
        tree = store.read_tree(f["demo"])
    assert tree["note"] == "hi" and list(tree["sub"]["y"]) == [1.0, 1.0]


def test_plot_rerenders_from_file_and_overlays(cli, tmp_path):
    from flatscope import plotting

    seen = []

    @plotting.register("demo")
    def _plot(items, out_base, fmt):
        fig, ax = plotting.figure()
        for label, tree in items:
            ax.plot(tree["x"], label=label)
            seen.append(label)
        return [plotting.save(fig, out_base, "demo", fmt)]

    a, b = tmp_path / "a.flatscope.h5", tmp_path / "b.flatscope.h5"
    _write_fake_analysis(a)
    _write_fake_analysis(b)
    r = cli(["plot", a, "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["plots"] == [str(tmp_path / "a.flatscope.demo.demo.png")]
    r = cli(["plot", a, b, "--plot-format", "svg", "--outdir", tmp_path])
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "overlay.demo.demo.svg").exists() and seen[-2:] == ["a", "b"]
    assert_one_line_error(cli(["plot", tmp_path / "missing.h5"]), contains="not found")


def test_results_update_is_atomic_on_error_and_interrupt(tmp_path):
    path = tmp_path / "r.h5"
    _write_fake_analysis(path)
    before = path.read_bytes()
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with store.update(str(path)) as f:
                del f["demo"]
                f.create_dataset("half", data=np.zeros(10))
                raise exc
        assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.h5"]  # no temporary files left


def test_existing_non_hdf5_results_file_is_left_untouched(cli, tmp_path, samples):
    out = tmp_path / "precious.h5"
    out.write_text("my thesis")
    with pytest.raises(Exception, match="not an HDF5"):
        store.check_output_path(str(out))
    assert out.read_text() == "my thesis"
    assert_one_line_error(cli(["show", out]), contains="not an HDF5")


def test_unwritable_output_path(tmp_path):
    from flatscope.errors import FlatscopeError

    with pytest.raises(FlatscopeError, match="does not exist"):
        store.check_output_path(str(tmp_path / "no" / "such" / "dir" / "r.h5"))
    with pytest.raises(FlatscopeError, match="cannot write"):  # a folder nobody can create files in
        with store.update("/proc/flatscope-results.h5"):
            pass


def test_read_only_folder_for_ordinary_users(tmp_path):
    from flatscope.errors import FlatscopeError

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(FlatscopeError, match="not writable"):
            store.check_output_path(str(ro / "r.h5"))
    finally:
        ro.chmod(0o700)


def test_ctrl_c_exits_130_with_one_line(cli, samples, monkeypatch):
    import flatscope.cli.commands.info as info

    def interrupted(run):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "describe", interrupted)
    assert_one_line_error(cli(["info", samples / "mlp-sgd.pt"]), code=130, contains="interrupted")


def test_internal_errors_are_one_line_unless_verbose(cli, samples, monkeypatch):
    import flatscope.cli.commands.info as info

    def broken(run):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(info, "describe", broken)
    assert_one_line_error(cli(["info", samples / "mlp-sgd.pt"]), code=3, contains="ZeroDivisionError")
    r = cli(["info", samples / "mlp-sgd.pt", "-v"])
    assert r.exit_code == 3 and "Traceback" in r.stderr


def test_python_dash_m_json_is_exactly_one_object_and_quiet_when_piped(samples):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "flatscope", "info", str(samples / "cnn-sgd.pt"), "--json"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)  # the whole stdout is one JSON object
    assert d["model"]["name"] == "cnn" and d["metrics"]["test"]["accuracy"] > 0.9
    q = subprocess.run([sys.executable, "-m", "flatscope", "train", "--budget", "3", "-o", "/dev/null/x.pt"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert q.returncode == 2 and q.stderr.startswith("Error: ") and "Traceback" not in q.stderr
