"""Benchmark of `flatscope hessian` against pyhessian, hessian-eigenthings and curvlinops + scipy eigsh.

One run covers the three sample checkpoints (digits MLP, CNN, ResNet with BatchNorm in eval mode),
the whole training split (1347 samples, one batch), float32 models as each tool is used by default:

1. HVP cost: gradient vs one Hessian-vector product (cached double backward, rebuilt double
   backward, forward-over-reverse), interleaved repeats, medians and ratios.
2. Top-5 eigenvalues: wall time (median over interleaved repeats), HVP count, relative error
   against a float64 reference (flatscope Lanczos at tol 1e-12 on float64 HVPs, cross-checked with
   scipy eigsh on the same float64 operator).
3. Lanczos design: HVP counts for block sizes 1/2/4 and thick restart vs none (top-5, bottom-5).
4. Trace: Hutch++ vs Hutchinson at the same budget (spread over seeds), pyhessian's Hutchinson,
   hessian-eigenthings' Hutch++; reference = float64 Hutch++ with 900 products (its s.e.).
5. Density: flatscope SLQ vs pyhessian (needs a shim for the removed torch.eig) vs
   hessian-eigenthings; time, HVPs, and the density's mean against the reference trace / n.

Competitors are benchmark-only dependencies, installed e.g. in a venv:
    pip install --no-deps pyhessian hessian-eigenthings curvlinops-for-pytorch \
        backpack-for-pytorch einops einconv linear_operator opt-einsum tqdm unfoldNd
Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_hessian.py --repeats 3 > bench_hessian.md
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flatscope.analyses.hessian import HessianOperator  # noqa: E402
from flatscope.checkpoint import load_checkpoint  # noqa: E402
from flatscope.data import load_data  # noqa: E402
from flatscope.linalg import lanczos, slq, trace  # noqa: E402
from flatscope.objective import Objective  # noqa: E402
from _machine import machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

K = 5


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def rel_err(vals, ref):
    vals = np.sort(np.asarray(vals, dtype=np.float64))[::-1][: len(ref)]
    if len(vals) < len(ref) or not np.all(np.isfinite(vals)):
        return float("nan")
    return float(np.max(np.abs(vals - ref) / np.abs(ref)))


# ------------------------------------------------------------------ competitors (each counts its HVPs)

class _Skip(Exception):
    pass


class Counter:
    def __init__(self):
        self.n = 0


def run_pyhessian_top(model, X, y, k, tol=1e-3):
    ph = importlib.import_module("pyhessian.hessian")

    c = Counter()
    orig = ph.hessian_vector_product

    def counted(gradsH, params, v):
        c.n += 1
        return orig(gradsH, params, v)

    ph.hessian_vector_product = counted
    try:
        m = copy.deepcopy(model)
        torch.manual_seed(0)
        h = ph.hessian(m, torch.nn.CrossEntropyLoss(), data=(X, y), cuda=False)
        vals, _ = h.eigenvalues(top_n=k, tol=tol)  # defaults: maxIter=100, tol=1e-3 per eigenvalue
    finally:
        ph.hessian_vector_product = orig
    return np.array(vals), c.n


def eigenthings_operator(model, X, y):
    import hessian_eigenthings as he

    m = copy.deepcopy(model).eval()
    op = he.HessianOperator(m, [(X, y)], he.supervised_loss(torch.nn.CrossEntropyLoss()))
    c = Counter()

    def mv(v):
        c.n += 1
        return op.matvec(v)

    return he.LambdaOperator(mv, size=op.size, device=op.device, dtype=op.dtype), c


def run_eigenthings_lanczos(model, X, y, k, max_iter=None):
    import hessian_eigenthings as he

    op, c = eigenthings_operator(model, X, y)
    r = he.lanczos(op, k=k, which="LA", seed=0, max_iter=max_iter)
    return r.eigenvalues.detach().cpu().numpy(), c.n


def run_eigenthings_power(model, X, y, k):
    import hessian_eigenthings as he

    op, c = eigenthings_operator(model, X, y)
    r = he.deflated_power_iteration(op, k=k, seed=0)
    return r.eigenvalues.detach().cpu().numpy(), c.n


def run_curvlinops_eigsh(model, X, y, k):
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    m = copy.deepcopy(model).eval()
    params = [p for p in m.parameters() if p.requires_grad]
    H = HessianLinearOperator(m, torch.nn.CrossEntropyLoss(), params, [(X, y)], check_deterministic=False)
    Hs = H.to_scipy()
    c = Counter()

    def mv(v):
        c.n += 1
        return Hs @ v

    A = LinearOperator(Hs.shape, matvec=mv, dtype=Hs.dtype)
    vals = eigsh(A, k=k, which="LA", return_eigenvectors=False, v0=np.random.default_rng(0).standard_normal(Hs.shape[0]))
    return np.sort(vals)[::-1], c.n


def run_flatscope_top(obj, k, **kw):
    op = HessianOperator(obj)
    r = lanczos(op, obj.dim, k, seed=0, device=obj.device, **kw)
    op.release()
    return r.eigenvalues, r.n_matvec, r


def run_scipy_eigsh_on_flatscope(obj, k):
    from scipy.sparse.linalg import LinearOperator, eigsh

    op = HessianOperator(obj)
    A = LinearOperator((obj.dim, obj.dim), dtype=np.float64,
                       matvec=lambda v: op(torch.as_tensor(np.ravel(v))).double().numpy())
    vals = eigsh(A, k=k, which="LA", return_eigenvectors=False, v0=np.random.default_rng(0).standard_normal(obj.dim))
    op.release()
    return np.sort(vals)[::-1], op.n_matvec


# ------------------------------------------------------------------ sections

def hvp_cost(obj, repeats):
    v = torch.randn(obj.dim, generator=torch.Generator().manual_seed(0))
    ops = {m: HessianOperator(obj, mode=m) for m in ("cached", "double-backward")}
    fns = {"grad": lambda: obj.loss_and_grad(), **{m: (lambda o=o: o(v)) for m, o in ops.items()}}
    for f in fns.values():
        f()
    ts = {k: [] for k in fns}
    for _ in range(max(repeats, 5)):
        for k, f in fns.items():
            _, dt = timed(f)
            ts[k].append(dt)
    med = {k: statistics.median(x) for k, x in ts.items()}
    return med


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="mlp,cnn,resnet")
    ap.add_argument("--trace-seeds", type=int, default=5)
    ap.add_argument("--cost-repeats", type=int, default=15)
    ap.add_argument("--sections", default="cost,top,matched,design,trace,density",
                    help="comma-separated subset of cost,top,matched,design,trace,density")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    torch.set_num_threads(1)
    print(f"# bench_hessian\n\nmachine: {machine()}\n")
    print(f"command: `OMP_NUM_THREADS=1 python benchmarks/bench_hessian.py --repeats {args.repeats} "
          f"--models {args.models} --trace-seeds {args.trace_seeds} --cost-repeats {args.cost_repeats} "
          f"--sections {args.sections}`\n")
    rows_top, rows_cost, rows_design, rows_trace, rows_density, notes = [], [], [], [], [], []
    rows_matched = []
    for name in args.models.split(","):
        ck = load_checkpoint(str(ROOT / "sample_checkpoints" / f"{name}-sgd.pt"))
        X, y = load_data(ck.data_spec).split("train")
        o32 = Objective(ck.model, X, y, loss=ck.loss)
        o64 = Objective(ck.model, X, y, loss=ck.loss, dtype=torch.float64)
        model = o32.model            # eval mode, float32, same weights as the objective
        n = o32.dim
        print(f"## {name}: {n} parameters, {o32.n} samples\n", file=sys.stderr)

        # reference
        if sections & {"top", "matched"}:
            (ref_vals, _, ref), t_ref = timed(lambda: run_flatscope_top(o64, K, tol=1e-12, max_iter=3000))
            (chk_vals, chk_n), _ = timed(lambda: run_scipy_eigsh_on_flatscope(o64, K))
            notes.append(f"{name}: float64 reference top-5 {np.array2string(ref_vals, precision=6)}; "
                         f"scipy eigsh on the float64 operator agrees to {rel_err(chk_vals, ref_vals):.1e} relative "
                         f"(flatscope {ref.n_matvec} / eigsh {chk_n} float64 HVPs)")

        # 1. HVP cost
        if "cost" in sections:
            med = hvp_cost(o32, args.cost_repeats)
            rows_cost.append([name, n, f"{med['grad'] * 1e3:.1f}"] +
                             [f"{med[m] * 1e3:.1f} ({med[m] / med['grad']:.2f}x)" for m in ("cached", "double-backward")])

        # 2b. accuracy-matched: pyhessian's power iteration asked for a 1e-6 relative change
        if "matched" in sections:
            for label, fn in [("flatscope lanczos (tol 1e-5)", lambda: run_flatscope_top(o32, K)[:2]),
                              ("pyhessian power iteration (tol 1e-6)",
                               lambda: run_pyhessian_top(model, o32.X, o32.y, K, tol=1e-6))]:
                (vals, cnt), dt = timed(fn)
                rows_matched.append([name, label, f"{dt:.2f}", cnt, f"{rel_err(vals, ref_vals):.1e}"])

        # 2. top-5
        methods = {} if "top" not in sections else {
            "flatscope lanczos (tol 1e-5)": lambda: run_flatscope_top(o32, K)[:2],
            "scipy eigsh on flatscope HVPs": lambda: run_scipy_eigsh_on_flatscope(o32, K),
            "curvlinops + scipy eigsh": lambda: run_curvlinops_eigsh(model, o32.X, o32.y, K),
            "pyhessian power iteration": lambda: run_pyhessian_top(model, o32.X, o32.y, K),
            "eigenthings lanczos (default 2k steps)": lambda: run_eigenthings_lanczos(model, o32.X, o32.y, K),
            "eigenthings lanczos (40 steps)": lambda: run_eigenthings_lanczos(model, o32.X, o32.y, K, 40),
            "eigenthings deflated power": lambda: run_eigenthings_power(model, o32.X, o32.y, K),
        }
        times = {m: [] for m in methods}
        result = {}
        for r in range(args.repeats):
            for m, fn in methods.items():
                if m in result and result[m] is None:
                    continue
                try:
                    (vals, cnt), dt = timed(fn)
                    result[m] = (vals, cnt)
                    times[m].append(dt)
                except Exception as exc:  # report, never hide
                    result[m] = None
                    notes.append(f"{name}: {m} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                    traceback.print_exc()
        base = statistics.median(times["flatscope lanczos (tol 1e-5)"]) if methods else 1.0
        for m in methods:
            if result.get(m) is None:
                rows_top.append([name, m, "failed", "", "", ""])
                continue
            vals, cnt = result[m]
            t = statistics.median(times[m])
            rows_top.append([name, m, f"{t:.2f}", f"{t / base:.1f}x", cnt, f"{rel_err(vals, ref_vals):.1e}"])

        # 3. Lanczos design (HVP counts)
        for label, which, kw in [] if "design" not in sections else [("top-5 b=1", "largest", {}), ("top-5 b=2", "largest", {"block_size": 2}),
                                 ("top-5 b=4", "largest", {"block_size": 4}),
                                 ("top-5 b=1 restart at 20", "largest", {"max_basis": 20}),
                                 ("bottom-5 b=1", "smallest", {}),
                                 ("bottom-5 b=1 restart at 45", "smallest", {"max_basis": 45}),
                                 ("bottom-5 b=2", "smallest", {"block_size": 2})]:
            op = HessianOperator(o32)
            r, dt = timed(lambda: lanczos(op, n, K, which, seed=0, max_iter=1500, **kw))
            op.release()
            rows_design.append([name, label, r.n_matvec, r.n_restarts, f"{dt:.2f}", bool(r.all_converged)])

        # 4. trace (reference: float64 Hutch++ with 900 products; float32 with 300 for the density alone)
        if "trace" in sections:
            op64 = HessianOperator(o64)
            tref = trace(op64, n, 900, method="hutch++", seed=123)
            op64.release()
        elif "density" in sections:
            op = HessianOperator(o32)
            tref = trace(op, n, 300, method="hutch++", seed=123)
            op.release()
            notes.append(f"{name}: density reference trace = float32 Hutch++ with 300 products: "
                         f"{tref.trace:.5g} +- {tref.stderr:.2g}")
        tr_rows = {}
        for meth in ("hutch++", "hutchinson") if "trace" in sections else ():
            ests, ses, dts = [], [], []
            for s in range(args.trace_seeds):
                op = HessianOperator(o32)
                r, dt = timed(lambda: trace(op, n, 60, method=meth, seed=s))
                op.release()
                ests.append(r.trace), ses.append(r.stderr), dts.append(dt)
            tr_rows[meth] = (np.mean(ests), np.std(ests, ddof=1), np.mean(ses), 60, statistics.median(dts))
        try:
            if "trace" not in sections:
                raise _Skip
            ph = importlib.import_module("pyhessian.hessian")

            c = Counter()
            orig = ph.hessian_vector_product
            ph.hessian_vector_product = lambda g, p, v: (setattr(c, "n", c.n + 1), orig(g, p, v))[1]
            torch.manual_seed(0)
            h = ph.hessian(copy.deepcopy(model), torch.nn.CrossEntropyLoss(), data=(o32.X, o32.y), cuda=False)
            samples, dt = timed(lambda: h.trace())
            ph.hessian_vector_product = orig
            tr_rows["pyhessian hutchinson (default tol 1e-3)"] = (np.mean(samples), float("nan"),
                                                                   np.std(samples, ddof=1) / math.sqrt(len(samples)), c.n, dt)
        except _Skip:
            pass
        except Exception as exc:
            notes.append(f"{name}: pyhessian trace failed: {type(exc).__name__}: {exc}")
        try:
            if "trace" not in sections:
                raise _Skip
            import hessian_eigenthings as he

            opx, c = eigenthings_operator(model, o32.X, o32.y)
            r, dt = timed(lambda: he.trace(opx, num_matvecs=60, method="hutch++", seed=0))
            tr_rows["eigenthings hutch++ (60)"] = (r.estimate, float("nan"), r.stderr, c.n, dt)
        except _Skip:
            pass
        except Exception as exc:
            notes.append(f"{name}: eigenthings trace failed: {type(exc).__name__}: {exc}")
        for meth, (m, sd, se, cnt, dt) in tr_rows.items():
            label = f"flatscope {meth} (60)" if meth in ("hutch++", "hutchinson") else meth
            rows_trace.append([name, label, f"{m:.5g}", "" if not np.isfinite(sd) else f"{sd:.2g}", f"{se:.2g}",
                               f"{(m - tref.trace) / tref.trace:+.1e}", cnt, f"{dt:.2f}"])
        if "trace" in sections:
            rows_trace.append([name, "reference: float64 hutch++ (900)", f"{tref.trace:.5g}", "", f"{tref.stderr:.2g}", "", 900, ""])

        # 5. density
        if "density" not in sections:
            print(f"done {name}", file=sys.stderr)
            continue
        tr_over_n = tref.trace / n
        op = HessianOperator(o32)
        d, dt = timed(lambda: slq(op, n, 8, 80, seed=0))
        op.release()
        g, v = d.density(d.default_sigma(0.01))
        mean, se = d.integral(lambda x: x)
        rows_density.append([name, "flatscope slq (8 x 80)", d.n_matvec, f"{dt:.2f}", f"{np.trapezoid(v, g):.6f}",
                             f"{mean / tr_over_n:.3f} +- {se / tr_over_n:.3f}"])
        try:
            ph = importlib.import_module("pyhessian.hessian")

            h = ph.hessian(copy.deepcopy(model), torch.nn.CrossEntropyLoss(), data=(o32.X, o32.y), cuda=False)
            try:
                h.density(iter=2, n_v=1)
                rows_density.append([name, "pyhessian density (PyPI 0.1)", "", "", "", "ran"])
            except (AttributeError, RuntimeError) as exc:
                first = str(exc).strip().splitlines()[0]
                notes.append(f"{name}: pyhessian density as released on PyPI (0.1) fails on torch {torch.__version__}: "
                             f"{type(exc).__name__}: {first} (torch.eig is gone); rerun with a torch.eig shim "
                             "built on torch.linalg.eigh, which is what the repository fix does")

                def eig_shim(T, eigenvectors=True):
                    w, V = torch.linalg.eigh(T)
                    return torch.stack([w, torch.zeros_like(w)], 1), V

                saved_eig = torch.eig
                torch.eig = eig_shim
                c = Counter()
                orig = ph.hessian_vector_product
                ph.hessian_vector_product = lambda gg, p, vv: (setattr(c, "n", c.n + 1), orig(gg, p, vv))[1]
                (nodes, weights), dt = timed(lambda: h.density(iter=80, n_v=8))
                ph.hessian_vector_product = orig
                torch.eig = saved_eig
                nodes, weights = np.array(nodes), np.array(weights)
                pm = np.sum(nodes * weights, axis=1)
                rows_density.append([name, "pyhessian density + eig shim (8 x 80)", c.n, f"{dt:.2f}",
                                     f"{weights.sum(axis=1).mean():.6f} (weights)",
                                     f"{pm.mean() / tr_over_n:.3f} +- {pm.std(ddof=1) / math.sqrt(len(pm)) / tr_over_n:.3f}"])
        except Exception as exc:
            notes.append(f"{name}: pyhessian density failed: {type(exc).__name__}: {exc}")
        try:
            import hessian_eigenthings as he

            opx, c = eigenthings_operator(model, o32.X, o32.y)
            r, dt = timed(lambda: he.spectral_density(opx, num_runs=8, lanczos_steps=80, seed=0))
            gg, vv = r.grid.double().numpy(), r.density.double().numpy()
            w = r.raw_weights.double().numpy()
            nd = np.nan_to_num(r.raw_eigenvalues.double().numpy())
            pm = np.sum(nd * w, axis=1)
            rows_density.append([name, "eigenthings spectral_density (8 x 80)", c.n, f"{dt:.2f}",
                                 f"{np.trapezoid(vv, gg):.6f}",
                                 f"{pm.mean() / tr_over_n:.3f} +- {pm.std(ddof=1) / math.sqrt(len(pm)) / tr_over_n:.3f}"])
        except Exception as exc:
            notes.append(f"{name}: eigenthings density failed: {type(exc).__name__}: {exc}")
        print(f"done {name}", file=sys.stderr)

    def table(header, rows):
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in rows:
            print("| " + " | ".join(str(x) for x in r) + " |")
        print()

    if rows_cost:
        print("### HVP cost (median ms per product over interleaved repeats; ratio to one gradient)\n")
        table(["model", "params", "gradient ms", "cached (Objective.hvp_operator)", "rebuilt (Objective.hvp)"], rows_cost)
    if rows_top:
        print("### Top-5 eigenvalues (float32 models; error vs float64 reference)\n")
        table(["model", "method", "wall s (median)", "time / flatscope", "HVPs", "max rel. error"], rows_top)
    if rows_matched:
        print("### Top-5 at matched accuracy: pyhessian power iteration with tol 1e-6 (one run each)\n")
        table(["model", "method", "wall s", "HVPs", "max rel. error"], rows_matched)
    if rows_design:
        print("### Lanczos design: HVPs to tol 1e-5 (flatscope, float32)\n")
        table(["model", "variant", "HVPs", "restarts", "wall s", "converged"], rows_design)
    if rows_trace:
        print("### Trace (estimate, spread over seeds, mean reported s.e., error vs reference)\n")
        table(["model", "method", "estimate", "sd over seeds", "s.e.", "rel. error", "HVPs", "wall s"], rows_trace)
    if rows_density:
        print("### Spectral density (mean of the density / (trace / n), with its s.e.)\n")
        table(["model", "method", "HVPs", "wall s", "integral", "mean / (tr/n)"], rows_density)
    print("### Notes\n")
    for ln in notes:
        print(f"- {ln}")


if __name__ == "__main__":
    main()
