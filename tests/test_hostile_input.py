"""Hostile and broken input (issue 18): every file is built inside its test.

Each case must end in one ``Error:`` line and exit 2 (never 3, never a traceback), and nothing
from a file may run: the payload tests check a sentinel file that the payload would create.
"""

import contextlib
import io
import json
import os
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error

from flatscope.errors import FlatscopeError

DIGITS = ["--data", "digits", "--loss", "ce"]


class _Touch:
    """Unpickling this creates ``path``: the sentinel that proves a payload ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def mlp(samples):
    return samples / "mlp-sgd.pt"


def _export(tmp_path, model=None) -> Path:
    model = model or torch.nn.Sequential(torch.nn.Linear(64, 10))
    ep = torch.export.export(model, (torch.zeros(2, 64),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path / "good.pt2"
    torch.export.save(ep, path)
    return path


def _rewrite_zip(src: Path, dst: Path, change) -> Path:
    """Copy a zip archive, passing every (name, bytes) through ``change`` (None drops, a list adds)."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as w:
        for info in z.infolist():
            out = change(info.filename, z.read(info.filename))
            for name, data in (out if isinstance(out, list) else [(info.filename, out)] if out is not None else []):
                w.writestr(name, data)
    return dst


def _pickle_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)   # torch's zip format with a pickle inside, as torch.export writes them
    return buf.getvalue()


