"""The option declarations of :mod:`flatscope.options`: one source for the commands, the audit and its cache.

What is proven here:

- each analysis command's click options are exactly its declarations (flags, defaults, types, choices,
  bounds, help), and the choices equal the tuples the analysis modules check against;
- a suite value is converted as the command line converts it, and a bad one names the step and the option;
- the options declared ``result=True`` are exactly the step options the audit's cache compares (or that
  name the group it reads); the others only choose how the numbers are computed;
- no module below ``flatscope/cli/`` imports click, and the audit does not import the CLI;
- a result reused from the results file still reports the warnings stored with it (audit ``--json``,
  compare ``--json`` and its HTML report).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import click
import pytest

from conftest import run_cli
from flatscope import audit as au
from flatscope import options as fo
from flatscope.errors import FlatscopeError

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"
FAST = ["--max-samples", "64", "--threads", "1"]


def _command(name: str) -> click.Command:
    from flatscope.cli import main

    return main.get_command(click.Context(main), name.replace("_", "-"))


def test_choices_agree_with_the_analysis_modules():
    from flatscope import directions, linalg
    from flatscope.analyses import landscape, local_energy, local_entropy, sharpness

    assert fo.TRACE_METHODS == linalg.TRACE_METHODS
    assert (fo.NOISES, fo.BN_MODES, fo.BATCHED, fo.DEFAULT_SIGMA) == (
        local_energy.NOISES, local_energy.BN_MODES, local_energy.BATCHED, local_energy.DEFAULT_SIGMA)
    assert (fo.BATCHING, fo.BN_MODES) == (landscape.BATCHING, landscape.BN_MODES)
    assert (fo.NORMALIZATIONS, fo.BIAS_BN) == (directions.NORMALIZATIONS, directions.BIAS_BN)
    assert (fo.SHARPNESS_NORMS, fo.AVERAGES, fo.DEFAULT_RHO) == (sharpness.NORMS, sharpness.AVERAGES,
                                                                 sharpness.DEFAULT_RHO)
    assert fo.FULL_BATCH_MAX_SAMPLES == local_entropy.FULL_BATCH_MAX_SAMPLES


@pytest.mark.parametrize("analysis", sorted(fo.SCHEMAS))
def test_each_command_is_built_from_its_declarations(analysis):
    cmd = _command(analysis)
    params = {p.name: p for p in cmd.params if isinstance(p, click.Option)}
    for o in fo.SCHEMAS[analysis]:
        p = params[o.param]
        assert p.opts[0] == o.flag and tuple(p.opts[1:]) == o.aliases, o.name
        assert p.default == o.default and p.help == o.help, o.name
        if o.type == "bool":
            assert p.is_flag and p.secondary_opts == ([o.off] if o.off else [])
        elif o.type == "choice":
            assert tuple(p.type.choices) == o.choices
        elif o.type in ("int", "float"):
            assert getattr(p.type, "min", None) == o.minimum
            assert p.type.name.startswith(o.type)
        else:
            assert p.type is click.STRING
    # the command has no option of its own that the declarations miss (the rest are the shared ones)
    from flatscope.shared_options import ANALYSIS_KEYS, COMMON_KEYS

    own = set(params) - set(COMMON_KEYS) - set(ANALYSIS_KEYS)
    assert own == {o.param for o in fo.SCHEMAS[analysis]}


def test_suite_values_are_converted_like_the_command_line():
    top, sigma, density, trace, ppc = (fo.by_name(s)[n] for s, n in (
        (fo.HESSIAN, "top"), (fo.LOCAL_ENERGY, "sigma"), (fo.HESSIAN, "density"), (fo.HESSIAN, "trace_method"),
        (fo.LANDSCAPE, "points_per_call")))
    assert top.convert(3, "s") == 3 and top.convert("3", "s") == 3
    assert sigma.convert([0.1, 1], "s") == "0.1,1" and sigma.convert(0.5, "s") == "0.5"
    assert density.convert(False, "s") is False
    for opt, value, message in [
        (top, "abc", "s: invalid value for --top: 'abc' is not a valid integer"),
        (top, 2.5, "is not a valid integer"),
        (top, True, "s: option top takes a value, not true"),
        (top, 2**60, "too large"),
        (density, 1, "s: option density is a switch"),
        (trace, "exact", "'exact' is not one of 'hutch++', 'hutchinson'"),
        (ppc, 0, "--points-per-call: 0 is not in the range x>=1"),
        (sigma, [], "a list must hold numbers or strings"),
        (fo.by_name(fo.HESSIAN)["tol"], float("nan"), "not a finite number"),
    ]:
        with pytest.raises(FlatscopeError, match=re.escape(message)):
            opt.convert(value, "s")


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    from flatscope.cli.common import Run

    tmp = tmp_path_factory.mktemp("opts")
    ckpt = tmp / "mlp-sgd.pt"
    shutil.copy(SAMPLES / "mlp-sgd.pt", ckpt)
    run = Run(checkpoint=str(ckpt), max_samples=64, threads=1)
    run.setup()
    steps = [au.Step(a, dict(a.defaults)) for a in au.ANALYSES.values()]
    return run, au.plan(steps, run)


def test_the_cache_compares_exactly_the_result_options(planned):
    run, steps = planned
    target = au.Target(run)
    for step in steps:
        keys = set(step.analysis.expected(step, target)) | {"group"}
        declared = [o for o in step.analysis.options if o.audit]
        keyed_as = getattr(step.analysis.step, "KEYED_AS", {})     # e.g. the landscape's 2d is stored as dims
        assert {keyed_as.get(o.name, o.name) for o in declared if o.result} <= keys, step.name
        assert not {o.name for o in declared if not o.result} & keys, step.name


def test_the_library_does_not_import_click_or_the_cli():
    offenders = []
    for path in (ROOT / "flatscope").rglob("*.py"):
        if "cli" in path.relative_to(ROOT / "flatscope").parts or path.name == "__main__.py":  # the CLI's own
            continue
        text = path.read_text(encoding="utf-8")
        if re.search(r"^\s*(import click|from click)", text, re.M) or re.search(
                r"^\s*(from \.+cli\b|import flatscope\.cli|from flatscope\.cli)", text, re.M):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


# ----------------------------------------------------------------------------- warnings of reused results
UNREACHED = '[local_energy]\nsigma = "0.0001,0.0002"\nsamples = 2\ntarget_error = 0.5\n'


def test_a_reused_result_still_reports_its_stored_warnings(tmp_path):
    ckpt = tmp_path / "mlp-sgd.pt"
    shutil.copy(SAMPLES / "mlp-sgd.pt", ckpt)
    suite = tmp_path / "suite.toml"
    suite.write_text(UNREACHED)
    outs = []
    for _ in range(2):
        r = run_cli(["audit", ckpt, "--suite", suite, *FAST, "--json"])
        assert r.exit_code == 0, r.stderr
        outs.append(json.loads(r.stdout))
    first, again = (o["steps"][0] for o in outs)
    assert not first["cached"] and again["cached"]
    assert len(first["warnings"]) == 1 and "never rose by 0.5" in first["warnings"][0]
    assert again["warnings"] == first["warnings"]                  # reused, and still qualified


def test_compare_reports_stored_warnings_next_to_the_metrics(tmp_path):
    a, b = tmp_path / "mlp-sgd.pt", tmp_path / "mlp-esgd.pt"
    shutil.copy(SAMPLES / "mlp-sgd.pt", a)
    shutil.copy(SAMPLES / "mlp-esgd.pt", b)
    suite = tmp_path / "suite.toml"
    suite.write_text(UNREACHED)
    args = ["compare", a, b, "--suite", suite, "--no-interp", *FAST, "-o", tmp_path / "report", "--json"]
    outs = []
    for _ in range(2):
        r = run_cli(args)
        assert r.exit_code == 0, r.stderr
        outs.append(json.loads(r.stdout))
    steps = [c["steps"][0] for c in outs[1]["checkpoints"]]
    assert all(s["cached"] and "never rose by 0.5" in s["warnings"][0] for s in steps)
    page = Path(outs[1]["report"]).read_text()
    # the warnings row follows the group's last metric row, one cell per checkpoint
    rows = re.findall(r"<tr>(.*?)</tr>", page, re.S)
    i = next(k for k, row in enumerate(rows) if "warnings of /local_energy" in row)
    assert "local_energy." in rows[i - 1] and rows[i].count("never rose by 0.5") == 2
    assert not any(row.startswith("<td><code>local_energy.") for row in rows[i + 1:])
