"""Cost of the objective's products on the sample checkpoints: one gradient, and one Hessian-vector
product by forward-over-reverse (jvp of grad, the torch.func recipe), by reverse-over-reverse
(``Objective.hvp``, what flatscope uses) and by the cached operator (``Objective.hvp_operator``).

    OMP_NUM_THREADS=1 python benchmarks/bench_objective.py --repeats 15

Interleaved repeats, medians, ratios to one gradient (whole training split, one batch).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.func import grad, jvp

from flatscope.checkpoint import load_checkpoint
from flatscope.data import load_data
from flatscope.objective import Objective

from _machine import machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]


def fwd_over_rev(obj: Objective, v: torch.Tensor) -> torch.Tensor:
    g = grad(obj._batch_loss)
    out = torch.zeros_like(v)
    for xb, yb, wt in obj.batches():
        out += wt * jvp(lambda p: g(p, xb, yb), (obj.w0,), (v,))[1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(machine() + "\n")
    print("| model | params | gradient ms | fwd-over-rev | rev-over-rev (`hvp`) | cached (`hvp_operator`) |")
    print("|---|---|---|---|---|---|")
    for name in ("mlp", "cnn", "resnet"):
        ck = load_checkpoint(str(ROOT / "sample_checkpoints" / f"{name}-sgd.pt"))
        X, y = load_data(ck.data_spec).split("train")
        obj = Objective(ck.model, X, y)
        v = torch.randn(obj.dim, generator=torch.Generator().manual_seed(0))
        op = obj.hvp_operator()
        ref = obj.hvp(v)
        assert torch.allclose(fwd_over_rev(obj, v), ref, rtol=1e-4, atol=1e-6)
        assert torch.allclose(op(v), ref, rtol=1e-5, atol=1e-7)
        fns = {"grad": lambda: obj.loss_and_grad(), "fwd": lambda: fwd_over_rev(obj, v),
               "rev": lambda: obj.hvp(v), "cached": lambda: op(v)}
        times = {k: [] for k in fns}
        for f in fns.values():
            f()
        for _ in range(args.repeats):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(t) * 1e3 for k, t in times.items()}
        cells = [f"{med[k]:.1f} ({med[k] / med['grad']:.2f}x)" for k in ("fwd", "rev", "cached")]
        print(f"| {name} | {obj.dim} | {med['grad']:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
