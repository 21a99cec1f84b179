"""Rough edges a new user hit (issue 17, section 3): what show prints, warnings kept with their numbers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import pytest

from conftest import assert_one_line_error

from flatscope import results as store

ROOT = Path(__file__).resolve().parents[1]



def _write_group(path, name="local_entropy", summary=None, warnings=None, checkpoint="runs/a.pt"):
    with store.update(str(path)) as f:
        store.write_analysis(f, name, {"x": 1.0}, kind=name, summary=summary or {}, options={},
                             provenance={"checkpoint": checkpoint, "checkpoint_sha256": "ab" * 32, "seed": 0},
                             warnings=warnings)


def test_show_prints_missing_values_as_dash_and_the_checkpoint(cli, tmp_path):
    p = tmp_path / "r.h5"
    _write_group(p, summary={"min_accept_rate": None, "max_rhat": 1.002, "n_warnings": 0})
    res = cli(["show", p])
    assert res.exit_code == 0, res.stderr
    assert "None" not in res.stdout
    line = next(ln for ln in res.stdout.splitlines() if "min_accept_rate" in ln)
    assert line.split() == ["min_accept_rate", "-"]
    assert "checkpoint runs/a.pt  (sha256 abababababab...)" in res.stdout


def test_show_lists_the_stored_warnings_of_each_group(cli, tmp_path):
    p = tmp_path / "r.h5"
    _write_group(p, name="local_entropy", summary={"n_warnings": 1}, warnings=["gamma=0.1: ESS 90 < 400"])
    _write_group(p, name="hessian", summary={"lambda_max": 1.0}, warnings=[], checkpoint="runs/b.pt")
    res = cli(["show", p])
    assert res.exit_code == 0, res.stderr
    blocks = res.stdout.split("  /")
    le = next(b for b in blocks if b.startswith("local_entropy"))
    he = next(b for b in blocks if b.startswith("hessian"))
    assert "warning: gamma=0.1: ESS 90 < 400" in le and "warning" not in he
    assert "runs/b.pt" in he and "runs/a.pt" in le
    payload = json.loads(cli(["show", p, "--json"]).stdout)
    assert payload["analyses"]["local_entropy"]["warnings"] == ["gamma=0.1: ESS 90 < 400"]
    assert payload["analyses"]["hessian"]["warnings"] == []


def test_a_commands_warnings_are_stored_with_its_group(cli, samples, tmp_path):
    """local-energy warns that the target error is never reached; the warning is kept in /local_energy."""
    ck = tmp_path / "mlp.pt"
    shutil.copy(samples / "mlp-sgd.pt", ck)
    out = tmp_path / "le.h5"
    res = cli(["local-energy", ck, "--sigma", "0.01,0.02", "--samples", "2", "--max-samples", "64",
               "--target-error", "0.5", "--no-plot", "--threads", "1", "-o", out])
    assert res.exit_code == 0, res.stderr
    assert "never rose" in res.stderr
    with h5py.File(out) as f:
        stored = store.stored_warnings(f["local_energy"])
    assert len(stored) == 1 and "never rose by 0.5" in stored[0]
    shown = cli(["show", out]).stdout
    assert "warning: train: the error rate never rose by 0.5" in shown


def test_stored_warnings_reads_old_and_foreign_formats(tmp_path):
    with h5py.File(tmp_path / "w.h5", "w") as f:
        a, b, c = f.create_group("a"), f.create_group("b"), f.create_group("c")
        b.attrs["warnings"] = json.dumps([{"message": "m1", "epoch": 2}, "m2"])
        c.attrs["warnings"] = "not json"
        assert store.stored_warnings(a) == []
        assert store.stored_warnings(b) == ["m1", "m2"]
        assert store.stored_warnings(c) == ["not json"]


def _le(ck, out, *extra):
    return ["local-energy", ck, "--sigma", "0.1", "--samples", "2", "--max-samples", "32", "--no-plot",
            "--threads", "1", "-o", out, *extra]


def test_a_results_file_refuses_another_checkpoint_unless_allow_mixed(cli, samples, tmp_path):
    a, b, out = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "r.h5"
    shutil.copy(samples / "mlp-sgd.pt", a)
    shutil.copy(samples / "mlp-esgd.pt", b)
    assert cli(_le(a, out)).exit_code == 0
    before = out.read_bytes()
    line = assert_one_line_error(cli(_le(b, out)), contains="holds analyses of another checkpoint")
    assert "--allow-mixed" in line and str(a) in line
    assert out.read_bytes() == before                       # nothing written
    assert cli(_le(a, out)).exit_code == 0                   # the same checkpoint again is fine
    res = cli(_le(b, out, "--allow-mixed"))
    assert res.exit_code == 0, res.stderr
    with h5py.File(out) as f:
        assert str(f["local_energy"].attrs["checkpoint"]).endswith("b.pt")


def test_compare_results_dir_names_files_by_checkpoint(cli, samples, tmp_path):
    """Two checkpoints with the same stem get two results files in --results-dir, never one mixed file."""
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a, b = tmp_path / "x" / "mlp.pt", tmp_path / "y" / "mlp.pt"
    shutil.copy(samples / "mlp-sgd.pt", a)
    shutil.copy(samples / "mlp-esgd.pt", b)
    rd = tmp_path / "res"
    rd.mkdir()
    res = cli(["compare", a, b, "--results-dir", rd, "--step", "local_energy", "--set", "local_energy.samples=2",
               "--set", "local_energy.sigma=0.1", "--no-interp", "--max-samples", "32", "--threads", "1",
               "-o", tmp_path / "report", "-q"])
    assert res.exit_code == 0, res.stderr
    files = sorted(p.name for p in rd.glob("*.flatscope.h5"))
    assert len(files) == 2, files
    shas = set()
    for name in files:
        with h5py.File(rd / name) as f:
            shas |= {str(g.attrs["checkpoint_sha256"]) for _, g in store.find_analyses(f)}
            assert name.split(".")[1] == str(f["local_energy"].attrs["checkpoint_sha256"])[:8]
    assert len(shas) == 2


LAZY = """
import sys
sys.argv = ["flatscope"] + sys.argv[1:]
import flatscope.cli as cli
try:
    cli.main()