# --------------------------------------------------------------------------- .pt2 payloads
def test_pt2_sample_inputs_payload_never_runs(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = _export(tmp_path)
    sentinel = tmp_path / "PWNED_SAMPLE_INPUTS"
    evil = _rewrite_zip(good, tmp_path / "evil.pt2", lambda n, d: _pickle_bytes(_Touch(sentinel))
                        if n.endswith("data/sample_inputs/model.pt") else d)
    line = assert_one_line_error(cli(["info", evil, *DIGITS]), contains="refused")
    assert "sample_inputs" in line
    assert_one_line_error(cli(["hessian", evil, *DIGITS, "--top", "1", "--no-plot"]), contains="refused")
    assert not sentinel.exists()
    # Control: the same archive handed to torch directly does run the payload (so the refusal matters).
    with contextlib.suppress(Exception):   # whatever torch makes of the payload afterwards
        torch.export.load(evil)
    assert sentinel.exists(), "torch.export.load no longer unpickles sample inputs unsafely; update this test"


def test_pt2_use_pickle_weight_payload_never_runs(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = _export(tmp_path)
    sentinel = tmp_path / "PWNED_WEIGHT"

    def change(name, data):
        if name.endswith("data/weights/model_weights_config.json"):
            cfg = json.loads(data)
            first = next(iter(cfg["config"].values()))
            first["use_pickle"] = True
            return json.dumps(cfg).encode()
        if name.endswith("data/weights/weight_0"):
            return _pickle_bytes(_Touch(sentinel))
        return data

    evil = _rewrite_zip(good, tmp_path / "evil.pt2", change)
    assert_one_line_error(cli(["info", evil, *DIGITS]), contains="use_pickle")
    with pytest.raises(FlatscopeError, match="never runs code"):
        from flatscope.checkpoint import load_checkpoint
        load_checkpoint(str(evil))
    assert not sentinel.exists()


def test_pt2_constants_objects_and_compiled_code_refused(cli, tmp_path):
    good = _export(tmp_path)

    def opaque(name, data):
        if name.endswith("data/constants/model_constants_config.json"):
            return json.dumps({"config": {"c": {"path_name": "opaque_obj_0", "is_param": False,
                                                "use_pickle": True, "tensor_meta": None}}}).encode()
        return data

    assert_one_line_error(cli(["info", _rewrite_zip(good, tmp_path / "o.pt2", opaque), *DIGITS]), contains="refused")
    root = zipfile.ZipFile(good).namelist()[0].split("/")[0]
    aoti = _rewrite_zip(good, tmp_path / "a.pt2", lambda n, d: [(n, d)] + (
        [(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")] if n.endswith("archive_version") else []))
    assert_one_line_error(cli(["info", aoti, *DIGITS]), contains="compiled code")
    odd = _rewrite_zip(good, tmp_path / "x.pt2", lambda n, d: [(n, d)] + (
        [(f"{root}/data/other/thing.pkl", b"\x80\x04")] if n.endswith("archive_version") else []))
    assert_one_line_error(cli(["info", odd, *DIGITS]), contains="unexpected archive entry")


def test_pt2_that_is_not_an_export(cli, tmp_path, mlp):
    fake = tmp_path / "fake.pt2"
    fake.write_bytes(mlp.read_bytes())           # a torch.save zip, not an export
    assert_one_line_error(cli(["info", fake, *DIGITS]), contains="not a readable torch.export program")
    (tmp_path / "text.pt2").write_text("hello\n")
    assert_one_line_error(cli(["info", tmp_path / "text.pt2", *DIGITS]))


def test_good_pt2_still_loads(cli, tmp_path):
    r = cli(["info", _export(tmp_path), *DIGITS, "--json"])
    assert r.exit_code == 0, r.stderr


# --------------------------------------------------------------------------- .pt checkpoints
def _flatscope_ckpt(mlp, tmp_path, name="c.pt", **changes) -> Path:
    obj = torch.load(mlp, weights_only=True)
    obj.update(changes)
    p = tmp_path / name
    torch.save(obj, p)
    return p


def test_not_a_pickle_says_not_a_checkpoint(cli, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# flatscope\n\nSome text.\n")
    line = assert_one_line_error(cli(["hessian", readme, *DIGITS]), contains="is not a PyTorch checkpoint")
    assert "pickled objects" not in line


def test_fifo_and_other_non_regular_files_refused(cli, tmp_path):
    fifo = tmp_path / "ckpt.pt"
    os.mkfifo(fifo)
    assert_one_line_error(cli(["info", fifo, *DIGITS]), contains="FIFO")
    assert_one_line_error(cli(["info", "/dev/null", *DIGITS]), contains="not a regular file")


def test_state_dict_with_integer_keys(cli, tmp_path):
    p = tmp_path / "ints.pt"
    torch.save({0: torch.zeros(3), 1: torch.zeros(2)}, p)
    assert_one_line_error(cli(["info", p, "--model", "mlp", *DIGITS]), contains="not a parameter name")


@pytest.mark.parametrize("spec, needle", [
    ([["name", "mlp"]], "spec is a list"),
    ("mlp", "spec is a str"),
    ({"name": "mlp", "kwargs": ["widths", 3]}, "kwargs must be a mapping"),
    ({"name": "mlp", "kwargs": {"widths": "a"}}, "rejected its arguments"),
    ({"name": "mlp", "kwargs": {"widths": [10**30]}}, "rejected its arguments"),
    ({"name": "mlp", "kwargs": {"widths": [40_000_000_000]}}, "FLATSCOPE_MAX_PARAMS"),
])
def test_broken_stored_model_spec(cli, mlp, tmp_path, spec, needle):
    assert_one_line_error(cli(["info", _flatscope_ckpt(mlp, tmp_path, model=spec)]), contains=needle)


def test_broken_stored_data_spec_and_record(cli, mlp, tmp_path):
    assert_one_line_error(cli(["info", _flatscope_ckpt(mlp, tmp_path, data="digits")]), contains="data spec is a str")
    assert_one_line_error(cli(["info", _flatscope_ckpt(mlp, tmp_path, loss=3)]), contains="loss")
    assert_one_line_error(cli(["info", _flatscope_ckpt(mlp, tmp_path, train=[1])]), contains="training record")
    assert_one_line_error(cli(["info", _flatscope_ckpt(mlp, tmp_path, version=True)]), contains="version")


def test_huge_parameter_spec_allocates_nothing(mlp, tmp_path, monkeypatch):
    from flatscope.checkpoint import load_checkpoint

    calls = []
    real = torch.nn.Linear.reset_parameters
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters",
                        lambda self: (calls.append(self.weight.device.type), real(self))[1])
    p = _flatscope_ckpt(mlp, tmp_path, model={"name": "mlp", "kwargs": {"widths": [40_000_000_000]}})
    with pytest.raises(FlatscopeError, match="nothing was allocated"):
        load_checkpoint(str(p))
    assert calls and set(calls) == {"meta"}


@pytest.mark.parametrize("make, needle", [
    (lambda t: t.to_sparse(), "sparse"),
    (lambda t: torch.empty(t.shape, device="meta"), "meta tensor"),
    (lambda t: t.to(torch.int64), "int64"),
    (lambda t: t.to(torch.int8), "int8"),
    (lambda t: t.to(torch.uint8), "uint8"),
    (lambda t: t.to(torch.bool), "bool"),
    (lambda t: t.to(torch.complex64), "complex"),
])
def test_weights_of_the_wrong_kind_refused(cli, mlp, tmp_path, make, needle):
    obj = torch.load(mlp, weights_only=True)
    obj["state_dict"] = {k: make(v) for k, v in obj["state_dict"].items()}
    p = tmp_path / "w.pt"
    torch.save(obj, p)
    assert_one_line_error(cli(["info", p]), contains=needle)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_half_and_double_weights_converted_explicitly(cli, mlp, tmp_path, dtype):
    from flatscope.checkpoint import load_checkpoint

    obj = torch.load(mlp, weights_only=True)
    obj["state_dict"] = {k: v.to(dtype) for k, v in obj["state_dict"].items()}
    p = tmp_path / "w.pt"
    torch.save(obj, p)
    r = cli(["info", p, "--json"])
    assert r.exit_code == 0, r.stderr
    ck = load_checkpoint(str(p))
    w = ck.model.state_dict()["net.0.weight"]
    if dtype == torch.float64:
        assert w.dtype == torch.float64 and not ck.notes and "Warning" not in r.stderr
        assert torch.equal(w, obj["state_dict"]["net.0.weight"])
    else:
        name = str(dtype).replace("torch.", "")
        assert w.dtype == torch.float32 and f"converted 6 {name} tensor(s) to float32" in ck.notes[0]
        assert f"Warning: {p}: converted 6 {name}" in r.stderr
        assert torch.equal(w, obj["state_dict"]["net.0.weight"].float())


def test_validate_state_dict_directly():
    from flatscope.checkpoint import validate_state_dict

    state, notes = validate_state_dict({"w": torch.ones(2, dtype=torch.float16), "bn.num_batches_tracked":
                                        torch.tensor(3)}, "x")
    assert state["w"].dtype == torch.float32 and state["bn.num_batches_tracked"].dtype == torch.int64 and notes
    with pytest.raises(FlatscopeError, match="more than 3 values"):
        validate_state_dict({"w": torch.ones(4)}, "x", max_numel=3)
    with pytest.raises(FlatscopeError, match="not a tensor"):
        validate_state_dict({"w": [1.0]}, "x")
    with pytest.raises(FlatscopeError, match="non-empty"):
        validate_state_dict({}, "x")


def test_resume_with_other_factory_never_imports_the_stored_one(cli, mlp, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sentinel = tmp_path / "PWNED_BY_STORED_FACTORY"
    (tmp_path / "stored_factory_mod.py").write_text(
        f"open({str(sentinel)!r}, 'w').close()\n\ndef build(**kw):\n    import torch\n    return torch.nn.Linear(64, 10)\n")
    (tmp_path / "other_factory_mod.py").write_text(
        "def build(**kw):\n    import torch\n    return torch.nn.Linear(64, 10)\n")
    p = _flatscope_ckpt(mlp, tmp_path, model={"name": "stored_factory_mod:build", "kwargs": {}})
    line = assert_one_line_error(cli(["train", "--resume", p, "--model", "other_factory_mod:build", "--epochs", "2",
                                      "-o", tmp_path / "out.pt"]), contains="cannot change with --resume")
    assert "stored_factory_mod:build" in line
    assert_one_line_error(cli(["train", "--resume", p, "--epochs", "2", "-o", tmp_path / "out.pt"]),
                          contains="imports code only when you pass it")
    assert not sentinel.exists()


# --------------------------------------------------------------------------- results files
ROOT = Path(__file__).resolve().parents[1]
_WRITER = """
import sys, time
import numpy as np
from flatscope import results as store
path, name, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(rounds):
    with store.update(path) as f:
        store.write_analysis(f, f"{name}/{i}", {"x": np.arange(1000.0)}, kind="test", summary={}, options={},
                             provenance={})
        time.sleep(0.02)   # widen the read-modify-write window
"""


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1")


@pytest.mark.parametrize("writers", [2, 4])
def test_concurrent_writers_lose_nothing(tmp_path, writers):
    import subprocess
    import sys

    from flatscope import results as store

    path = tmp_path / "res.h5"
    with store.update(str(path)) as f:   # an earlier analysis, with some bulk to copy
        store.write_analysis(f, "earlier", {"big": np.zeros(2_000_000)}, kind="test", summary={}, options={},
                             provenance={})
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), f"w{k}", "3"], env=_env(),
                              stderr=subprocess.PIPE) for k in range(writers)]
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0] * writers, [p.stderr.read() for p in procs]
    with h5py.File(path, "r") as f:
        names = {n for n, _ in store.find_analyses(f)}
    assert names == {"earlier"} | {f"w{k}/{i}" for k in range(writers) for i in range(3)}
    assert os.listdir(tmp_path) == ["res.h5"]   # no temporaries, no lock file left


_HOLDER = """
import sys, time
import numpy as np
from flatscope import results as store
from flatscope.cli.common import handle_errors

@handle_errors
def main():
    with store.update(sys.argv[1]) as f:
        store.write_analysis(f, "new", {"x": np.zeros(10)}, kind="test", summary={}, options={}, provenance={})
        f.flush()
        print("inside", flush=True)
        time.sleep(60)

main()
"""


def _start_holder(path):
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "inside", p.stderr.read()
    return p


def _results_with_one(path):
    from flatscope import results as store

    with store.update(str(path)) as f:
        store.write_analysis(f, "old", {"x": np.ones(5)}, kind="test", summary={}, options={}, provenance={})


def test_sigterm_cleans_up_and_exits_143(tmp_path):
    import signal

    path = tmp_path / "res.h5"
    _results_with_one(path)
    p = _start_holder(path)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]   # the copy being written
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 143
    err = [ln for ln in p.stderr.read().splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("Error: terminated"), err
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    with h5py.File(path, "r") as f:
        assert list(f) == ["old"]


def test_sigkill_leftover_is_removed_by_the_next_write(tmp_path):
    import signal

    from flatscope import results as store

    path = tmp_path / "res.h5"
    _results_with_one(path)
    p = _start_holder(path)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    left = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    assert len(left) == 1
    with store.update(str(path)) as f:   # the killed writer's lock died with it: this does not block
        store.write_analysis(f, "next", {"x": np.ones(2)}, kind="test", summary={}, options={}, provenance={})
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    with h5py.File(path, "r") as f:
        assert sorted(f) == ["next", "old"]


def test_read_only_and_foreign_results_untouched(cli, mlp, tmp_path):
    path = tmp_path / "res.h5"
    _results_with_one(path)
    path.chmod(0o444)
    before = path.read_bytes()
    assert_one_line_error(cli(["hessian", mlp, "--top", "1", "--no-plot", "-o", path]), contains="read-only")
    assert path.read_bytes() == before
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert_one_line_error(cli(["hessian", mlp, "--top", "1", "--no-plot", "-o", notes]), contains="not an HDF5")
    assert notes.read_text() == "mine"


# --------------------------------------------------------------------------- train -o
TRAIN = ["train", "--model", "mlp", "--model-kwargs", '{"widths": [8]}', "--epochs", "1", "--batch-size", "256"]


def test_train_refuses_to_overwrite_what_is_not_a_checkpoint(cli, tmp_path):
    res = tmp_path / "res.h5"
    _results_with_one(res)
    before = res.read_bytes()
    assert_one_line_error(cli([*TRAIN, "-o", res]), contains="not a flatscope checkpoint")
    assert res.read_bytes() == before
    notes = tmp_path / "notes.pt"
    notes.write_text("my notes")
    assert_one_line_error(cli([*TRAIN, "-o", notes]), contains="not a flatscope checkpoint")
    assert notes.read_text() == "my notes"


def test_train_keeps_links_and_permissions(cli, tmp_path):
    real = tmp_path / "real.pt"
    assert cli([*TRAIN, "-o", real]).exit_code == 0
    real.chmod(0o640)
    link = tmp_path / "link.pt"
    link.symlink_to(real)
    r = cli([*TRAIN, "--seed", "1", "-o", link])
    assert r.exit_code == 0, r.stderr
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real.stat().st_mode & 0o777) == 0o640
    assert torch.load(real, weights_only=True)["train"]["seed"] == 1
    real.chmod(0o444)
    assert_one_line_error(cli([*TRAIN, "-o", real]), contains="read-only")


# --------------------------------------------------------------------------- a killed train run resumes
@pytest.mark.parametrize("opt", ["sgd", "esgd"])
def test_trajectory_checkpoints_resume_bit_identically(cli, tmp_path, opt):
    args = ["train", "--model", "mlp", "--model-kwargs", '{"widths": [8]}', "--batch-size", "256", "--opt", opt]
    full = tmp_path / "full.pt"
    r = cli([*args, "--epochs", "4", "--save-every", "2", "-o", full])
    assert r.exit_code == 0, r.stderr
    mid = tmp_path / "full-traj" / "epoch-0002.pt"   # what a run killed in epoch 3 or 4 leaves behind
    r = cli(["train", "--resume", mid, "--epochs", "4", "-o", tmp_path / "resumed.pt"])
    assert r.exit_code == 0, r.stderr
    a = torch.load(full, weights_only=True)
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert a["train"]["grad_evals"] == b["train"]["grad_evals"]
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert a["train"]["history"]["train_loss"] == b["train"]["history"]["train_loss"]


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize("args, needle", [
    (["train", "--epochs", "nan", "-o", "{d}/x.pt"], "--epochs must be a finite number"),
    (["train", "--epochs", "inf", "-o", "{d}/x.pt"], "--epochs"),
    (["train", "--lr", "nan", "-o", "{d}/x.pt"], "finite"),
    (["train", "--epochs", "1e300", "-o", "{d}/x.pt"], "at most"),
    (["landscape", "{m}", "--flush-every", "nan"], "--flush-every must be a finite number"),
    (["landscape", "{m}", "--2d", "--grid", "100000,100000"], "points in all"),
    (["landscape", "{m}", "--grid", "١٠"], "expected an integer"),
    (["landscape", "{m}", "--range", "-１:1"], "ASCII"),
    (["local-energy", "{m}", "--sigma", "1e-3..1:1000000000"], "at most 10000"),
    (["local-energy", "{m}", "--sigma", "٠.١"], "not a number"),
    (["local-energy", "{m}", "--samples", "100000000000"], "FLATSCOPE_MAX_BYTES"),
    (["local-entropy", "{m}", "--chains", "100000000000"], "FLATSCOPE_MAX_BYTES"),
    (["hessian", "{m}", "--density", "--probes", "100000000000"], "FLATSCOPE_MAX_BYTES"),
    (["hessian", "{m}", "--steps", "100000000000"], "FLATSCOPE_MAX_BYTES"),
    (["hessian", "{m}", "--top", "1" + "0" * 30], "too large"),
    (["hessian", "{m}", "--sigma", "nan"], "finite"),
])
def test_options_bounded_and_finite(cli, mlp, tmp_path, args, needle):
    args = [a.format(d=tmp_path, m=mlp) for a in args]
    if args[0] != "train":
        args += ["--no-plot", "-o", str(tmp_path / "r.h5"), "--max-samples", "40"]
    assert_one_line_error(cli(args), contains=needle)
    assert not (tmp_path / "r.h5").exists() and not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("threshold", ["hessian.lambda_max > ５０", "hessian.lambda_max > ٥٠", "hessian.trace < 1e٣"])
def test_fail_if_refuses_non_ascii_digits(cli, mlp, tmp_path, threshold):
    from flatscope.thresholds import parse_threshold

    with pytest.raises(FlatscopeError, match="only ASCII"):
        parse_threshold(threshold)
    assert_one_line_error(cli(["audit", mlp, "--fail-if", threshold, "-o", tmp_path / "a.h5"]), contains="ASCII")


def test_audit_set_and_suite_limits(cli, mlp, tmp_path):
    out = ["-o", tmp_path / "a.h5", "--no-plot"]
    assert_one_line_error(cli(["audit", mlp, "--step", "hessian", "--set", "hessian.top=" + "9" * 30, *out]),
                          contains="too large")
    deep = tmp_path / "deep.toml"
    deep.write_text("[hessian]\ntop = " + "[" * 5000 + "]" * 5000 + "\n")
    assert_one_line_error(cli(["audit", mlp, "--suite", deep, *out]), contains="too deeply")
    nested = tmp_path / "nested.toml"
    nested.write_text("[hessian]\ntop = [[[[[1]]]]]\n")
    assert_one_line_error(cli(["audit", mlp, "--suite", nested, *out]), contains="levels deep")
    sig = tmp_path / "sigma.toml"
    sig.write_text('[local_energy]\nsigma = "1e-3..1:1000000000"\n')
    assert_one_line_error(cli(["audit", mlp, "--suite", sig, *out]), contains="at most 10000")
    nan = tmp_path / "nan.toml"
    nan.write_text("[hessian]\nsigma = nan\n")
    assert_one_line_error(cli(["audit", mlp, "--suite", nan, *out]), contains="not a finite number")
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * (2 << 20) + "\n[hessian]\n")
    assert_one_line_error(cli(["audit", mlp, "--suite", big, *out]), contains="at most")
    fifo = tmp_path / "suite.toml"
    os.mkfifo(fifo)
    assert_one_line_error(cli(["audit", mlp, "--suite", fifo, *out]), contains="FIFO")
    assert not (tmp_path / "a.h5").exists()


