"""The model sharded by FSDP2 (``--shard-params --hvp fd``): 2 gloo ranks equal 1 process.

One pair of spawned processes joins a gloo group and runs

(a) Lanczos, SLQ and the trace estimators on an explicit 1001 x 1001 matrix whose coordinates are
    dealt to the ranks in six interleaved ranges (rank 0 holds ranges 0, 2, 4 and rank 1 ranges 1,
    3, 5: a :class:`ShardedSpace` with several ranges, as FSDP2 gives), against one process holding
    everything: the same random draws, so eigenvalues agree to 1e-6 relative (measured ~1e-14);
(b) :class:`flatscope.fsdp.FSDPObjective` on a 1,135-parameter tanh MLP (64-15-10, float64; its
    15- and 10-row tensors split 8/7 and 5/5 rows) over 201 samples in batches of 100 (rank 0 runs 2
    passes, rank 1 one and a zero-weight one): value and gradient equal the whole model's at two
    points (1e-10), and the central difference equals the dense Hessian times ``v``;
(c) ``flatscope hessian --shard-params --hvp fd`` through the CLI: top-3 eigenvalues equal the
    one-process ``--hvp fd`` run and the exact ones, and each rank holds about half of the
    parameters and of every Lanczos vector.

The fd tolerance comes from the step ``h`` (:func:`flatscope.objective.fd_step`, 5.0e-7 here for a
unit ``v``): each gradient carries a rounding error of about ``eps max(1, |g|)``, which the difference
divides by ``2 h``, and the smooth (tanh) loss adds ``h^2 |D^3 L[v, v]| / 6``. The bound used is
``10 eps / h max(1, |g|) + h^2`` = 4.4e-9 (``|H v|`` = 0.087); measured ``|H_fd v - H v|`` = 1.6e-10.
The 2-rank top-3 eigenvalues differed from the one-process ``--hvp fd`` ones by at most 1.3e-11.
"""

import json
import os

import numpy as np
import pytest
import torch

from ranks import free_port, gloo, run_pair
from test_shard import _matrix

N = 1001
BLOCK = 128
CUTS = [0, 97, 300, 301, 555, 700, N]  # six ranges, dealt alternately
N_SAMPLES, BATCH = 201, 100


def _ranges(rank: int) -> list[tuple[int, int]]:
    return [(a, b) for i, (a, b) in enumerate(zip(CUTS[:-1], CUTS[1:])) if i % 2 == rank]


def _checkpoint(folder) -> str:
    from flatscope.checkpoint import save_checkpoint
    from flatscope.models import build_model

    rng = np.random.default_rng(1)
    data = folder / "fsdp.npz"
    X, y = rng.standard_normal((N_SAMPLES, 64)).astype(np.float32), rng.integers(0, 10, N_SAMPLES)
    np.savez(data, X=X, y=y, X_test=X[:50], y_test=y[:50])
    torch.manual_seed(0)
    spec = {"name": "mlp", "kwargs": {"widths": [15], "activation": "tanh"}}
    path = str(folder / "fsdp.pt")
    save_checkpoint(path, build_model(spec), spec, {"name": f"npz:{data}"}, "ce", {})
    return path


