"""The fraction of negative Hessian eigenvalues from SLQ against the dense count.

A ReLU MLP (64-20-10, 1,510 parameters) on the digits training split, at its initialization (a
saddle: a large share of negative curvature), float64. The reference is the dense count of
``eigh(exact_hessian)``; the estimators share the SLQ run of ``flatscope hessian``'s defaults
(8 probes x 80 Lanczos steps) and of 64 probes:

- ``gauss``: the Gauss rules' count sum_{node<0} w (what ``negative_fraction`` was before);
- ``radau``: the mean midpoint of the Gauss-Radau brackets at 0 (what it is now), with its standard
  error over probes and its bias bound (the mean bracket half-width).

    python benchmarks/bench_negative_fraction.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flatscope.data import load_data
from flatscope.linalg import dense_matvec, slq
from flatscope.models import build_model
from flatscope.objective import Objective, exact_hessian
from _machine import machine


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=5, help="SLQ probe seeds")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(machine())
    torch.manual_seed(0)
    ds = load_data({"name": "digits"})
    X, y = ds.split("train")
    model = build_model({"name": "mlp", "kwargs": {"in_features": 64, "out_features": 10, "widths": [20]}})
    obj = Objective(model, X, y, dtype=torch.float64)
    t0 = time.time()
    H = exact_hessian(obj)
    lam = torch.linalg.eigvalsh(H).numpy()
    exact = float(np.mean(lam < 0))
    print(f"n = {obj.dim}, dense Hessian + eigh {time.time() - t0:.1f} s: {int(np.sum(lam < 0))} negative "
          f"eigenvalues, fraction {exact:.4f}; {int(np.sum(np.abs(lam) < 1e-6 * np.abs(lam).max()))} with "
          f"|lambda| < 1e-6 lambda_max")
    mv = dense_matvec(H)
    for probes, steps in ((8, 80), (64, 80), (8, 160)):
        for seed in range(a.seeds if probes == 8 else 1):
            r = slq(mv, obj.dim, probes, steps, seed=seed)
            f = r.fraction_below(0.0)
            print(f"probes {probes:3d} steps {steps:3d} seed {seed}: gauss {f['gauss']:.4f} "
                  f"(error {f['gauss'] - exact:+.4f})   radau {f['estimate']:.4f} ± {f['stderr']:.4f} "
                  f"(bias bound {f['bias_bound']:.4f}, bracket [{f['lo']:.4f}, {f['hi']:.4f}]; "
                  f"error {f['estimate'] - exact:+.4f} = {(f['estimate'] - exact) / f['err']:+.2f} err)", flush=True)


if __name__ == "__main__":
    main()