def test_landscape_resume_keeps_the_stored_batching(cli, mlp, tmp_path):
    common = [mlp, "--grid", "5", "--max-samples", "40", "--no-plot", "-o", tmp_path / "l.h5"]
    assert cli(["landscape", *common, "--batching", "loop"]).exit_code == 0
    assert_one_line_error(cli(["landscape", *common, "--resume", "--batching", "vmap"]), contains="--batching loop")
    r = cli(["landscape", *common, "--resume", "--batching", "loop"])
    assert r.exit_code == 0, r.stderr


# --------------------------------------------------------------------------- data files (safe_files)
def test_npz_declared_sizes_checked_before_decompression(tmp_path, monkeypatch):
    from flatscope.safe_files import check_npz

    good = tmp_path / "good.npz"
    np.savez(good, X=np.ones((5, 3), np.float32), y=np.arange(5))
    shapes = check_npz(str(good))
    assert shapes["X"][0] == (5, 3) and shapes["y"][0] == (5,)
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, X=np.zeros((1024, 1024)), y=np.zeros(1024))   # 8 MiB from 8 KiB
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load must not run"))
    with pytest.raises(FlatscopeError, match="declares 8.0 MiB"):
        check_npz(str(bomb), max_total=4 << 20)
    with pytest.raises(FlatscopeError, match="zip bomb"):
        check_npz(str(bomb))                       # 1000:1 and more is refused whatever the limit

    # A header that declares 7 TiB over a few bytes of data.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)})
    liar = tmp_path / "liar.npz"
    with zipfile.ZipFile(liar, "w") as z:
        z.writestr("X.npy", header.getvalue() + b"\0" * 64)   # the header starts with the magic
    with pytest.raises(FlatscopeError, match="declares shape"):
        check_npz(str(liar))