def _points(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A second point and a unit direction, whole (each rank keeps its coordinates)."""
    g = torch.Generator().manual_seed(5)
    dw = 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
    v = torch.randn(n, generator=g, dtype=torch.float64)
    return dw, v / v.norm()


def _local(x: torch.Tensor, ranges) -> torch.Tensor:
    return torch.cat([x[a:b] for a, b in ranges])


def _algebra(mv, space) -> dict:
    """Top 4, bottom 2, a small SLQ, Hutch++ and the exact trace with per-block traces (``locate``)."""
    from flatscope.linalg import lanczos, slq, trace

    blocks = [slice(0, 250), slice(250, 600), slice(600, N)]
    top = lanczos(mv, N, 4, "largest", tol=1e-10, seed=1, space=space)
    bot = lanczos(mv, N, 2, "smallest", tol=1e-10, seed=2, block_size=2, space=space)
    d = slq(mv, N, 2, 12, seed=3, space=space)
    out = {"top": top.eigenvalues, "top_vecs": top.eigenvectors.numpy(), "bottom": bot.eigenvalues,
           "nodes": d.nodes, "weights": d.weights}
    for name, kw in (("hpp", dict(n_matvec=24)), ("exact", dict(n_matvec=N, batch=64))):
        t = trace(mv, N, seed=4, blocks=blocks, space=space, **kw)
        out[name] = (t.trace, t.stderr, t.block_traces, t.method)
    return out


def _explicit_operator(A: np.ndarray, ranges):
    """``V_local -> (A V)_local`` for coordinates dealt in ``ranges`` (whole vectors all-gathered)."""
    import torch.distributed as dist

    At = torch.as_tensor(A)
    mine = torch.cat([torch.arange(a, b) for a, b in ranges])
    every = [torch.cat([torch.arange(a, b) for a, b in _ranges(r)]) for r in range(2)]

    def mv(V: torch.Tensor) -> torch.Tensor:
        V2 = V.reshape(-1, V.shape[-1]).to(torch.float64)
        width = max(len(e) for e in every)
        buf = torch.zeros(V2.shape[0], width, dtype=torch.float64)
        buf[:, : V2.shape[1]] = V2
        parts = [torch.empty_like(buf) for _ in range(2)]
        dist.all_gather(parts, buf)
        whole = torch.zeros(V2.shape[0], A.shape[0], dtype=torch.float64)
        for p, e in zip(parts, every):
            whole[:, e] = p[:, : len(e)]
        return (whole @ At)[:, mine].reshape(V.shape)

    return mv


def _hessian_args(ck: str) -> list[str]:
    return ["hessian", ck, "--top", "3", "--no-density", "--trace-probes", "4", "--dtype", "float64", "--tol",
            "1e-6", "--batch-size", str(N_SAMPLES), "--threads", "1", "--json", "-q", "--no-plot", "--hvp", "fd"]


def _worker(rank, world, port, d, ck, queue):
    from click.testing import CliRunner

    import flatscope.analyses.hessian
    import flatscope.linalg
    from flatscope.cli import main
    from flatscope.cli.common import Run
    from flatscope.distributed import all_reduce_sum
    from flatscope.fsdp import FSDPObjective
    from flatscope.linalg import ShardedSpace, lanczos
    from flatscope.objective import fd_step

    torch.set_num_threads(1)
    os.environ["RANK"] = str(rank)  # as torchrun sets it: only rank 0 prints an Error: line
    flatscope.linalg.RANDOM_BLOCK = BLOCK
    with gloo(rank, world, port):
        out = {}
        space = ShardedSpace(N, ranges=_ranges(rank), reduce=all_reduce_sum)
        out["algebra"] = _algebra(_explicit_operator(_matrix(), _ranges(rank)), space)
        # (b) the objective on the sharded model
        run = Run(checkpoint=ck, dtype="float64", batch_size=BATCH, threads=1, hvp="fd")
        run.setup()
        obj = FSDPObjective(run.checkpoint.model, data=run.split_source("train"), loss=run.loss,
                            batch_size=BATCH, dtype=torch.float64)
        rg = obj.space.ranges
        dw, v = _points(obj.dim)
        out["ranges"], out["passes"], out["batches"] = rg, obj.n_passes, len(obj._batch_counts())
        out["local_numel"] = sum(p.to_local().numel() for p in obj.model.parameters())
        numpy = lambda fg: (fg[0], fg[1].numpy())  # noqa: E731 - tensors would travel as shared memory
        out["f0"] = numpy(obj.loss_and_grad())
        out["f1"] = numpy(obj.loss_and_grad(obj.w0 + _local(dw, rg)))
        out["h"] = fd_step(obj.w0, _local(v, rg), space=obj.space)
        out["hv"] = obj.hvp(_local(v, rg)).numpy()
        out["restored"] = numpy(obj.loss_and_grad())  # the shards are w0 again after the product
        # (c) the CLI (recording the width of its Lanczos vectors), and what it refuses
        widths = []

        def recorded(*args, **kwargs):
            res = lanczos(*args, **kwargs)
            widths.append(res.eigenvectors.shape[1])
            return res

        flatscope.analyses.hessian.lanczos = recorded
        r = CliRunner().invoke(main, _hessian_args(ck) + ["--shard-params", "-o", f"{d}/fsdp.h5"])
        out["cli"] = (r.exit_code, r.stdout, r.stderr, repr(r.exception))
        for flag in ("--per-layer", "--save-eigenvectors", "--estimate"):
            r = CliRunner().invoke(main, _hessian_args(ck) + ["--shard-params", flag, "-o", f"{d}/refused.h5"])
            out[flag] = (r.exit_code, r.stderr)
        out["basis_width"] = widths
        queue.put((rank, out))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from unittest import mock

    import flatscope.linalg
    from flatscope.linalg import ShardedSpace, dense_matvec

    folder = tmp_path_factory.mktemp("fsdp")
    d, ck = str(folder), _checkpoint(folder)

    def references():  # the one-process references while the pair works (mostly waiting on each other)
        with mock.patch.object(flatscope.linalg, "RANDOM_BLOCK", BLOCK):
            single = _algebra(dense_matvec(_matrix()), ShardedSpace(N, 0, N))
        return single, _one_process(ck)

    (single, ref), multi = run_pair(_worker, (2, free_port(), d, ck), while_waiting=references)
    return {"dir": d, "ck": ck, "single": single, "multi": multi, "whole": ref}


@pytest.fixture(scope="module")
def whole(runs):
    return runs["whole"]


def _one_process(ck: str) -> dict:
    """The one-process references: the whole float64 objective, its dense Hessian, the --hvp fd run."""
    from flatscope.analyses.hessian import hessian_analysis
    from flatscope.cli.common import Run
    from flatscope.objective import exact_hessian

    run = Run(checkpoint=ck, dtype="float64", batch_size=N_SAMPLES, threads=1, hvp="fd")  # one batch: cheaper
    run.setup()
    obj = run.objective()
    ref = hessian_analysis(obj, top=3, density=False, trace_probes=4, tol=1e-6, seed=0)
    return {"obj": obj, "H": exact_hessian(obj), "fd": ref}


def _fd_tol(h: float, gnorm: float) -> float:
    """The error bound of one central difference with step ``h`` on a unit vector (module docstring)."""
    return 10 * float(np.finfo(np.float64).eps) / h * max(1.0, gnorm) + h**2


def _join(m, key) -> torch.Tensor:
    """A whole vector from both ranks' local coordinates (their ranges interleave)."""
    n = max(m[r]["ranges"][-1][1] for r in (0, 1))
    out = torch.full((n,), float("nan"), dtype=torch.float64)
    for r in (0, 1):
        x, lo = m[r][key], 0
        x = torch.as_tensor(x[1] if isinstance(x, tuple) else x)  # (loss, gradient) or a product
        for a, b in m[r]["ranges"]:
            out[a:b] = x[lo : lo + b - a]
            lo += b - a
    return out


def test_interleaved_ranges_equal_one_process(runs):
    s, m = runs["single"], runs["multi"]
    for r in (0, 1):
        got = m[r]["algebra"]
        assert np.max(np.abs(got["top"] - s["top"]) / np.abs(s["top"])) < 1e-6
        assert np.max(np.abs(got["bottom"] - s["bottom"]) / np.abs(s["bottom"])) < 1e-6
        np.testing.assert_allclose(got["nodes"], s["nodes"], rtol=1e-9, atol=1e-12)
        for name in ("hpp", "exact"):
            assert got[name][0] == pytest.approx(s[name][0], rel=1e-9), name
            np.testing.assert_allclose(got[name][2], s[name][2], rtol=1e-9)  # block traces across the ranges
    # the eigenvectors' local parts, put back at their ranges, are the one-process eigenvectors
    vec = np.zeros((4, N))
    for r in (0, 1):
        lo = 0
        for a, b in _ranges(r):
            vec[:, a:b] = m[r]["algebra"]["top_vecs"][:, lo : lo + b - a]
            lo += b - a
    np.testing.assert_allclose(vec, s["top_vecs"], atol=1e-8)
    np.testing.assert_allclose(s["top"], [10, 8, 6, 5], rtol=1e-9)
    np.testing.assert_allclose(s["exact"][2], [_matrix().diagonal()[b].sum() for b in
                                               (slice(0, 250), slice(250, 600), slice(600, N))], rtol=1e-10)


def test_sharded_ranges_draw_what_one_range_draws(monkeypatch):
    import flatscope.linalg
    from flatscope.linalg import ShardedSpace

    monkeypatch.setattr(flatscope.linalg, "RANDOM_BLOCK", BLOCK)
    one = ShardedSpace(N, 0, N)
    whole = one.randn(3, torch.Generator().manual_seed(7))
    for r in (0, 1):
        sp = ShardedSpace(N, ranges=_ranges(r))
        part = sp.randn(3, torch.Generator().manual_seed(7))
        assert torch.equal(part, torch.cat([whole[:, a:b] for a, b in _ranges(r)], dim=1))
        z = sp.rademacher(2, torch.Generator().manual_seed(8), "cpu")
        zw = one.rademacher(2, torch.Generator().manual_seed(8), "cpu")
        assert torch.equal(z, torch.cat([zw[:, a:b] for a, b in _ranges(r)], dim=1))
        # a global block maps to one local block; locate() finds each held coordinate
        lb = sp.local_block(slice(250, 600))
        held = [i for a, b in _ranges(r) for i in range(a, b) if 250 <= i < 600]
        ok, loc = sp.locate(torch.tensor(held))
        assert bool(ok.all()) and loc.tolist() == list(range(lb.start, lb.stop))
    assert ShardedSpace(N, ranges=[(0, 400), (400, N)]).randn(2, torch.Generator().manual_seed(3)).equal(
        one.randn(2, torch.Generator().manual_seed(3))
    )


def test_fsdp_value_and_gradient_equal_the_whole_model(runs, whole):
    m, obj = runs["multi"], whole["obj"]
    assert m[0]["passes"] == m[1]["passes"] == 2 and (m[0]["batches"], m[1]["batches"]) == (2, 1)
    dw, _ = _points(obj.dim)
    for key, w in (("f0", obj.w0), ("f1", obj.w0 + dw)):
        f, g = obj.loss_and_grad(w)
        assert m[0][key][0] == pytest.approx(f, rel=1e-10) and m[1][key][0] == pytest.approx(f, rel=1e-10)
        got = _join(m, key)
        assert float((got - g).abs().max()) <= 1e-10 * max(1.0, float(g.abs().max())), key
    for r in (0, 1):
        assert np.array_equal(m[r]["restored"][1], m[r]["f0"][1]) and m[r]["restored"][0] == m[r]["f0"][0]


def test_fsdp_fd_product_equals_the_dense_hessian(runs, whole):
    m, obj, H = runs["multi"], whole["obj"], whole["H"]
    _, v = _points(obj.dim)
    exact = H @ v
    h = m[0]["h"]
    assert h == m[1]["h"] and 1e-8 < h < 1e-5  # the same step on both ranks, from all-reduced norms
    gnorm = float(obj.grad().norm())
    tol = _fd_tol(h, gnorm)
    err = float((_join(m, "hv") - exact).norm())
    assert err < tol, (err, tol)
    assert tol < 1e-6 * float(exact.norm())  # and the bound is tight enough to mean something


def test_fsdp_hessian_cli_equals_one_process_fd_and_the_exact_spectrum(runs, whole):
    m, obj = runs["multi"], whole["obj"]
    for r in (0, 1):
        code, out, err, exc = m[r]["cli"]
        assert code == 0, (r, err, exc)
        assert (out == "") == (r == 1)
    got = json.loads(m[0]["cli"][1])
    assert got["hvp"] == "fd" and all(got["eigen_converged"])
    assert got["hvp_fd_accuracy"] == "not measurable under FSDP" and "hvp_fd_rel_error" not in got
    ev, res = np.asarray(got["eigenvalues"]), np.asarray(got["residuals"])
    ref = whole["fd"].top
    fd_err = _fd_tol(m[0]["h"], float(obj.grad().norm()))
    # two fd operators that differ by rounding: Ritz values within both residuals and twice the fd error
    assert np.all(np.abs(ev - ref.eigenvalues) <= res + ref.residuals + 2 * fd_err)
    assert np.max(np.abs(ev - ref.eigenvalues) / np.abs(ref.eigenvalues)) < 1e-6
    exact = np.sort(np.linalg.eigvalsh(whole["H"].numpy()))[::-1][:3]
    assert np.all(np.abs(ev - exact) <= res + fd_err)


def test_no_rank_holds_a_whole_vector(runs, whole):
    n = whole["obj"].dim
    m = runs["multi"]
    # rows split 8/7 (15-row tensors) and 5/5 (10-row ones): about n / 2 each, never more than n / 2 + 64 + 1
    for r in (0, 1):
        local = sum(b - a for a, b in m[r]["ranges"])
        assert m[r]["local_numel"] == local and m[r]["basis_width"] == [local]
        assert abs(local - n / 2) <= 65
    assert sum(sum(b - a for a, b in m[r]["ranges"]) for r in (0, 1)) == n


def test_fsdp_refuses_what_needs_whole_vectors(runs):
    for flag in ("--per-layer", "--save-eigenvectors", "--estimate"):
        (code0, err0), (code1, err1) = runs["multi"][0][flag], runs["multi"][1][flag]
        lines = err0.strip().splitlines()
        assert code0 == code1 == 2 and len(lines) == 1 and err1.strip() == "", (flag, err0, err1)
        assert lines[0].startswith("Error:") and flag in lines[0] and "drop " + flag in lines[0]
    assert not os.path.exists(os.path.join(runs["dir"], "refused.h5"))


@pytest.mark.slow
def test_torchrun_hessian_fsdp_prints_once_and_matches_one_process(tmp_path):
    import subprocess
    import sys

    ck = _checkpoint(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = _hessian_args(ck)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "flatscope"] + args + ["--shard-params", "-o", str(tmp_path / "m.h5")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    multi = json.loads(p.stdout)  # exactly one JSON object: only rank 0 printed
    assert multi["hvp_fd_accuracy"] == "not measurable under FSDP"
    one = subprocess.run([sys.executable, "-m", "flatscope"] + args + ["-o", str(tmp_path / "s.h5")],
                         capture_output=True, text=True, env=env, timeout=600)
    single = json.loads(one.stdout)
    assert single["hvp_fd_rel_error"] < 1e-6  # one process can measure its differences
    ev, ref = np.asarray(multi["eigenvalues"]), np.asarray(single["eigenvalues"])
    # within both residuals and two fd errors (4.4e-9 each on this model, see the module docstring)
    assert np.all(np.abs(ev - ref) <= np.asarray(multi["residuals"]) + np.asarray(single["residuals"]) + 1e-8)