except SystemExit as exc:
    code = exc.code
print("torch imported" if "torch" in sys.modules else "torch not imported", code, file=sys.stderr)
"""


@pytest.mark.parametrize("args, code", [
    (["--help"], 0), (["--version"], 0), ([], 0), (["no-such-command"], 2),
    # every analysis command's --help and usage errors too: their options are declared without torch
    (["hessian", "--help"], 0), (["local-energy", "--help"], 0), (["landscape", "--help"], 0),
    (["local-entropy", "--help"], 0), (["sharpness", "--help"], 0), (["audit", "--help"], 0),
    (["hessian", "ckpt.pt", "--top", "x"], 2), (["local-energy", "ckpt.pt", "--noise", "loud"], 2),
    (["audit", "ckpt.pt", "--step", "nothing"], 2),
])
def test_help_version_and_unknown_commands_do_not_import_torch(args, code):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", LAZY, *args], capture_output=True, text=True, timeout=300,
                       check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stderr.strip().splitlines()[-1] == f"torch not imported {code}", p.stderr
    if args == ["--help"]:
        # the command list still has every command with its one-line summary
        for name in ("audit", "compare", "hessian", "landscape", "local-energy", "local-entropy", "train"):
            assert any(ln.split()[:1] == [name] and len(ln.split()) > 1 for ln in p.stdout.splitlines()), p.stdout
    if args == ["--version"]:
        assert "flatscope, version" in p.stdout


def test_help_lists_the_same_summaries_as_the_commands_themselves():
    """The summaries read from source equal click's own short help of each imported command."""
    import click

    from flatscope.cli import _short_help, main

    ctx = click.Context(main)
    for name in main.list_commands(ctx):
        cmd = main.get_command(ctx, name)
        text = _short_help(name, 60)   # None: not `def command` with a docstring (--help then imports it)
        assert text is None or text == cmd.get_short_help_str(60), name


def test_default_threads_takes_only_idle_cores(monkeypatch):
    from flatscope.threads import choose_threads, default_threads

    assert default_threads(2, cores=2, load=0.0) == 2          # idle: torch's default
    assert default_threads(2, cores=2, load=0.9) == 1          # one core busy (0.9 rounds to one)
    assert default_threads(2, cores=2, load=17.0) == 1         # far more work than cores: one thread
    assert default_threads(8, cores=16, load=3.0) == 8         # never above torch's default
    assert default_threads(16, cores=4, load=1.0) == 3         # nor above the usable cores, less the busy one
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert choose_threads(3, 2) == 3                           # --threads is obeyed
    assert 1 <= choose_threads(None, 2) <= 2
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert choose_threads(None, 2) is None                     # OMP_NUM_THREADS rules (torchrun sets it)
    assert choose_threads(1, 2) == 1


def test_commands_set_the_chosen_thread_count(cli, samples, tmp_path, monkeypatch):
    import torch

    import flatscope.cli.common as common

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(common, "choose_threads", lambda requested, torch_default: requested or 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cli(["info", samples / "mlp-sgd.pt", "--json"]).exit_code == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_plot_subjects_name_checkpoint_and_split():
    from flatscope.plotting import subject

    assert subject([("mlp-sgd", {"options": '{"split": "train"}'})]) == "mlp-sgd, train split"
    assert subject([("cnn", {"options": '{"split": "both"}'})]) == "cnn, train and test splits"
    two = [("a", {"options": '{"split": "test"}'}), ("b", {"options": '{"split": "test"}'})]
    assert subject(two) == "a vs b, test split"


def test_plots_carry_their_subject_and_readable_axes(cli, samples, tmp_path, monkeypatch):
    """Every figure is titled with checkpoint and split; σ axes have no overlapping minor labels;
    a non-square 2-D slice is drawn to scale."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    from flatscope.plotting import render_group

    ck = tmp_path / "mlp.pt"
    shutil.copy(samples / "mlp-sgd.pt", ck)
    out = tmp_path / "r.h5"
    assert cli(_le(ck, out, "--sigma", "0.05..0.8:5", "--noise", "filter")).exit_code == 0
    res = cli(["landscape", ck, "--2d", "--range", "-1:1,-0.5:0.5", "--grid", "5,3", "--no-plot", "--threads", "1",
               "-o", out])
    assert res.exit_code == 0, res.stderr
    figs = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figs.append(self), real(self, *a, **k))[1])
    render_group(str(out), "local_energy")
    render_group(str(out), "landscape/random-2d")
    assert len(figs) == 3                                       # curves, contour, surface
    assert all(f._suptitle is not None and f._suptitle.get_text() == "mlp, train split" for f in figs)
    le_axes = figs[0].axes
    assert all(isinstance(ax.xaxis.get_minor_formatter(), NullFormatter) for ax in le_axes)
    contour = [ax for ax in figs[1].axes if ax.get_title().startswith("train")]
    assert contour and all(ax.get_aspect() == 1.0 for ax in contour)
    surface = figs[2].axes[0]
    assert surface.get_xlabel() == "x (direction 1)" and surface.get_ylabel() == "y (direction 2)"