@pytest.mark.parametrize("arrays, needle", [
    ({"X": np.zeros((3, 2), np.complex64), "y": np.zeros(3)}, "complex-valued"),
    ({"X": np.zeros((0, 64), np.float32), "y": np.zeros(0)}, "empty"),
    ({"X": np.array(["a", "b"]), "y": np.zeros(2)}, "not a numeric array"),
])
def test_npz_values_must_be_real_numbers(tmp_path, arrays, needle):
    from flatscope.safe_files import check_npz

    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    with pytest.raises(FlatscopeError, match=needle):
        check_npz(str(p))


def test_npz_object_array_and_non_regular_file(tmp_path):
    from flatscope.safe_files import check_npz

    p = tmp_path / "obj.npz"
    np.savez(p, X=np.array([{"a": 1}], dtype=object))
    with pytest.raises(FlatscopeError, match="Python objects"):
        check_npz(str(p))
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    with pytest.raises(FlatscopeError, match="FIFO"):
        check_npz(str(fifo))


def _h5(tmp_path, build) -> Path:
    p = tmp_path / "d.h5"
    with h5py.File(p, "w") as f:
        build(f)
    return p


@pytest.mark.parametrize("build, needle", [
    (lambda f: f.__setitem__("X", h5py.ExternalLink("missing.h5", "/X")), "external link"),
    (lambda f: f.__setitem__("X", h5py.SoftLink("/nowhere")), "dangling soft link"),
    (lambda f: f.create_group("X"), "is a group"),
    (lambda f: f.create_dataset("X", shape=(2**40, 64), dtype="f8", chunks=(1, 64)), "FLATSCOPE_MAX_BYTES"),
    (lambda f: f.create_dataset("X", shape=(10, 4), dtype="f4", external=[("raw.bin", 0, 160)]), "external files"),
    (lambda f: f.__setitem__("X", np.zeros((3, 2), np.complex128)), "complex-valued"),
    (lambda f: f.__setitem__("X", np.zeros((0, 64), np.float32)), "empty"),
    (lambda f: f.__setitem__("X", np.array([b"a", b"b"])), "not a numeric array"),
    (lambda f: f.create_group("g").__setitem__("X", h5py.ExternalLink("o.h5", "/X")) or
     f.__setitem__("X", h5py.SoftLink("/g/X")), "external link"),
])
def test_h5_dataset_checks(tmp_path, build, needle):
    from flatscope.safe_files import check_h5_dataset

    p = _h5(tmp_path, build)
    with h5py.File(p, "r") as f, pytest.raises(FlatscopeError, match=needle):
        check_h5_dataset(f, "X")


