"""Tests of ``flatscope audit`` and ``flatscope compare``.

What is proven here:

- thresholds: malformed or hostile ``--fail-if`` text (flags or the suite file) exits 2 before anything
  is loaded or computed and is never executed; a metric the suite cannot produce exits 2 up front;
- exit codes 0 (no threshold holds), 1 (one line per failed threshold on stderr, naming value and bound),
  2 (bad input: suite file, options, values);
- the ``--json`` object follows the schema documented in the README, and its metric names are exactly
  the ones predicted from the suite before computing;
- each step writes the group the analysis command writes (same options attr, same numbers);
- caching: a stored group is reused only when the checkpoint sha256 and the options (and seed, dtype,
  data, loss, split, sample subset) match; a changed option, another checkpoint or --recompute recompute;
- compare: every checkpoint gets the same raw Gaussian landscape direction (normalized against its own
  weights), the same local-energy noise draws and the same Hessian probe vectors; the HTML report is
  self-contained (and renders in headless Chromium when one is installed; skipped otherwise).

All runs use a tiny suite (64 samples, few probes, σ and points) on the sample checkpoints.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, run_cli
from flatscope import audit as au
from flatscope.analyses import hessian as hess_mod
from flatscope.analyses import local_energy as le_mod
from flatscope.checkpoint import load_checkpoint
from flatscope.cli.common import Run
from flatscope.directions import normalize_direction
from flatscope.errors import FlatscopeError
from flatscope.params import ParamLayout

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"
TINY = """\
[hessian]
top = 2
trace_probes = 6

[local_energy]
sigma = "0.1,1"
samples = 2
target_error = 0.05

