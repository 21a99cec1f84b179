"""Analyses and training under torch.distributed equal one process (gloo, 2 CPU processes).

One pair of spawned processes joins a gloo group and runs every command of ``JOBS`` through the
CLI (``Run.setup`` finds the group and ``Run.objective`` shards, exactly as under torchrun); the
test process runs the same commands alone. Rank 1 must print nothing and write nothing (its
writers are replaced by ones that fail). Starting processes costs seconds on this machine, so one
spawn serves all the tests of this file.

Tolerances: ``--parallel data`` sums each loss, gradient and HVP over shards, so it differs from one
process by float32 rounding of the sums: 1e-5 relative (the issue's figure). ``--parallel points``
evaluates the same chunks as one process with the whole data on every rank: bit for bit equal.
rSGD with replicas on ranks is bit for bit equal (the all-reduced matrices are zero off a rank's own
rows, so the sums round nothing); data-parallel eSGD in float64 to 1e-10 (summation order).
"""

import datetime
import json
import os
import socket

import h5py
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import SAMPLES

MLP = str(SAMPLES / "mlp-sgd.pt")
COMMON = ["--threads", "1", "--json", "-q"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jobs(d: str) -> list[tuple[str, list[str], int]]:
    """(name, CLI arguments, expected exit code); results go to files under ``d``."""
    an = ["--max-samples", "301", "--no-plot"] + COMMON
    le = ["local-energy", MLP, "--sigma", "0.05,0.3", "--samples", "6", "--chunk", "2", "--split", "both",
          "--target-error", "0.05"] + an
    rsgd = ["train", "--data", "digits", "--opt", "rsgd", "--batch-size", "32", "--seed", "3", "--momentum", "0.5"]
    return [
        ("hessian", ["hessian", MLP, "--top", "3", "--no-density", "--trace-probes", "12", "--tol", "1e-4",
                     "-o", f"{d}/h.h5"] + an, 0),
        ("le_data", le + ["-o", f"{d}/le_data.h5"], 0),
        ("le_points", le + ["--parallel", "points", "-o", f"{d}/le_points.h5"], 0),
        # 1025 samples: shards of 513 and 512 straddle the auto rule's 512 (loop vs vmap): rank 0 decides
        ("ls_data", ["landscape", MLP, "--grid", "9", "--max-samples", "1025", "--no-plot", "-o", f"{d}/ls_data.h5"]
         + COMMON, 0),
        ("ls_points", ["landscape", MLP, "--2d", "--grid", "5", "--points-per-call", "3", "--resume",
                       "--parallel", "points", "--max-samples", "301", "--no-plot", "-o", f"{d}/ls_points.h5"]
         + COMMON, 0),
        ("rsgd_mlp", rsgd + ["--model", "mlp", "--model-kwargs", '{"widths": [16]}', "--replicas", "2",
                             "--budget", "60", "-o", f"{d}/rsgd_mlp.pt"] + COMMON, 0),
        ("rsgd_resnet", rsgd + ["--model", "resnet", "--model-kwargs", '{"width": 2}', "--replicas", "3",
                                "--budget", "12", "-o", f"{d}/rsgd_resnet.pt"] + COMMON, 0),
        ("esgd", ["train", "--data", "digits", "--opt", "esgd", "--model", "mlp", "--model-kwargs",
                  '{"widths": [16]}', "--dtype", "float64", "--batch-size", "33", "--budget", "25",
                  "--inner-steps", "5", "--lr", "1", "--seed", "1", "-o", f"{d}/esgd.pt"] + COMMON, 0),
        ("sgd_refused", ["train", "--opt", "sgd", "--budget", "2", "-o", f"{d}/sgd.pt"] + COMMON, 2),
        ("replicas_refused", rsgd + ["--replicas", "1", "--budget", "2", "-o", f"{d}/r1.pt"] + COMMON, 2),
    ]


def _single_args(args: list[str]) -> list[str]:
    """The one-process reference of a job: the same command writing beside it."""
    out = list(args)
    i = out.index("-o")
    root, ext = os.path.splitext(out[i + 1])
    out[i + 1] = root + "-single" + ext
    return [a for a in out if a != "--resume"]


def _forbid_writes() -> None:
    """Rank 1 must not write: make every writer fail loudly."""
    import flatscope.checkpoint
    import flatscope.cli.commands.train
    import flatscope.results
    import flatscope.training

    def refuse(*a, **k):
        raise AssertionError("a rank other than 0 tried to write")

    flatscope.results.update = refuse
    for mod in (flatscope.checkpoint, flatscope.cli.commands.train, flatscope.training):
        mod.save_checkpoint = refuse


def _worker(rank, world, port, d):
    import torch.distributed as dist
    from click.testing import CliRunner

    from flatscope.cli import main

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    if rank:
        _forbid_writes()
    try:
        for name, args, code in _jobs(d):
            r = CliRunner().invoke(main, args)
            if r.exit_code != code:
                raise RuntimeError(f"rank {rank} {name}: exit {r.exit_code}, expected {code}: "
                                   f"{r.output[-1500:]} {r.exception!r}")
            for ext, text in (("out", r.stdout), ("err", r.stderr)):
                with open(f"{d}/{name}.rank{rank}.{ext}", "w") as f:
                    f.write(text)
        dist.barrier()  # both ranks done with gloo before either tears it down (avoids an abort at exit)
    finally:
        dist.destroy_process_group()


def _invoke(args: list[str], code: int = 0) -> dict | None:
    from click.testing import CliRunner

    from flatscope.cli import main

    r = CliRunner().invoke(main, args)
    assert r.exit_code == code, (r.output, r.exception)
    return json.loads(r.stdout) if code == 0 else None


def _interrupt(path: str, group: str) -> None:
    """Make a finished landscape look interrupted: forget every other chunk of 3 points."""
    with h5py.File(path, "r+") as f:
        g = f[group]
        done = g["done"][()].reshape(-1)
        lost = (np.arange(done.size) // 3) % 2 == 1
        done[lost] = False
        g["done"][...] = done.reshape(g["done"].shape)
        for s in ("train",):
            loss = g[s]["loss"][()].reshape(-1)
            loss[lost] = np.nan
            g[s]["loss"][...] = loss.reshape(g[s]["loss"].shape)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("scaleout"))
    jobs = _jobs(d)
    # the landscape run to resume: one process, then half of its chunks forgotten
    ls = dict((n, a) for n, a, _ in jobs)["ls_points"]
    pre = [a for a in ls if a != "--resume"]
    _invoke(pre)
    _interrupt(f"{d}/ls_points.h5", "landscape/random-2d")
    procs = mp.start_processes(_worker, args=(2, _free_port(), d), nprocs=2, join=False, start_method="spawn")
    single = {}
    for name, args, code in jobs:   # the one-process references, while the pair works
        if code == 0:
            single[name] = _invoke(_single_args(args))
    while not procs.join():
        pass
    multi = {name: json.loads(open(f"{d}/{name}.rank0.out").read()) for name, _, code in jobs if code == 0}
    return {"dir": d, "single": single, "multi": multi, "jobs": jobs}


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def test_only_rank0_prints_and_writes(runs):
    d = runs["dir"]
    for name, _, code in runs["jobs"]:
        other = open(f"{d}/{name}.rank1.out").read()
        assert other == "", (name, other)   # rank 1 prints nothing on stdout (and writes nothing: _forbid_writes)
    for name in ("h.h5", "le_data.h5", "le_points.h5", "ls_data.h5", "rsgd_mlp.pt", "esgd.pt"):
        assert os.path.exists(f"{d}/{name}")
    with h5py.File(f"{d}/h.h5") as f:
        assert int(f["hessian"].attrs["world_size"]) == 2


def test_hessian_eigenvalues_and_trace_equal_one_process(runs):
    m, s = runs["multi"]["hessian"], runs["single"]["hessian"]
    assert all(m["eigen_converged"]) and all(s["eigen_converged"])
    assert _rel(m["eigenvalues"], s["eigenvalues"]) < 1e-5
    assert _rel(m["trace"], s["trace"]) < 1e-5


def test_local_energy_data_and_points_equal_one_process(runs):
    s = runs["single"]["le_data"]
    for name in ("le_data", "le_points"):
        m = runs["multi"][name]
        for split in ("train", "test"):
            assert _rel(m[split]["base_loss"], s[split]["base_loss"]) < 1e-5
            for key in ("delta_loss_mean", "delta_loss_sem"):
                assert _rel(m[split][key], s[split][key]) < 1e-5, (name, split, key)
            np.testing.assert_allclose(m[split]["delta_err_mean"], s[split]["delta_err_mean"], atol=1e-12)
            assert m[split]["target"] == s[split]["target"]          # same bisection steps, same σ
    # points: the same chunks, each rank with the whole data: bit for bit
    with h5py.File(f"{runs['dir']}/le_points.h5") as fm, h5py.File(f"{runs['dir']}/le_points-single.h5") as fs:
        for split in ("train", "test"):
            for key in ("delta_loss_draws", "delta_err_draws"):
                np.testing.assert_array_equal(fm["local_energy"][split][key][()], fs["local_energy"][split][key][()])


def test_landscape_data_parallel_slice_equals_one_process(runs):
    m, s = runs["multi"]["ls_data"], runs["single"]["ls_data"]
    assert m["complete"] and _rel(m["loss"], s["loss"]) < 1e-5
    np.testing.assert_array_equal(m["accuracy"], s["accuracy"])
    assert m["summary"]["center_abs_error"] < 1e-6


def test_landscape_points_parallel_resumes_and_equals_one_process(runs):
    d = runs["dir"]
    m, s = runs["multi"]["ls_points"], runs["single"]["ls_points"]
    assert m["complete"]
    np.testing.assert_array_equal(m["loss"], s["loss"])
    np.testing.assert_array_equal(m["accuracy"], s["accuracy"])
    with h5py.File(f"{d}/ls_points.h5") as f:   # the file rank 0 finished from the interrupted run
        g = f["landscape/random-2d"]
        assert g["done"][()].all()
        np.testing.assert_array_equal(g["train"]["loss"][()], np.asarray(s["loss"]))
        assert json.loads(g.attrs["options"])["parallel"] == "points"


def _state(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("name", ["rsgd_mlp", "rsgd_resnet"])
def test_rsgd_replicas_on_ranks_equal_one_process_bit_for_bit(runs, name):
    d = runs["dir"]
    a, b = _state(f"{d}/{name}.pt"), _state(f"{d}/{name}-single.pt")
    for k, v in b["state_dict"].items():
        assert torch.equal(a["state_dict"][k], v), k           # the center (and BN buffers: averaged replicas)
    ra, rb = a["train"]["replicas"], b["train"]["replicas"]
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        for k in y:
            assert torch.equal(x[k], y[k]), k                  # every replica, BN running statistics included
    for k, v in b["train"]["history"].items():
        if k != "wall_time_s":
            assert a["train"]["history"][k] == v, k
    assert a["train"]["world_size"] == 2 and b["train"]["world_size"] == 1


def test_esgd_data_parallel_equals_one_process(runs):
    d = runs["dir"]
    a, b = _state(f"{d}/esgd.pt"), _state(f"{d}/esgd-single.pt")
    for k, v in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][k], v, rtol=1e-10, atol=1e-12)
    assert runs["multi"]["esgd"]["grad_evals"] == runs["single"]["esgd"]["grad_evals"] == 25


def test_training_refuses_what_does_not_distribute(runs):
    d = runs["dir"]
    for rank in (0, 1):   # both ranks stop at once with the same one-line error, before any collective
        err = open(f"{d}/sgd_refused.rank{rank}.err").read()
        assert err.startswith("Error: --opt sgd does not run under torchrun") and err.count("\n") == 1
        assert "fewer than the 2 ranks" in open(f"{d}/replicas_refused.rank{rank}.err").read()
