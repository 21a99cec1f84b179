"""Sharded parameter vectors (``--shard-params``): 2 gloo ranks equal 1 process.

One pair of spawned processes joins a gloo group and runs (a) Lanczos, SLQ and the trace estimators
on an explicit 1001 x 1001 matrix, each rank holding a slice (501 / 500 coordinates) of every vector,
and (b) ``flatscope hessian --shard-params`` through the CLI on a 1,210-parameter MLP in float64.
The test process computes the same in one process with the same :class:`ShardedSpace` (no
reduction): the same random draws (the random blocks of 128 coordinates straddle the rank boundary),
so the runs differ only by the order of the sums of the inner products (2 partial sums instead of
one), i.e. by float64 rounding amplified by the Lanczos recurrence. Tolerances: eigenvalues 1e-6
relative (the issue's figure; measured ~1e-14), SLQ nodes, weights and traces 1e-9 (measured ~1e-13).
"""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from conftest import SAMPLES
from ranks import free_port, gloo, run_pair

MLP = str(SAMPLES / "mlp-sgd.pt")
N = 1001
BLOCK = 128  # random block size in the tests: several blocks per rank, one across the boundary


def _matrix() -> np.ndarray:
    """Symmetric, known spectrum: separated extremes 10, 8, 6, 5 and -4, -3, a bulk in [-1, 1], in the
    dense basis of three random Householder reflections (cheaper than a QR)."""
    rng = np.random.default_rng(0)
    lam = np.concatenate([[10.0, 8.0, 6.0, 5.0, -4.0, -3.0], np.linspace(-1, 1, N - 6)])
    A = np.diag(lam)
    for _ in range(3):
        u = rng.standard_normal(N)
        u /= np.linalg.norm(u)
        Au = A @ u
        A = A - 2 * np.outer(u, Au) - 2 * np.outer(Au, u) + 4 * (u @ Au) * np.outer(u, u)  # H A H
    return A


def _small_checkpoint(folder) -> str:
    """A 1,210-parameter MLP (64-16-10) at its random initialization, on 200 random samples of 10
    classes in an npz file (no scikit-learn to import in each process)."""
    from flatscope.checkpoint import save_checkpoint
    from flatscope.models import build_model

    rng = np.random.default_rng(0)
    data = folder / "small.npz"
    X, y = rng.standard_normal((200, 64)).astype(np.float32), rng.integers(0, 10, 200)
    np.savez(data, X=X, y=y, X_test=X[:50], y_test=y[:50])
    torch.manual_seed(0)
    spec = {"name": "mlp", "kwargs": {"widths": [16]}}
    path = str(folder / "small.pt")
    save_checkpoint(path, build_model(spec), spec, {"name": f"npz:{data}"}, "ce", {})
    return path


def _hessian_args(ck: str) -> list[str]:
    return ["hessian", ck, "--top", "3", "--probes", "2", "--steps", "10", "--trace-probes", "12", "--dtype",
            "float64", "--tol", "1e-8", "--threads", "1", "--json", "-q", "--no-plot"]


def _algebra(mv, space) -> dict:
    from flatscope.linalg import lanczos, slq, trace

    blocks = [slice(0, 300), slice(300, N)]
    top = lanczos(mv, N, 4, "largest", tol=1e-10, seed=1, space=space)
    bot = lanczos(mv, N, 2, "smallest", tol=1e-10, seed=2, block_size=2, space=space)
    d = slq(mv, N, 3, 20, seed=3, space=space)
    out = {"top": top.eigenvalues, "top_res": top.residuals, "top_vecs": top.eigenvectors.numpy(),
           "bottom": bot.eigenvalues, "nodes": d.nodes, "weights": d.weights}
    for name, kw in (("hpp", dict(n_matvec=30)), ("hutch", dict(n_matvec=12, method="hutchinson")),
                     ("exact", dict(n_matvec=N))):
        t = trace(mv, N, seed=4, blocks=blocks, space=space, **kw)
        out[name] = (t.trace, t.stderr, t.block_traces, t.method)
    return out