[landscape]
grid = 5
"""
LE_TINY = """
[local_entropy]
gamma = "1,10"
steps = 20
burn_in = 5
chains = 2
thin = 5
"""
FAST = ["--max-samples", "64", "--threads", "1"]
HOSTILE = ["__import__('os').system('touch PWNED') > 0",
           "hessian.lambda_max > __import__('os').system('touch PWNED')",
           "hessian.lambda_max > 1; import os; os.system('touch PWNED')",
           "hessian.lambda_max > 5 or True"]


def _copy(tmp: Path, name: str, as_name: str | None = None) -> Path:
    dst = tmp / (as_name or name)
    shutil.copy(SAMPLES / name, dst)
    return dst


def _suite(tmp: Path, text: str = TINY, name: str = "suite.toml") -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def _audit(ckpt: Path, suite: Path, *extra) -> tuple:
    r = run_cli(["audit", ckpt, "--suite", suite, *FAST, "--json", *extra])
    return r, (json.loads(r.stdout) if r.stdout.strip() else None)


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """One tiny audit of the MLP sample (later tests read its cache)."""
    tmp = tmp_path_factory.mktemp("audited")
    ckpt = _copy(tmp, "mlp-sgd.pt")
    suite = _suite(tmp)
    r, out = _audit(ckpt, suite)
    assert r.exit_code == 0, r.stderr
    return tmp, ckpt, suite, out


# ------------------------------------------------------------------------------------ thresholds, exit 2
@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_threshold_exits_2_before_anything_and_is_never_executed(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = _copy(tmp_path, "mlp-sgd.pt")
    r = run_cli(["audit", ckpt, "--fail-if", text, *FAST])
    assert_one_line_error(r, 2, "threshold")
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "mlp-sgd.flatscope.h5").exists()      # nothing computed, nothing written


def test_hostile_threshold_in_suite_file_is_rejected_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = _copy(tmp_path, "mlp-sgd.pt")
    suite = _suite(tmp_path, 'fail_if = ["__import__(\'os\').system(\'touch PWNED\') > 0"]\n' + TINY)
    r = run_cli(["audit", ckpt, "--suite", suite, *FAST])
    assert_one_line_error(r, 2, "cannot parse threshold")
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "mlp-sgd.flatscope.h5").exists()


def test_unknown_metric_exits_2_before_computing_with_a_hint(tmp_path):
    ckpt = _copy(tmp_path, "mlp-sgd.pt")
    r = run_cli(["audit", ckpt, "--suite", _suite(tmp_path), *FAST,
                 "--fail-if", "local_energy.sigma_at_target < 0.1"])
    line = assert_one_line_error(r, 2, "unknown metric 'local_energy.sigma_at_target'")
    assert "did you mean 'local_energy.train_target_sigma'" in line
    assert not (tmp_path / "mlp-sgd.flatscope.h5").exists()
    # a metric of an analysis that is not in the suite
    r = run_cli(["audit", ckpt, "--step", "hessian", *FAST, "--fail-if", "local_energy.train_target_sigma < 0.1"])
    assert_one_line_error(r, 2, "unknown metric")
    assert not (tmp_path / "mlp-sgd.flatscope.h5").exists()


@pytest.mark.parametrize("suite_text,args,message", [
    ("[hessian]\ntopp = 3\n", [], "unknown option 'topp'; did you mean 'top'?"),
    ("[hessian]\ntop = 'abc'\n", [], "'abc' is not a valid integer"),
    ("[hessian]\ndensity = 3\n", [], "is a switch"),
    ("[hessian]\ntop = true\n", [], "takes a value"),
    ("[local_energy]\nnoise = 'loud'\n", [], "'loud' is not one of"),
    ("[landscape]\ndirections = 'pca'\n", [], "not available in an audit"),
    ("[entropy]\n", [], "unknown analysis 'entropy'"),
    ("top = 3\n", [], "unexpected top-level key 'top'"),
    ("[hessian\n", [], "not valid TOML"),
    ("fail_if = 3\n[hessian]\n", [], "fail_if must be a list"),
    ("[hessian]\nfail_if = ['hessian.trace > 1']\n", [], "put it at the top of the file"),
    ("[hessian]\nsplit = 'validation'\n", [], "split must be train, test or both"),
    ("[hessian]\n", ["--set", "local_energy.samples=4"], "local_energy is not in the suite"),
    ("[hessian]\n", ["--set", "hessian.top"], "expected ANALYSIS.OPTION=VALUE"),
    ("[hessian]\n", ["--step", "hessian", "--step", "hessian"], "given twice"),
    ("[landscape]\nname = 'a/b'\n", [], "use letters, digits"),
    ("[hessian]\n[local_energy]\n", ["--split", "both"], "suite step hessian analyses one split"),
    ("[hessian]\n[local_energy]\nsigma = '1..0.1'\n", [], "suite step local_energy: --sigma '1..0.1'"),
    ("[hessian]\n[local_energy]\ntarget_error = 2\n", [], "must be in (0, 1]"),
    ("[hessian]\n[local_energy]\nsamples = 1\n", [], "--samples must be at least 2"),
    ("[hessian]\n[landscape]\nrange = '1:-1'\n", [], "suite step landscape: --range 1:-1"),
    ("[hessian]\n[local_entropy]\ngamma = 'abc'\n", [], "suite step local_entropy: --gamma"),
    ("[hessian]\n[local_entropy]\nbeta = '-1'\n", [], "--beta must be positive"),
])
def test_bad_suites_exit_2_before_computing(suite_text, args, message, tmp_path):
    ckpt = _copy(tmp_path, "mlp-sgd.pt")
    r = run_cli(["audit", ckpt, "--suite", _suite(tmp_path, suite_text), *FAST, *args])
    assert_one_line_error(r, 2, message)
    assert not (tmp_path / "mlp-sgd.flatscope.h5").exists()


def test_missing_suite_file_and_missing_checkpoint(tmp_path):
    ckpt = _copy(tmp_path, "mlp-sgd.pt")
    assert_one_line_error(run_cli(["audit", ckpt, "--suite", tmp_path / "nope.toml"]), 2, "suite file not found")
    assert_one_line_error(run_cli(["audit", tmp_path / "nope.pt", "--suite", _suite(tmp_path)]), 2, "not found")


def test_suite_file_without_tomllib_says_what_to_do(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(FlatscopeError, match="Python >= 3.11"):
        au.read_toml(str(_suite(tmp_path)))


# ------------------------------------------------------------------------------------------- the suite
def test_suite_building_defaults_overrides_and_order():
    s = au.load_suite(None)
    assert [st.name for st in s.steps] == ["hessian", "local_energy", "landscape"]
    assert s.steps[0].options == {"top": 3, "density": False, "trace_probes": 30}
    s = au.build_suite({"landscape": {"grid": 9}, "hessian": {"top": 4}}, sets=["hessian.density=true"])
    assert [st.name for st in s.steps] == ["landscape", "hessian"]          # file order
    assert s.steps[1].options == {"top": 4, "density": True, "trace_probes": 30}
    s = au.load_suite(None, only=["local-energy"], sets=["local_energy.sigma=0.01..1:3"])
    assert [st.name for st in s.steps] == ["local_energy"] and s.steps[0].options["sigma"] == "0.01..1:3"
    assert [au.parse_value(v) for v in ("true", "False", "7", "-2", "1e-3", ".5", "0.01..1", "-1:1")] == \
        [True, False, 7, -2, 1e-3, 0.5, "0.01..1", "-1:1"]
    assert au.load_suite(None, compare=True).steps[0].options["density"] is True


def test_plan_uses_the_commands_own_parsers_and_predicts_metric_names(tmp_path):
    ckpt = _copy(tmp_path, "mlp-sgd.pt")
    run = Run(checkpoint=str(ckpt), max_samples=64, threads=1)
    run.setup()
    steps = au.plan(au.load_suite(None).steps, run)
    assert steps[0].params["top"] == 3 and steps[0].params["density"] is False
    assert steps[1].params["sigma_spec"] == "0.01..1:5" and steps[1].params["target_error"] == "0.01"
    assert [s.group for s in steps] == ["hessian", "local_energy", "landscape/random-1d"]
    names = [m for s in steps for m in s.metrics]
    for m in ("hessian.lambda_max", "hessian.trace", "hessian.effective_rank", "local_energy.train_target_sigma",
              "local_energy.train_delta_err_at_sigma_max", "landscape.random-1d.train_loss_max"):
        assert m in names
    assert steps[0].command_line().startswith(f"flatscope hessian {ckpt} ")
    assert run._ckpt is None                      # planning loads nothing


# ------------------------------------------------------------------------------- exit codes and schema
def _check_schema(out: dict) -> None:
    """The documented --json schema of flatscope audit (README: 'JSON schema')."""
    assert set(out) == {"schema", "checkpoint", "checkpoint_sha256", "results", "suite", "verdict", "exit_code",
                        "metrics", "thresholds", "failed", "steps", "seconds"}
    assert out["schema"] == "flatscope.audit/1"
    assert re.fullmatch(r"[0-9a-f]{64}", out["checkpoint_sha256"])
    assert Path(out["checkpoint"]).is_absolute() and Path(out["results"]).is_absolute()
    assert isinstance(out["suite"], str)
    assert out["verdict"] in ("pass", "fail") and out["exit_code"] == (0 if out["verdict"] == "pass" else 1)
    assert isinstance(out["metrics"], dict) and out["metrics"]
    for k, v in out["metrics"].items():
        assert re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)+", k)
        assert v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
    for t in out["thresholds"]:
        assert set(t) == {"threshold", "metric", "op", "bound", "value", "failed", "message"}
        assert t["op"] in ("<", "<=", ">", ">=", "==", "!=") and isinstance(t["failed"], bool)
        assert t["bound"] is None or isinstance(t["bound"], (int, float))
        assert t["value"] is None or isinstance(t["value"], (int, float))
    assert out["failed"] == [t["threshold"] for t in out["thresholds"] if t["failed"]]
    assert (out["verdict"] == "fail") == bool(out["failed"])
    for s in out["steps"]:
        assert set(s) == {"analysis", "group", "cached", "reason", "seconds", "wall_time_s", "command", "options",
                          "warnings"}
        assert s["group"].startswith("/") and s["command"].startswith("flatscope ")
        assert isinstance(s["warnings"], list) and all(isinstance(w, str) for w in s["warnings"])
        assert isinstance(s["cached"], bool) and isinstance(s["options"], dict)
    assert isinstance(out["seconds"], (int, float))


def test_exit_0_json_schema_and_predicted_metric_names(audited):
    _, ckpt, suite, out = audited
    _check_schema(out)
    assert out["verdict"] == "pass" and out["thresholds"] == [] and out["suite"] == str(suite)
    run = Run(checkpoint=str(ckpt), max_samples=64)
    run.setup()
    steps = au.plan(au.load_suite(str(suite)).steps, run)
    assert list(out["metrics"]) == [m for s in steps for m in s.metrics]    # exactly as predicted
    with h5py.File(out["results"], "r") as f:
        for s in out["steps"]:
            g = f[s["group"]]
            assert json.loads(g.attrs["options"]) == s["options"]
            assert g.attrs["checkpoint_sha256"] == out["checkpoint_sha256"]
            summary = json.loads(g.attrs["summary"])
            prefix = s["group"].strip("/").replace("/", ".")
            for k, v in summary.items():
                m = out["metrics"][f"{prefix}.{k}"]
                assert m == (int(v) if isinstance(v, bool) else v)


def test_exit_1_names_value_and_bound_on_stderr(audited):
    _, ckpt, suite, first = audited
    lmax = first["metrics"]["hessian.lambda_max"]
    r, out = _audit(ckpt, suite, "--fail-if", f"hessian.lambda_max > {lmax / 2}",
                    "--fail-if", "hessian.trace < 0", "--fail-if", "landscape.random-1d.train_loss_max >= 1e9")
    assert r.exit_code == 1
    _check_schema(out)
    assert out["verdict"] == "fail" and out["failed"] == [f"hessian.lambda_max > {lmax / 2}"]
    assert [t["failed"] for t in out["thresholds"]] == [True, False, False]
    assert out["thresholds"][0]["value"] == lmax and out["thresholds"][0]["bound"] == lmax / 2
    fails = [ln for ln in r.stderr.splitlines() if ln.startswith("FAIL")]
    assert len(fails) == 1 and f"hessian.lambda_max = {lmax:.6g} > {lmax / 2:g}" in fails[0]
    assert all(s["cached"] for s in out["steps"])                      # nothing recomputed for thresholds
    # the human form: one table, the verdict, exit code 1
    r = run_cli(["audit", ckpt, "--suite", suite, *FAST, "--fail-if", f"hessian.lambda_max > {lmax / 2}"])
    assert r.exit_code == 1 and "verdict: FAIL" in r.stdout and "hessian.lambda_max" in r.stdout
    r = run_cli(["audit", ckpt, "--suite", suite, *FAST, "--fail-if", f"hessian.lambda_max <= {lmax * 2}"])
    assert r.exit_code == 1
    r = run_cli(["audit", ckpt, "--suite", suite, *FAST, "--fail-if", f"hessian.lambda_max > {lmax * 2}"])
    assert r.exit_code == 0 and "verdict: PASS" in r.stdout


def test_a_metric_that_is_not_a_number_fails_its_threshold(audited):
    _, ckpt, suite, first = audited
    assert first["metrics"]["hessian.lambda_min"] is None        # no density and no --bottom: unknown
    r, out = _audit(ckpt, suite, "--fail-if", "hessian.lambda_min < -1")
    assert r.exit_code == 1 and "not a finite number" in out["thresholds"][0]["message"]


# --------------------------------------------------------------------------------------- same groups
def test_a_step_writes_exactly_what_the_command_writes(audited, tmp_path):
    _, ckpt, _, first = audited
    other = tmp_path / "cmd.h5"
    r = run_cli(["hessian", ckpt, "--top", "2", "--trace-probes", "6", "--no-density", *FAST, "-o", other, "--no-plot",
                 "-q"])
    assert r.exit_code == 0, r.stderr
    with h5py.File(first["results"], "r") as fa, h5py.File(other, "r") as fb:
        a, b = fa["hessian"], fb["hessian"]
        assert json.loads(a.attrs["options"]) == json.loads(b.attrs["options"])
        assert set(a.keys()) == set(b.keys())
        for k in ("eigenvalues", "trace", "trace_samples"):
            np.testing.assert_array_equal(a[k][()], b[k][()])


def test_a_group_written_by_the_command_is_reused(tmp_path):
    ckpt = _copy(tmp_path, "mlp-sgd.pt")
    r = run_cli(["hessian", ckpt, "--top", "2", "--trace-probes", "6", "--no-density", *FAST, "--no-plot", "-q"])
    assert r.exit_code == 0, r.stderr
    r, out = _audit(ckpt, _suite(tmp_path, "[hessian]\ntop = 2\ntrace_probes = 6\n"))
    assert r.exit_code == 0 and out["steps"][0]["cached"] is True


def test_optional_local_entropy_step(tmp_path):
    ckpt = _copy(tmp_path, "mlp-sgd.pt")
    suite = _suite(tmp_path, LE_TINY)
    r, out = _audit(ckpt, suite, "--fail-if", "local_entropy.entropy_gap > 1e6")
    assert r.exit_code == 0, r.stderr
    _check_schema(out)
    run = Run(checkpoint=str(ckpt), max_samples=64)
    run.setup()
    steps = au.plan(au.load_suite(str(suite)).steps, run)
    assert list(out["metrics"]) == steps[0].metrics and steps[0].group == "local_entropy"
    assert out["metrics"]["local_entropy.gamma_min"] == 1.0 and out["metrics"]["local_entropy.gamma_max"] == 10.0
    r, again = _audit(ckpt, suite)
    assert again["steps"][0]["cached"] and again["metrics"] == out["metrics"]
    r, again = _audit(ckpt, suite, "--set", "local_entropy.gamma=10,1.0")        # the same grid, written otherwise
    assert again["steps"][0]["cached"]
    r, again = _audit(ckpt, suite, "--set", "local_entropy.chains=3")
    assert not again["steps"][0]["cached"] and "option chains was 2" in again["steps"][0]["reason"]
    assert "local_entropy" not in [s.name for s in au.load_suite(None).steps]          # not in the default suite
    r = run_cli(["audit", ckpt, "--suite", suite, *FAST, "--split", "both"])
    assert_one_line_error(r, 2, "analyses one split")


# -------------------------------------------------------------------------------------------- caching
def _steps(out) -> dict:
    return {s["analysis"]: s for s in out["steps"]}


def test_cache_reused_only_for_same_checkpoint_and_options(tmp_path):
    ckpt = _copy(tmp_path, "mlp-sgd.pt")
    suite = _suite(tmp_path)
    r, first = _audit(ckpt, suite)
    assert r.exit_code == 0 and not any(s["cached"] for s in first["steps"])
    h5 = Path(first["results"])
    stamp = {}
    with h5py.File(h5, "r") as f:
        for s in first["steps"]:
            stamp[s["group"]] = f[s["group"]].attrs["timestamp"]

    r, again = _audit(ckpt, suite)                                   # same: everything reused
    assert all(s["cached"] and s["reason"] == "same checkpoint and options" for s in again["steps"])
    assert again["metrics"] == first["metrics"]

    r, changed = _audit(ckpt, suite, "--set", "hessian.top=3")       # one option changed: that step only
    st = _steps(changed)
    assert not st["hessian"]["cached"] and "option top was 2" in st["hessian"]["reason"]
    assert st["local_energy"]["cached"] and st["landscape"]["cached"]
    r, changed = _audit(ckpt, suite, "--set", "hessian.top=3", "--set", "local_energy.sigma=0.1,0.5")
    st = _steps(changed)
    assert st["hessian"]["cached"] and not st["local_energy"]["cached"] and "option sigma" in st["local_energy"]["reason"]
    # the same σ written another way is the same option
    r, same = _audit(ckpt, suite, "--set", "hessian.top=3", "--set", "local_energy.sigma=0.5,0.1")
    assert _steps(same)["local_energy"]["cached"]
    # options that only choose how the numbers are computed do not count
    r, same = _audit(ckpt, suite, "--set", "hessian.top=3", "--set", "local_energy.sigma=0.5,0.1",
                     "--set", "local_energy.chunk=1", "--set", "landscape.batching=loop")
    assert _steps(same)["local_energy"]["cached"] and _steps(same)["landscape"]["cached"]

    # shared options: seed, sample subset
    r, out = _audit(ckpt, suite, "--seed", "1")
    assert not any(s["cached"] for s in out["steps"]) and "seed was 0" in out["steps"][0]["reason"]
    r = run_cli(["audit", ckpt, "--suite", suite, "--seed", "1", "--max-samples", "32", "--threads", "1", "--json"])
    out = json.loads(r.stdout)
    assert not any(s["cached"] for s in out["steps"]) and "max_samples" in out["steps"][0]["reason"]

    # another checkpoint at the same path (same results file): refused, since the file would then hold
    # analyses of two checkpoints; with --allow-mixed everything is recomputed
    shutil.copy(SAMPLES / "mlp-esgd.pt", ckpt)
    r, refused = _audit(ckpt, suite)
    assert r.exit_code == 2 and refused is None and "holds analyses of another checkpoint" in r.stderr
    r, other = _audit(ckpt, suite, "--allow-mixed")
    assert r.exit_code == 0
    assert all(not s["cached"] and "sha256 differs" in s["reason"] for s in other["steps"])
    assert other["checkpoint_sha256"] != first["checkpoint_sha256"]
    assert other["metrics"]["hessian.lambda_max"] != first["metrics"]["hessian.lambda_max"]

    r, forced = _audit(ckpt, suite, "--recompute")
    assert all(not s["cached"] and s["reason"] == "--recompute" for s in forced["steps"])
    assert forced["metrics"] == other["metrics"]                    # deterministic: same numbers


def test_unfinished_landscape_is_not_reused(tmp_path):
    ckpt = _copy(tmp_path, "mlp-sgd.pt")
    suite = _suite(tmp_path, "[landscape]\ngrid = 5\n")
    r, first = _audit(ckpt, suite)
    with h5py.File(first["results"], "r+") as f:
        f["landscape/random-1d/done"][2] = False
    _, out = _audit(ckpt, suite)
    assert not out["steps"][0]["cached"] and "not finished" in out["steps"][0]["reason"]


# -------------------------------------------------------------------------------------------- compare
class _Spy:
    """Records the random inputs each analysis draws, per checkpoint (in call order)."""

    def __init__(self):
        self.noise, self.probes = [], []

    def draw_normal(self, real):
        def f(seed, start, stop, dim, dtype=torch.float64):
            z = real(seed, start, stop, dim, dtype)
            self.noise.append(z.clone())
            return z
        return f

    def first_input(self, real, what):
        def f(matvec, dim, *args, **kw):
            seen = []

            def mv(V):
                if not seen:
                    seen.append(V.detach().clone())
                    self.probes.append((what, seen[0]))
                return matvec(V)
            return real(mv, dim, *args, **kw)
        return f


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    a, b = _copy(tmp, "mlp-sgd.pt"), _copy(tmp, "mlp-esgd.pt")
    suite = _suite(tmp, TINY.replace("[hessian]\n", "[hessian]\ndensity = true\nprobes = 2\nsteps = 10\n")
                   + LE_TINY)
    spy = _Spy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(le_mod, "draw_normal", spy.draw_normal(le_mod.draw_normal))
        for name in ("lanczos", "slq", "trace"):
            mp.setattr(hess_mod, name, spy.first_input(getattr(hess_mod, name), name))
        r = run_cli(["compare", a, b, "-o", tmp / "report", "--suite", suite, *FAST, "--interp-grid", "5", "--json"])
    assert r.exit_code == 0, r.stderr
    return tmp, (a, b), json.loads(r.stdout), spy


def test_compare_shares_the_raw_landscape_direction_normalized_per_checkpoint(compared):
    _, (a, b), out, _ = compared
    assert [c["label"] for c in out["checkpoints"]] == ["mlp-sgd", "mlp-esgd"]
    seed = out["seed"]
    stored, ws = [], []
    for c, path in zip(out["checkpoints"], (a, b)):
        with h5py.File(c["results"], "r") as f:
            stored.append(torch.as_tensor(f["landscape/random-1d/directions/vectors"][()], dtype=torch.float64)[0])
        model = load_checkpoint(str(path)).model
        layout = ParamLayout.of(model)
        ws.append(layout.flatten({n: p.detach() for n, p in model.named_parameters()}).to(torch.float64))
    # the one raw Gaussian draw of random_directions (generator seeded by --seed), normalized per checkpoint
    raw = torch.randn(1, layout.size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)[0]
    for d, w in zip(stored, ws):
        expect = normalize_direction(raw, w, layout, "filter", "zero").to(torch.float32).to(torch.float64)
        assert torch.equal(d, expect)
    assert not torch.equal(stored[0], stored[1])           # normalized against different weights
    # observable consequence: every filter of the two directions points the same way
    for sl, shape in zip(layout.slices().values(), layout.shapes):
        if len(shape) < 2:
            continue
        u = [d[sl].view(shape[0], -1) for d in stored]
        u = [x / x.norm(dim=1, keepdim=True) for x in u]
        torch.testing.assert_close(u[0], u[1], rtol=0, atol=1e-6)


def test_compare_uses_the_same_noise_draws_and_probes_for_every_checkpoint(compared):
    _, _, out, spy = compared
    n = len(spy.noise)
    assert n >= 2 and n % 2 == 0
    first, second = spy.noise[: n // 2], spy.noise[n // 2:]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    m = len(spy.probes)
    assert [w for w, _ in spy.probes[: m // 2]] == ["lanczos", "slq", "trace"]
    assert all(wa == wb and torch.equal(x, y) for (wa, x), (wb, y) in zip(spy.probes[: m // 2], spy.probes[m // 2:]))
    # and the σ grid, draw count and options are the same
    mine = ("checkpoints", "checkpoint_sha256")      # the landscape records which checkpoint it sliced
    opts = [{s["analysis"]: {k: v for k, v in s["options"].items() if k not in mine} for s in c["steps"]}
            for c in out["checkpoints"]]
    assert opts[0] == opts[1]


def test_compare_json_table_interpolation_and_self_contained_report(compared):
    _, _, out, _ = compared
    assert out["schema"] == "flatscope.compare/1" and set(out) == {
        "schema", "report", "seed", "checkpoints", "metrics", "interpolations", "plots", "warnings"}
    assert out["warnings"] == []
    assert set(out["metrics"]["hessian.lambda_max"]) == {"mlp-sgd", "mlp-esgd"}
    for c in out["checkpoints"]:
        assert set(c) == {"label", "checkpoint", "checkpoint_sha256", "results", "steps"}
    (it,) = out["interpolations"]
    assert (it["from"], it["to"], it["group"]) == ("mlp-sgd", "mlp-esgd", "/landscape/mlp-sgd..mlp-esgd")
    assert it["summary"]["train_barrier"] >= 0 and it["distance"] > 0
    with h5py.File(it["results"], "r") as f:
        opts = json.loads(f[it["group"]].attrs["options"])
    assert opts["checkpoint_sha256"] == [c["checkpoint_sha256"] for c in out["checkpoints"]]
    page = Path(out["report"]).read_text()
    assert re.search(r"(src|href)=\"(?!data:)", page) is None and "http" not in page.replace("http-equiv", "")
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(imgs) == len(out["plots"]) >= 6   # eigenvalues, density, δE, slice, F(γ), interpolation
    assert any("overlay.local_entropy" in p for p in out["plots"])
    assert all(base64.b64decode(x)[:8] == b"\x89PNG\r\n\x1a\n" for x in imgs)
    for text in ("mlp-sgd", "mlp-esgd", "hessian.lambda_max", "local_energy.train_target_sigma",
                 "Interpolations", "Provenance", out["checkpoints"][0]["checkpoint_sha256"][:16]):
        assert text in page


def test_compare_reuses_cached_results(compared):
    tmp, (a, b), first, _ = compared
    r = run_cli(["compare", a, b, "-o", tmp / "report2", "--suite", tmp / "suite.toml", *FAST,
                 "--interp-grid", "5", "--json", "--step", "hessian", "--step", "landscape"])
    out = json.loads(r.stdout)
    assert [s["analysis"] for s in out["checkpoints"][0]["steps"]] == ["hessian", "landscape"]
    assert all(s["cached"] for c in out["checkpoints"] for s in c["steps"])
    assert out["metrics"] == {k: v for k, v in first["metrics"].items() if k.startswith(("hessian.", "landscape."))}
    # interpolations live in the report folder: a new folder computes them again, the same folder reuses them
    assert not out["interpolations"][0]["cached"]
    r = run_cli(["compare", a, b, "-o", tmp / "report2", "--suite", tmp / "suite.toml", *FAST,
                 "--interp-grid", "5", "--json", "--step", "hessian"])
    assert json.loads(r.stdout)["interpolations"][0]["cached"]


def test_compare_bad_input(tmp_path):
    a = _copy(tmp_path, "mlp-sgd.pt")
    assert_one_line_error(run_cli(["compare", a, "-o", tmp_path / "r"]), 2, "at least two")
    assert_one_line_error(run_cli(["compare", a, a, "-o", tmp_path / "r"]), 2, "given twice")
    (tmp_path / "file").write_text("x")
    b = _copy(tmp_path, "mlp-esgd.pt")
    assert_one_line_error(run_cli(["compare", a, b, "-o", tmp_path / "file"]), 2, "not a folder")
    assert_one_line_error(run_cli(["compare", a, b, "-o", tmp_path / "r", "--set", "hessian.topp=1"]), 2,
                          "unknown option")
    assert_one_line_error(run_cli(["compare", a, b, "-o", tmp_path / "r", "--interp-range", "1:0"]), 2,
                          "--range 1:0")
    assert not (tmp_path / "r").exists()


def test_compare_of_different_architectures_warns_and_skips_interpolation(tmp_path):
    a, b = _copy(tmp_path, "mlp-sgd.pt"), _copy(tmp_path, "cnn-sgd.pt")
    r = run_cli(["compare", a, b, "-o", tmp_path / "r", "--step", "hessian", "--set", "hessian.top=1",
                 "--set", "hessian.density=false", "--set", "hessian.trace_probes=4", *FAST, "--json"])
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["interpolations"] == [] and "different parameter layouts" in out["warnings"][0]
    assert "Warning: the checkpoints have different parameter layouts" in r.stderr


def test_report_renders_in_headless_chromium(compared, tmp_path):
    """Runs scripts/render_report.sh; skipped when no Chromium is installed (apt-get install chromium)."""
    if not (shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")):
        pytest.skip("no chromium installed")
    _, _, out, _ = compared
    shot = tmp_path / "shot.png"
    p = subprocess.run(["bash", str(ROOT / "scripts" / "render_report.sh"), out["report"], str(shot), "1000x5000"],
                       capture_output=True, text=True, timeout=180, check=False)
    assert p.returncode == 0, p.stderr
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert img.shape[:2] == (5000, 1000)
    ink = (img[..., :3] < 0.5).any(axis=-1).mean()
    assert 0.005 < ink < 0.5                                     # text and plots drawn, not a blank page
    colour = (np.ptp(img[..., :3], axis=-1) > 0.3).mean()
    assert colour > 1e-3                                          # coloured plot lines: images displayed


def test_cache_keys_on_label_smoothing_and_not_on_the_hvp_mode(tmp_path):
    ckpt = _copy(tmp_path, "mlp-sgd.pt")
    suite = _suite(tmp_path, "[hessian]\ntop = 2\ntrace_probes = 6\n")
    r, first = _audit(ckpt, suite)
    assert r.exit_code == 0 and not first["steps"][0]["cached"]
    r, smooth = _audit(ckpt, suite, "--label-smoothing", "0.1")       # changes the loss: recomputed
    assert not smooth["steps"][0]["cached"] and "label_smoothing" in smooth["steps"][0]["reason"]
    assert smooth["metrics"]["hessian.lambda_max"] != first["metrics"]["hessian.lambda_max"]
    r, again = _audit(ckpt, suite, "--label-smoothing", "0.1", "--hvp", "double-backward")
    assert again["steps"][0]["cached"]                                 # equal up to rounding: reused
    r, back = _audit(ckpt, suite)                                      # smoothing gone: recomputed again
    assert not back["steps"][0]["cached"] and back["metrics"]["hessian.lambda_max"] == pytest.approx(
        first["metrics"]["hessian.lambda_max"], rel=1e-9)
