"""Overhead of tracking λ_max during training: cold vs warm-started Lanczos (`CurvatureMonitor`).

SGD (lr 0.05, batch 64, no momentum) trains the default MLP (64-64, 8970 parameters) on digits for
``--steps`` optimizer steps, three ways on the same trajectory (tracking never changes it, tested):
untracked, tracked with ``CurvatureMonitor(every=50, measures=["lambda_max"])`` warm-started (the
default), and the same cold (``warm_start=False``: every call from the same seeded random vector).
The evaluation set is a seeded subset of ``--samples`` training rows, Lanczos tolerance ``--tol``.

Reported: the run's process CPU time (one thread: the work done, whatever else runs on a shared
machine; median over interleaved repeats), the overhead ``(tracked − untracked) / untracked``, the
monitor's own time per call (wall, median) and Hessian-vector products per call (the first call,
which has no previous vector, and the median of the others).

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_monitor.py [--steps 1000] [--every 50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from _machine import machine

from flatscope.data import load_data
from flatscope.models import build_model
from flatscope.monitor import CurvatureMonitor


def run(data, steps: int, mode: str, every: int, samples: int, tol: float):
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "kwargs": {"in_features": data.in_features, "out_features": data.n_outputs}})
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = None if mode == "untracked" else CurvatureMonitor(model, "ce", data, every=every, samples=samples, tol=tol,
                                                            measures=["lambda_max"], warm_start=mode == "warm")
    g = torch.Generator().manual_seed(0)
    X, y = data.X_train, data.y_train
    c0 = time.process_time()
    for step in range(steps):
        idx = torch.randint(0, X.shape[0], (64,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
        if mon is not None:
            mon.step(step + 1, lr=0.05)
    cpu = time.process_time() - c0
    return cpu, (mon.columns() if mon is not None else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data({"name": "digits", "kwargs": {}})
    modes = ("untracked", "warm", "cold")
    cpu = {m: [] for m in modes}
    cols = {}
    for _ in range(args.repeats):
        for m in modes:
            t, c = run(data, args.steps, m, args.every, args.samples, args.tol)
            cpu[m].append(t)
            cols[m] = c
    base = statistics.median(cpu["untracked"])
    print(f"# monitor overhead: {args.steps} SGD steps, lambda_max every {args.every} steps, {args.samples}-sample "
          f"evaluation set, tol {args.tol:g}, median of {args.repeats} interleaved repeats; {machine()}")
    print()
    print("| run | CPU s | overhead | calls | s per call (wall) | HVPs first call | HVPs per later call (median) | "
          "HVPs total |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| untracked | {base:.2f} | - | - | - | - | - | - |")
    for m in ("cold", "warm"):
        c = cols[m]
        t = statistics.median(cpu[m])
        h = c["lambda_max_hvps"]
        print(f"| {m} start | {t:.2f} | {(t - base) / base:+.1%} | {len(h)} | {np.median(c['cost_s']):.3f} | "
              f"{h[0]:.0f} | {np.median(h[1:]):.0f} | {h.sum():.0f} |")
    dl = np.abs(cols["warm"]["lambda_max"] - cols["cold"]["lambda_max"])
    print()
    print(f"max |λ_warm − λ_cold| over the calls: {dl.max():.2e} (λ_max from {cols['warm']['lambda_max'][0]:.3f} "
          f"to {cols['warm']['lambda_max'][-1]:.3f}; largest residual "
          f"{max(cols['warm']['lambda_max_residual'].max(), cols['cold']['lambda_max_residual'].max()):.1e})")


if __name__ == "__main__":
    main()
