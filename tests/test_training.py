"""``flatscope train`` end to end (CliRunner): every optimizer, budgets, --budget-from, --resume, --log,
and each bad input (exit 2, one ``Error:`` line, nothing written)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from flatscope.checkpoint import load_checkpoint
from flatscope.cli import main
from flatscope.methods import names
from flatscope.results import read_tree

torch.set_num_threads(1)
SMALL = ["--model-kwargs", '{"widths": [16]}', "--threads", "1", "--batch-size", "128"]   # 11 batches per epoch
FAST = {"esgd": ["--inner-steps", "3"], "heat": ["--inner-steps", "3"], "is": ["--inner-steps", "4"],
        "hr": ["--inner-steps", "2", "--samples", "2"], "rsgd": ["--replicas", "2"], "sam": [], "sgd": [], "adam": []}


def train(*args):
    return CliRunner().invoke(main, ["train", *SMALL, *map(str, args)])


def ok(r):
    assert r.exit_code == 0, r.output
    return r


def one_error_line(r):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), r.stderr
    assert "Traceback" not in r.output
    return lines[0]


@pytest.mark.parametrize("opt", names())
def test_each_optimizer_trains_to_its_budget(tmp_path, opt):
    out = tmp_path / f"{opt}.pt"
    r = ok(train("--opt", opt, *FAST[opt], "--budget", 12, "--json", "-o", out))
    payload = json.loads(r.stdout)
    assert payload["optimizer"] == opt and payload["grad_evals"] == 12 and payload["budget"] == 12
    assert sum(payload["grad_evals_by_kind"].values()) == 12
    assert payload["effective_epochs"] == pytest.approx(12 / 11)
    assert np.isfinite(payload["train_loss"]) and 0 <= payload["test_acc"] <= 1
    ck = load_checkpoint(str(out))
    assert ck.train["optimizer"] == opt and ck.train["grad_evals"] == 12
    k = ck.train["evals_per_step"]                 # rows at 0, at the first step crossing 11, at the end
    assert ck.train["history"]["grad_evals"] == sorted({0.0, float(-(-11 // k) * k), 12.0})
    info = json.loads(ok(CliRunner().invoke(main, ["info", str(out), "--json"])).stdout)
    assert info["training"]["grad_evals"] == 12


def test_rsgd_saves_replicas_and_logs_distances(tmp_path):
    out = tmp_path / "r.pt"
    payload = json.loads(ok(train("--opt", "rsgd", "--replicas", 3, "--epochs", 3, "--json", "-o", out)).stdout)
    assert payload["grad_evals"] == 33 and set(payload["final"]) >= {"gamma", "pull", "replica_dist_mean",
                                                                     "replica_dist_max", "replica_dist_2"}
    ck = load_checkpoint(str(out))
    reps = ck.train["replicas"]
    assert len(reps) == 3
    center = {k: torch.stack([r[k] for r in reps]).mean(0) for k in reps[0]}
    for k, v in ck.model.state_dict().items():
        torch.testing.assert_close(v, center[k], rtol=0, atol=1e-6)
    assert ck.train["hparams"]["exec"] == "loop"


def test_budget_from_gives_equal_budgets(tmp_path):
    ok(train("--opt", "esgd", "--inner-steps", 4, "--budget", 26, "-o", tmp_path / "e.pt"))
    for opt in ("sgd", "sam", "heat"):
        payload = json.loads(ok(train("--opt", opt, "--budget-from", tmp_path / "e.pt", "--json",
                                      "-o", tmp_path / f"{opt}.pt")).stdout)
        assert payload["grad_evals"] == 26


def _compare(a, b):
    ca, cb = load_checkpoint(str(a)), load_checkpoint(str(b))
    for k, v in ca.model.state_dict().items():
        assert torch.equal(v, cb.model.state_dict()[k]), k
    for k in ca.train["history"]:
        if k != "wall_time_s":
            np.testing.assert_array_equal(ca.train["history"][k], cb.train["history"][k], err_msg=k)
    for ra, rb in zip(ca.train.get("replicas", []), cb.train.get("replicas", [])):
        for k in ra:
            assert torch.equal(ra[k], rb[k])
    sa, sb = ca.train["resume"]["method"], cb.train["resume"]["method"]
    for k, v in sa.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, sb[k]), k


@pytest.mark.parametrize("opt,extra", [("esgd", ["--inner-steps", "4", "--nesterov"]), ("rsgd", ["--replicas", "3"])])
def test_resume_through_the_cli_is_bit_identical(tmp_path, opt, extra):
    ok(train("--opt", opt, *extra, "--budget", 42, "--seed", 3, "-o", tmp_path / "full.pt"))
    ok(train("--opt", opt, *extra, "--budget", 21, "--seed", 3, "-o", tmp_path / "half.pt"))
    r = ok(CliRunner().invoke(main, ["train", "--resume", str(tmp_path / "half.pt"), "--budget", "42", "--threads", "1",
                                     "--json", "-o", str(tmp_path / "resumed.pt")]))
    assert json.loads(r.stdout)["grad_evals"] == 42
    _compare(tmp_path / "full.pt", tmp_path / "resumed.pt")
    assert load_checkpoint(str(tmp_path / "resumed.pt")).train["resumed_from"]["grad_evals"] == 21


def test_resume_to_total_epochs_and_seed_reproducibility(tmp_path):
    ok(train("--opt", "heat", "--epochs", 4, "--seed", 1, "-o", tmp_path / "a.pt"))
    ok(train("--opt", "heat", "--epochs", 2, "--seed", 1, "-o", tmp_path / "b.pt"))
    ok(CliRunner().invoke(main, ["train", "--resume", str(tmp_path / "b.pt"), "--epochs", "4", "-q",
                                 "-o", str(tmp_path / "b.pt")]))                     # overwrite in place
    _compare(tmp_path / "a.pt", tmp_path / "b.pt")
    ok(train("--opt", "heat", "--epochs", 4, "--seed", 1, "-o", tmp_path / "c.pt"))
    _compare(tmp_path / "a.pt", tmp_path / "c.pt")


def test_log_writes_the_history_to_hdf5_and_plots(tmp_path):
    log = tmp_path / "runs.h5"
    ok(train("--opt", "esgd", "--inner-steps", 4, "--epochs", 3, "--log", log, "-o", tmp_path / "e.pt"))
    ok(train("--opt", "sgd", "--epochs", 3, "--log", tmp_path / "sgd.h5", "-o", tmp_path / "s.pt"))
    with h5py.File(log, "r") as f:
        g = f["train"]
        assert g.attrs["kind"] == "train"
        tree = read_tree(g)
        summary = json.loads(g.attrs["summary"])
    h = tree["history"]
    assert list(h["epoch"]) == [0, 1, 2, 3] and list(h["outer_steps"]) == [0, 2, 5, 8]
    np.testing.assert_allclose(h["gamma"], 0.03 * 1.001 ** h["outer_steps"])
    assert summary["grad_evals"] == 33 and "eff_outer_step" in summary
    assert tree["checkpoint"].endswith("e.pt")
    show = json.loads(ok(CliRunner().invoke(main, ["show", str(log), "--json"])).stdout)
    assert show["analyses"]["train"]["kind"] == "train"
    plots = json.loads(ok(CliRunner().invoke(main, ["plot", str(log), "--json"])).stdout)["plots"]
    assert any(p.endswith(".curves.png") for p in plots) and any(p.endswith(".method.png") for p in plots)
    over = json.loads(ok(CliRunner().invoke(main, ["plot", str(log), str(tmp_path / "sgd.h5"), "--json"])).stdout)
    assert over["plots"]


def test_warnings_reach_stderr_and_the_record(tmp_path):
    r = ok(train("--opt", "esgd", "--inner-steps", 2, "--lr", 100, "--budget", 6, "-o", tmp_path / "e.pt"))
    assert "Warning: effective outer step eta*gamma = 3 > 1" in r.stderr
    assert load_checkpoint(str(tmp_path / "e.pt")).train["warnings"]


def test_help_lists_every_optimizer_and_the_papers_defaults():
    r = ok(CliRunner().invoke(main, ["train", "--help"]))
    text = " ".join(r.output.split())
    for opt in names():
        assert f" {opt} " in text
    for fragment in ("(default 20, the papers')", "(default 0.1, the papers')", "(default 0.0001, the papers')",
                     "(default 0.75, the papers')"):
        assert fragment in text


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    ok(train("--opt", "esgd", "--inner-steps", 3, "--budget", 9, "-o", d / "e.pt"))
    torch.save({"w": torch.zeros(3)}, d / "bare.pt")
    (d / "notes.txt").write_text("not hdf5")
    return d


BAD = [
    (["--opt", "nope"], "unknown optimizer 'nope'"),
    (["--budget", "0"], "--budget must be at least 1"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--opt", "esgd", "--inner-steps", "0"], "--inner-steps must be at least 1"),
    (["--opt", "esgd", "--alpha", "1.5"], "--alpha must be in (0, 1]"),
    (["--opt", "esgd", "--inner-lr", "abc"], "--inner-lr must be a float"),
    (["--opt", "esgd", "--rho", "0.1"], "--rho does not apply to --opt esgd"),
    (["--opt", "is", "--momentum", "0.5"], "--momentum does not apply to --opt is"),
    (["--opt", "hr", "--lr", "0.1"], "--lr does not apply to --opt hr"),
    (["--opt", "rsgd", "--replicas", "0"], "--replicas must be at least 1"),
    (["--opt", "rsgd", "--coupling", "magic"], "--coupling must be one of exact, explicit, clipped"),
    (["--opt", "sam", "--budget", "1"], "less than one step of --opt sam"),
    (["--budget", "5", "--budget-from", "{d}/e.pt"], "give --budget or --budget-from, not both"),
    (["--budget-from", "{d}/missing.pt"], "checkpoint not found"),
    (["--budget-from", "{d}/bare.pt"], "bare state_dict"),
    (["--resume", "{d}/missing.pt", "--budget", "20"], "checkpoint not found"),
    (["--resume", "{d}/e.pt"], "give the total --epochs or --budget"),
    (["--resume", "{d}/e.pt", "--budget", "6"], "already used 9 gradient evaluations"),
    (["--resume", "{d}/e.pt", "--budget", "20", "--opt", "sgd"], "--opt sgd differs from the checkpoint's esgd"),
    (["--resume", "{d}/e.pt", "--budget", "20", "--inner-steps", "5"], "--inner-steps 5 differs"),
    (["--resume", "{d}/e.pt", "--budget", "20", "--data", "teacher"], "--data cannot change with --resume"),
    (["--resume", "{d}/e.pt", "--budget", "20", "--model", "cnn"], "--model cannot change with --resume"),
    (["-o", "{d}/notes.txt/x.pt"], "notes.txt is not a folder"),
    (["--log", "{d}/notes.txt"], "is not an HDF5 file"),
    (["--log", "{d}"], "is a directory"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a)[:40] for a, _ in BAD])
def test_bad_inputs_exit_2_with_one_line(trained, tmp_path, args, message):
    out = tmp_path / "out.pt"
    args = [a.replace("{d}", str(trained)) for a in args]
    if not {"--budget", "--resume", "--budget-from"} & set(args):
        args = ["--budget", "4", *args]
    if "-o" not in args:
        args = [*args, "-o", str(out)]
    r = CliRunner().invoke(main, ["train", "--threads", "1", *args])
    line = one_error_line(r)
    assert message in line
    assert not out.exists()
    assert (trained / "notes.txt").read_text() == "not hdf5"