def _worker(rank, world, port, d, ck, queue):
    from click.testing import CliRunner

    import flatscope.linalg
    from flatscope.cli import main
    from flatscope.linalg import dense_matvec
    from flatscope.sharding import ParamShard

    torch.set_num_threads(1)
    flatscope.linalg.RANDOM_BLOCK = BLOCK
    with gloo(rank, world, port):
        shard = ParamShard(N)
        assert shard.world == 2 and shard.local_dim == (501, 500)[rank]
        res = _algebra(shard.operator(dense_matvec(_matrix())), shard.space)
        r = CliRunner().invoke(main, _hessian_args(ck) + ["--shard-params", "--save-eigenvectors", "-o", f"{d}/h.h5"])
        res["cli"] = (r.exit_code, r.stdout, r.stderr, repr(r.exception))
        fd = ["--hvp", "fd", "--no-density", "--trace-probes", "4", "--shard-params", "-o", f"{d}/fd.h5"]
        r = CliRunner().invoke(main, _hessian_args(ck) + fd)
        res["cli_fd"] = (r.exit_code, r.stdout, r.stderr, repr(r.exception))
        queue.put((rank, res))


def _references() -> dict:
    """The one-process references (computed while the pair works): the same draws, one shard."""
    from unittest import mock

    import flatscope.linalg
    from flatscope.linalg import ShardedSpace, dense_matvec

    with mock.patch.object(flatscope.linalg, "RANDOM_BLOCK", BLOCK):
        return _algebra(dense_matvec(_matrix()), ShardedSpace(N, 0, N))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shard")
    d, ck = str(folder), _small_checkpoint(folder)
    single, multi = run_pair(_worker, (2, free_port(), d, ck), while_waiting=_references)
    return {"dir": d, "ck": ck, "single": single, "multi": multi}


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def test_sharded_lanczos_equals_one_process_and_the_exact_spectrum(runs):
    s, m = runs["single"], runs["multi"][0]
    assert _rel(m["top"], s["top"]) < 1e-6 and _rel(m["bottom"], s["bottom"]) < 1e-6
    # residual 1e-10 x 10 bounds the eigenvalue error by residual^2 / gap: exact to rounding
    np.testing.assert_allclose(s["top"], [10, 8, 6, 5], rtol=1e-9)
    np.testing.assert_allclose(s["bottom"], [-4, -3], rtol=1e-9)
    assert np.all(m["top_res"] <= 1e-10 * 10)
    # the eigenvectors' slices, side by side, are the one-process eigenvectors (same start: same signs)
    whole = np.concatenate([runs["multi"][0]["top_vecs"], runs["multi"][1]["top_vecs"]], axis=1)
    assert whole.shape == (4, N)
    np.testing.assert_allclose(whole, s["top_vecs"], atol=1e-8)