def test_h5_external_link_to_a_real_file_and_virtual_dataset(tmp_path):
    from flatscope.safe_files import check_h5_dataset

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["X"] = np.ones((10, 4), np.float32)
    p = tmp_path / "d.h5"
    with h5py.File(p, "w") as f:
        f["X"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/X")
        layout = h5py.VirtualLayout(shape=(10, 4), dtype="f4")
        layout[:] = h5py.VirtualSource(str(tmp_path / "other.h5"), "X", shape=(10, 4))
        f.create_virtual_dataset("V", layout)
        f["data/Y"] = np.arange(10)
        f["Y"] = h5py.SoftLink("/data/Y")        # a soft link inside the file is fine
    with h5py.File(p, "r") as f:
        with pytest.raises(FlatscopeError, match="external link"):
            check_h5_dataset(f, "X")
        with pytest.raises(FlatscopeError, match="virtual dataset"):
            check_h5_dataset(f, "V")
        assert check_h5_dataset(f, "Y").shape == (10,)
        assert check_h5_dataset(f, "/data/Y").shape == (10,)


def test_check_count():
    from flatscope.safe_files import check_count

    assert check_count("teacher: n_train", 5) == 5
    for bad in (-5, 0, 2.5, float("nan"), True, "7"):
        with pytest.raises(FlatscopeError, match="n_train"):
            check_count("teacher: n_train", bad)
    with pytest.raises(FlatscopeError, match="at most"):
        check_count("teacher: n_train", 10**13, maximum=10**9)


def test_sigterm_during_landscape_keeps_the_finished_points(mlp, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "l.h5"
    p = subprocess.Popen([sys.executable, "-m", "flatscope", "landscape", str(mlp), "--2d", "--grid", "201",
                          "--max-samples", "50", "--flush-every", "0", "--no-plot", "-q", "-o", str(out)],
                         env=_env(), stderr=subprocess.PIPE, text=True)
    done = 0
    deadline = time.monotonic() + 180
    while done == 0 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.2)
        try:
            with h5py.File(out, "r") as f:
                done = int(f["landscape/random-2d/done"][()].sum())
        except (OSError, KeyError):
            pass
    assert done > 0, p.stderr.read() if p.poll() is not None else "no point written in time"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 143
    err = p.stderr.read()
    assert "--resume" in err and err.strip().splitlines()[-1].startswith("Error: terminated"), err
    assert "Traceback" not in err
    with h5py.File(out, "r") as f:
        assert int(f["landscape/random-2d/done"][()].sum()) >= done
    assert sorted(os.listdir(tmp_path)) == ["l.h5"]


def test_under_torchrun_only_rank_0_prints_the_error(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    r = cli(["train", "--epochs", "nan", "-o", tmp_path / "x.pt"])
    assert r.exit_code == 2 and r.stderr.strip() == ""
    monkeypatch.setenv("RANK", "0")
    assert_one_line_error(cli(["train", "--epochs", "nan", "-o", tmp_path / "x.pt"]), contains="finite")
