"""Bounded, predictable memory (issue 13): the budget, the cache by measured bytes, chunking that never
changes results, exact microbatching for every analysis, and the peak RSS of a ~5M-parameter model."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAMPLES, assert_one_line_error, run_cli
from flatscope.analyses.hessian import HessianOperator, hessian_analysis
from flatscope.checkpoint import load_checkpoint, save_checkpoint
from flatscope.data import load_data
from flatscope.errors import FlatscopeError
from flatscope.linalg import dense_matvec, lanczos, slq, trace
from flatscope.memory import MemoryBudget, available_bytes, batch_cost, format_size, parse_size, saved_storages
from flatscope.models import build_model
from flatscope.objective import Linearization, Objective
from torch.multiprocessing.reductions import StorageWeakRef

ROOT = Path(__file__).resolve().parents[1]


def _digits(n=120, dtype=torch.float64, **kw):
    ck = load_checkpoint(str(SAMPLES / "mlp-sgd.pt"))
    X, y = load_data(ck.data_spec).split("train")
    return Objective(ck.model, X[:n], y[:n], loss="ce", dtype=dtype, **kw)


# ---------------------------------------------------------------------------------------- the budget
def test_parse_size_units_and_bad_sizes():
    assert parse_size("4GB") == 4 * 10**9 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("2G") == 2 * 2**30 and parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("1000") == 1000 and parse_size(" 3 kb ") == 3000
    for bad in ("", "4 parsecs", "-1GB", "0", "GB", "nan"):
        with pytest.raises(FlatscopeError, match="--memory-budget"):
            parse_size(bad)
    assert format_size(3 * 2**30) == "3 GiB" and format_size(1536) == "1.5 KiB"
    free = available_bytes("cpu")
    assert free is None or free > 0
    b = MemoryBudget("10MB")
    assert b.count(3 * 10**6) == 3 and b.count(3 * 10**6, reserved=5 * 10**6) == 1 and b.count(1, most=7) == 7
    with pytest.raises(FlatscopeError, match=r"needs 19.1 MiB, more than --memory-budget 9.54 MiB; lower"):
        b.require(20 * 10**6, "this", hint="lower it")


def test_batch_cost_counts_saved_activations_exactly():
    """A linear model y = X w on a batch of B samples: the training step keeps the gradient and a few
    B-vectors (the inputs are resident); the linearization keeps the B-vectors its graph saves and no
    gradient (its products start from the graph's edges)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(50, 1, bias=False).double()
    X, y = torch.randn(30, 50, dtype=torch.float64), torch.randn(30, 1, dtype=torch.float64)
    obj = Objective(model, X, y, loss="mse", dtype=torch.float64)
    step, lin = batch_cost(obj, create_graph=False), batch_cost(obj, create_graph=True)
    assert step >= 50 * 8 and step <= 50 * 8 + 4 * 30 * 8 + 64  # gradient + at most a few B-vectors
    assert 30 * 8 <= lin <= 2 * 30 * 8 + 64  # the outputs and the residuals; a kept gradient adds 400


def test_linearization_holds_activations_not_the_gradient_nor_copies_of_the_weights():
    """An MLP whose activations are tiny next to its weights (4 samples, 400x400 layers): the cached
    linearization keeps views of w and a few activation rows, nothing parameter-sized. It keeps its
    graph's edges, not the gradient (one vector), and a copy of any weight matrix would add 0.47
    vector. The measure walks the graph, so measuring leaves nothing alive (the hooks it used made
    cycles), and the graph is freed with the linearization."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 400), torch.nn.Tanh(), torch.nn.Linear(400, 400),
                                torch.nn.Tanh(), torch.nn.Linear(400, 3))
    obj = Objective(model, torch.randn(4, 20), torch.randint(0, 3, (4,)))
    activations = 4 * 400 * 4
    held = batch_cost(obj, create_graph=True)
    assert 0 < held <= 40 * activations, held / (obj.dim * 4)
    xb, yb = next(iter(obj.batches()))[:2]
    lin = Linearization(obj, obj.w0, xb, yb)
    storages = saved_storages([e.node for e in lin.edges])
    assert obj.w0.untyped_storage().data_ptr() in storages  # the weights are saved as views of w
    w_ptr = obj.w0.untyped_storage().data_ptr()
    assert all(nbytes <= 40 * activations for ptr, nbytes in storages.items() if ptr != w_ptr)
    act = next(node for node in _nodes(lin.edges[0].node) if hasattr(node, "_saved_result"))._saved_result
    ref = StorageWeakRef(act.untyped_storage())  # a saved activation (tanh's output)
    del lin, storages, act
    assert ref.expired()  # the graph is freed with the linearization


def _nodes(root):
    stack, seen = [root], {}
    while stack:
        node = stack.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = node
            stack.extend(nxt for nxt, _ in node.next_functions)
    return list(seen.values())


def test_budget_too_small_for_one_batch_is_one_line_saying_what_it_needs(tmp_path):
    out = tmp_path / "r.h5"
    r = run_cli(["hessian", SAMPLES / "mlp-sgd.pt", "--top", "2", "--no-density", "--memory-budget", "100KB",
                 "-o", out, "--no-plot"])
    line = assert_one_line_error(r, contains="one batch of 1347 samples")
    assert "needs" in line and "--batch-size" in line and "100 KB" not in line and "97.7 KiB" in line
    assert not out.exists()
    r = run_cli(["hessian", SAMPLES / "mlp-sgd.pt", "--memory-budget", "lots", "-o", out])
    assert_one_line_error(r, contains="--memory-budget 'lots'")
    # a smaller batch fits; a too-small basis is refused with what it needs, before any product
    r = run_cli(["hessian", SAMPLES / "mlp-sgd.pt", "--top", "2", "--no-density", "--memory-budget", "600KB",
                 "--batch-size", "100", "-o", out, "--no-plot"])
    assert_one_line_error(r, contains="a Lanczos basis of at least 4 vectors")
    r = run_cli(["hessian", SAMPLES / "mlp-sgd.pt", "--basis-device", "tpu", "-o", out])
    assert_one_line_error(r, contains="device")
    assert not out.exists()


def test_cache_follows_the_measured_budget_not_a_batch_count():
    obj = _digits(120, batch_size=10)  # 12 batches: beyond the old 8-batch rule
    one = obj.batch_bytes()
    assert one > 0
    V = torch.randn(3, obj.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = obj.hvp(V)
    big = _digits(120, batch_size=10, memory_budget=one * 20)
    assert big.cache_fits() and HessianOperator(big).mode == "cached"
    small = _digits(120, batch_size=10, memory_budget=one * 5)
    assert not small.cache_fits() and HessianOperator(small).mode == "double-backward"
    for o in (big, small):
        op = HessianOperator(o)
        torch.testing.assert_close(op(V), ref, rtol=1e-12, atol=1e-14)
    # a budget for one linearization and one row at a time: the block is multiplied row by row, same values
    tight = _digits(120, batch_size=10, memory_budget=2 * one + 3 * obj.dim * 8)
    assert tight.rows_per_product(V, one) == 1
    torch.testing.assert_close(tight.hvp(V), ref, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------- chunks never change results
def _spd(n=40, seed=0):
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    return (Q * np.concatenate([[50.0, 20.0, 10.0], rng.uniform(-1, 1, n - 3)])) @ Q.T


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_trace_probe_chunks_give_the_same_estimate(method):
    A = _spd()
    blocks = [slice(0, 10), slice(10, 40)]
    runs = [trace(dense_matvec(A), 40, 18, method=method, seed=3, blocks=blocks, batch=b) for b in (1, 4, 18)]
    for r in runs[1:]:
        assert r.trace == pytest.approx(runs[0].trace, rel=1e-12)
        np.testing.assert_allclose(r.samples, runs[0].samples, rtol=1e-12)
        np.testing.assert_allclose(r.block_traces, runs[0].block_traces, rtol=1e-12)


def test_hutchpp_basis_is_its_sketch_orthonormalized_in_place():
    """Hutch++ holds its r sketch vectors once: the basis overwrites them, spanning what a QR spans."""
    from flatscope.linalg import VectorSpace

    rng = np.random.default_rng(0)
    W = torch.tensor(rng.standard_normal((6, 50)))
    W[4] = W[0] - 2 * W[1]  # in the span of earlier rows: becomes zero
    ref = W.clone()
    ptr = W.data_ptr()
    Q = VectorSpace(50).orthonormalize_rows_(W)
    assert Q.data_ptr() == ptr
    keep = [0, 1, 2, 3, 5]
    torch.testing.assert_close(Q[keep] @ Q[keep].T, torch.eye(5, dtype=torch.float64), atol=1e-13, rtol=0)
    assert float(Q[4].abs().max()) == 0.0
    P = Q[keep].T @ Q[keep]  # the projector onto the rows' span
    torch.testing.assert_close(ref @ P, ref, atol=1e-12, rtol=0)


def test_trace_probes_side_by_side_are_cut_to_the_budget_with_the_same_trace():
    from flatscope.analyses.hessian import plan_memory

    obj = _digits(120, batch_size=40)
    plan, _ = plan_memory(obj, top=2, density=False, trace_probes=24)
    assert plan.trace_batch == 8
    one, vec = obj.batch_bytes(), plan.vector_bytes
    # room beside two batches' products for the Hutch++ sketch (8 vectors) and 2 x 8 work vectors only
    tight = _digits(120, batch_size=40, memory_budget=2 * one + 26.5 * vec)
    tplan, _ = plan_memory(tight, top=2, density=False, trace_probes=24)
    assert not tplan.cached and tplan.trace_batch == 2
    a = hessian_analysis(obj, top=2, density=False, trace_probes=24)
    b = hessian_analysis(tight, top=2, density=False, trace_probes=24)
    assert b.traces.trace == pytest.approx(a.traces.trace, rel=1e-10)
    np.testing.assert_allclose(b.traces.samples, a.traces.samples, rtol=1e-10)


def test_slq_without_reorthogonalization_fits_where_full_does_not():
    from flatscope.analyses.hessian import plan_memory

    obj = _digits(120, batch_size=40)
    one, vec = obj.batch_bytes(), plan_memory(obj, top=2)[0].vector_bytes
    # Lanczos and the trace fit; one fully reorthogonalized probe of 60 steps (68 vectors) does not
    tight = _digits(120, batch_size=40, memory_budget=2 * one + 45 * vec)
    with pytest.raises(FlatscopeError, match="--slq-reorth none"):
        plan_memory(tight, top=2, trace_probes=9, steps=60)
    plan, _ = plan_memory(tight, top=2, trace_probes=9, steps=60, slq_reorth="none")
    assert plan.probe_batch >= 1
    res = hessian_analysis(tight, top=2, probes=1, steps=60, trace_probes=9, slq_reorth="none")
    assert res.density.n_matvec == 60 and res.to_json()["density"]["reorthogonalized"] is False


def test_slq_probe_batches_and_lanczos_float32_basis():
    A = _spd(60)
    a = slq(dense_matvec(A), 60, n_probes=5, n_steps=12, seed=1)
    b = slq(dense_matvec(A), 60, n_probes=5, n_steps=12, seed=1, probe_batch=2)
    np.testing.assert_allclose(a.nodes, b.nodes, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a.weights, b.weights, rtol=1e-9, atol=1e-13)
    # thick restart with a small basis finds the same eigenpairs
    ev = np.linalg.eigvalsh(A)[::-1][:3]
    r = lanczos(dense_matvec(A), 60, 3, tol=1e-10, max_basis=9, max_iter=2000)
    assert r.n_restarts > 0 and r.all_converged
    np.testing.assert_allclose(r.eigenvalues, ev, rtol=1e-9)


def test_float32_basis_keeps_the_accuracy_of_float32_products():
    """The Hessian of a float32 digits MLP: a float32 basis (the default for float32 models) meets the
    residual tolerance and gives the eigenvalues of a float64 basis to the float32 products' own error."""
    obj = _digits(300, dtype=torch.float32)
    op = HessianOperator(obj)
    r32 = lanczos(op, obj.dim, 4, tol=1e-5, dtype=torch.float32, seed=0)
    r64 = lanczos(op, obj.dim, 4, tol=1e-5, dtype=torch.float64, seed=0)
    assert r32.eigenvectors.dtype == torch.float32
    assert r32.all_converged and np.all(r32.residuals <= 1e-5 * r32.scale)
    # both are within their residual bounds of the true eigenvalues: |d lambda| <= residual
    bound = r32.residuals + r64.residuals + 1e-6 * r32.scale
    assert np.all(np.abs(r32.eigenvalues - r64.eigenvalues) <= bound)
    res = hessian_analysis(obj, top=3, density=True, probes=2, steps=10, trace_probes=9)
    assert res.memory["basis_dtype"] == "float32" and res.top.all_converged


def test_local_energy_and_landscape_chunks_give_the_same_values(tmp_path):
    from flatscope.analyses.local_energy import local_energy

    obj = _digits(100)
    kw = dict(samples=5, seed=2, batched="on")
    a = local_energy(obj, [0.05, 0.2], chunk=1, **kw).curves["train"]
    b = local_energy(obj, [0.05, 0.2], chunk=5, **kw).curves["train"]
    np.testing.assert_allclose(a.delta_loss_draws, b.delta_loss_draws, rtol=1e-12, atol=1e-14)
    # a budget that fits two draws per call cuts a chunk of 5 into calls of two: same values
    vec = obj.dim * 8
    two = _digits(100, memory_budget=min(5 * obj.dim, 2**24) * 8 + 2 * (4 * vec + obj.batch_bytes(False)) + 1)
    c = local_energy(two, [0.05, 0.2], chunk=5, **kw)
    assert c.chunk == 2
    np.testing.assert_allclose(c.curves["train"].delta_loss_draws, b.delta_loss_draws, rtol=1e-12, atol=1e-14)
    outs = []
    for ppc in ("1", "7"):
        out = tmp_path / f"l{ppc}.h5"
        r = run_cli(["landscape", SAMPLES / "mlp-sgd.pt", "--2d", "--grid", "4", "--max-samples", "100", "--dtype",
                     "float64", "--batching", "vmap", "--points-per-call", ppc, "-o", out, "--no-plot", "--json"])
        assert r.exit_code == 0, r.stderr
        outs.append(np.asarray(json.loads(r.stdout)["loss"], dtype=np.float64))
    assert outs[0].shape == (4, 4)
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------ microbatching is exact
def _numbers(payload, prefix=""):
    """Every number in a JSON payload, by path (timings, memory plans and paths left out)."""
    skip = ("seconds", "memory", "wall", "path", "written", "batch", "chunk", "points_per_call", "hvp", "plots")
    out = {}
    if isinstance(payload, dict):
        for k, v in payload.items():
            if not any(s in k for s in skip):
                out.update(_numbers(v, f"{prefix}/{k}"))
    elif isinstance(payload, list):
        for i, v in enumerate(payload):
            out.update(_numbers(v, f"{prefix}/{i}"))
    elif isinstance(payload, (int, float)) and not isinstance(payload, bool):
        out[prefix] = float(payload)
    return out


@pytest.mark.parametrize(
    "args",
    [
        ["hessian", "--top", "2", "--probes", "2", "--steps", "8", "--trace-probes", "9", "--tol", "1e-9"],
        ["local-energy", "--samples", "3", "--sigma", "0.05,0.1"],
        ["local-entropy", "--gamma", "1x", "--steps", "20", "--burn-in", "5", "--chains", "2", "--lambda-max", "1"],
        ["landscape", "--1d", "--grid", "5"],
        ["sharpness", "--rho", "0.05", "--steps", "3", "--samples", "2"],
    ],
    ids=lambda a: a[0],
)
def test_results_equal_across_batch_sizes(args, tmp_path):
    """``--batch-size`` only cuts the split into microbatches: float64 results agree to 1e-10."""
    vals = []
    for bs in ("2048", "23"):
        r = run_cli([args[0], SAMPLES / "mlp-sgd.pt", *args[1:], "--max-samples", "100", "--dtype", "float64",
                     "--batch-size", bs, "-o", tmp_path / f"{bs}.h5", "--no-plot", "--json", "-q"])
        assert r.exit_code == 0, r.stderr
        vals.append(_numbers(json.loads(r.stdout)))
    assert vals[0].keys() == vals[1].keys() and len(vals[0]) > 3
    for key, v in vals[0].items():
        w = vals[1][key]
        assert (math.isnan(v) and math.isnan(w)) or abs(v - w) <= 1e-10 * max(1.0, abs(v)), (key, v, w)


# ------------------------------------------------------------------- the bound on a 5M-parameter model
def test_peak_memory_of_a_5m_parameter_model_stays_within_the_bound(tmp_path):
    """MLP 64-2000-2000-500-10 (5.1M float32 parameters, n) on 16 samples, measured in one fresh process
    (tests/memory_child.py: the RSS high-water mark, reset before each run, with glibc returning freed
    tensors to the kernel). Bound: one training step + (k + C) n 4 bytes, k = the vectors the run keeps
    (Lanczos: basis rows filled + eigenvectors; local energy: 4 per draw of a chunk; landscape: a float64
    row and its float32 copy per point of a call and two float64 directions), C = 6 (measured: 5.0, 1.3 and
    3.2; 8.9, 4.1 and 10.0 before the linearization kept views of w and its measurement stopped leaking,
    and 6.0 and 7.1 for hessian and landscape before it kept its graph's edges instead of the gradient,
    nn.Linear's two weight terms were summed in place and landscape points were formed in one tensor)."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", X=rng.standard_normal((16, 64)).astype(np.float32), y=rng.integers(0, 10, 16))
    spec = {"name": "mlp", "kwargs": {"in_features": 64, "out_features": 10, "widths": [2000, 2000, 500]}}
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path / "m.pt"), build_model(spec), spec, {"name": f"npz:{tmp_path / 'd.npz'}"}, "ce", {})
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "memory_child.py"), str(tmp_path / "m.pt"),
                        str(tmp_path)], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    n, vec, C = r["n"], 4 * r["n"], 6
    assert 5_000_000 < n < 5_300_000
    assert r["hessian_json"]["memory"]["basis_dtype"] == "float32"
    bounds = {"hessian": 6 + 1 + 5, "local_energy": 4 * 4, "landscape": 3 * 4 + 4}  # --max-iter 6: 6 basis rows
    for name, k in bounds.items():
        assert r[name] <= r["step"] + (k + C) * vec, (name, (r[name] - r["step"]) / vec, k + C)
    # doubling the Lanczos basis from 6 to 12 vectors adds about 6 vectors, not more
    added = (r["lanczos_12"] - r["lanczos_6"]) / vec
    assert 4.5 <= added <= 7.5, added


def test_cli_max_basis_and_basis_device_restart_to_the_same_eigenvalues(tmp_path):
    """``--max-basis 8 --basis-device cpu`` end to end: the basis restarts (more products than an
    unrestarted run needs is allowed), the plan records the options, the eigenvalues agree with the
    default run within their residuals."""
    runs = {}
    for name, extra in (("default", []), ("small", ["--max-basis", "8", "--basis-device", "cpu"])):
        args = ["hessian", SAMPLES / "mlp-sgd.pt", "--top", "3", "--no-density", "--trace-probes", "12"]
        r = run_cli(args + extra + ["--json", "-o", tmp_path / f"{name}.h5"])
        assert r.exit_code == 0, r.output
        runs[name] = json.loads(r.stdout)
    small, default = runs["small"], runs["default"]
    assert small["memory"]["max_basis"] == 8 and small["memory"]["basis_device"] == "cpu"
    assert small["eigen_status"] == "converged"
    # the trace's 4-row sketch measured whether blocks go vmapped or row by row, and the result says so
    assert small["memory"]["rows"] in ("vmap", "loop") and default["memory"]["rows"] in ("vmap", "loop")
    lam = np.array(default["eigenvalues"])
    bound = np.array(small["residuals"]) + np.array(default["residuals"])
    assert np.all(np.abs(np.array(small["eigenvalues"]) - lam) <= bound + 1e-12 * abs(lam[0]))