def test_sharded_slq_and_traces_equal_one_process_with_the_same_probes(runs):
    s, m = runs["single"], runs["multi"][0]
    np.testing.assert_allclose(m["nodes"], s["nodes"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(m["weights"], s["weights"], rtol=1e-9, atol=1e-12)
    A = _matrix()
    for name in ("hpp", "hutch", "exact"):
        (tm, sem, bm, meth), (ts, ses, bs, meth_s) = m[name], s[name]
        assert meth == meth_s and _rel(tm, ts) < 1e-9 and _rel(bm, bs) < 1e-9, name
        assert bm.sum() == pytest.approx(tm, rel=1e-12)
        if name != "exact":
            assert abs(ts - np.trace(A)) < 5 * ses, name  # and the estimate is right within its error
    assert m["exact"][0] == pytest.approx(np.trace(A), rel=1e-12)
    np.testing.assert_allclose(m["exact"][2], [A.diagonal()[:300].sum(), A.diagonal()[300:].sum()], rtol=1e-10)


def test_hessian_shard_params_equals_one_process(runs, monkeypatch):
    import flatscope.linalg
    from flatscope.analyses.hessian import hessian_analysis
    from flatscope.cli.common import Run
    from flatscope.sharding import ParamShard

    for rank in (0, 1):
        code, out, err, exc = runs["multi"][rank]["cli"]
        assert code == 0, (rank, err, exc)
        assert (out == "") == (rank == 1)  # only rank 0 prints
    got = json.loads(runs["multi"][0]["cli"][1])
    # the reference: one process, the same objective, the same sharded draws (one shard)
    monkeypatch.setattr(flatscope.linalg, "RANDOM_BLOCK", BLOCK)
    run = Run(checkpoint=runs["ck"], dtype="float64", batch_size=2048, threads=1)
    run.setup()
    obj = run.objective()
    ref = hessian_analysis(obj, top=3, probes=2, steps=10, trace_probes=12, tol=1e-8, seed=0,
                           shard=ParamShard(obj.dim, 0, 1), save_eigenvectors=True)
    assert all(got["eigen_converged"])
    assert _rel(got["eigenvalues"], ref.top.eigenvalues) < 1e-6
    assert _rel(got["trace"], ref.traces.trace) < 1e-9
    assert _rel(got["density"]["mean"], ref.density.integral(lambda x: x)[0]) < 1e-9
    with h5py.File(f"{runs['dir']}/h.h5") as f:
        g = f["hessian"]
        assert int(g.attrs["world_size"]) == 2
        vecs = g["eigenvectors"][()]
    assert vecs.shape == (3, obj.dim)
    np.testing.assert_allclose(vecs, ref.top.eigenvectors.numpy(), atol=1e-6)
    # and the plain one-process run (its own random starts) finds the same eigenvalues
    plain = hessian_analysis(obj, top=3, density=False, trace_probes=2, tol=1e-8, seed=0)
    assert _rel(got["eigenvalues"], plain.top.eigenvalues) < 1e-6


def test_hessian_shard_params_with_fd_products_equals_one_process(runs):
    from flatscope.analyses.hessian import hessian_analysis
    from flatscope.cli.common import Run

    code, out, err, exc = runs["multi"][0]["cli_fd"]
    assert code == 0, (err, exc)
    got = json.loads(out)
    assert got["hvp"] == "fd" and all(got["eigen_converged"])
    run = Run(checkpoint=runs["ck"], dtype="float64", batch_size=2048, threads=1, hvp="fd")
    run.setup()
    ref = hessian_analysis(run.objective(), top=3, density=False, trace_probes=2, tol=1e-8, seed=0)
    assert ref.hvp_mode == "fd"
    assert _rel(got["eigenvalues"], ref.top.eigenvalues) < 1e-6


def _one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error:"), (r.exit_code, r.stderr)
    return lines[0]


@pytest.mark.parametrize("env", [{}, {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}])
def test_shard_params_without_torchrun_is_one_error_line(tmp_path, monkeypatch, env):
    from click.testing import CliRunner

    from flatscope.cli import main

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "h.h5"
    r = CliRunner().invoke(main, ["hessian", MLP, "--shard-params", "-o", str(out)])
    assert "torchrun --nproc-per-node" in _one_error_line(r)
    assert not out.exists()
    r = CliRunner().invoke(main, ["landscape", MLP, "--shard-params", "-o", str(out)])
    assert "only flatscope hessian" in _one_error_line(r)
    assert not out.exists()


def test_per_layer_refused_with_shards():
    from flatscope.analyses.hessian import hessian_analysis
    from flatscope.errors import FlatscopeError
    from flatscope.objective import Objective
    from flatscope.sharding import ParamShard

    obj = Objective(torch.nn.Linear(3, 2), torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))
    with pytest.raises(FlatscopeError, match="--per-layer"):
        hessian_analysis(obj, top=2, per_layer=True, shard=ParamShard(obj.dim, 0, 1))


@pytest.mark.slow
def test_torchrun_hessian_shard_params_prints_once_and_matches_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    HESSIAN = _hessian_args(MLP) + ["--max-samples", "300"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "flatscope"] + HESSIAN + ["--shard-params", "-o", str(tmp_path / "m.h5")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    multi = json.loads(p.stdout)  # exactly one JSON object: only rank 0 printed
    single = json.loads(subprocess.run([sys.executable, "-m", "flatscope"] + HESSIAN + ["-o", str(tmp_path / "s.h5")],
                                       capture_output=True, text=True, env=env, timeout=600).stdout)
    assert _rel(multi["eigenvalues"], single["eigenvalues"]) < 1e-6
