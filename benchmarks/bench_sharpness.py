"""Sharpness against the reference implementation of Andriushchenko et al. 2023 (tml-epfl/sharpness-vs-generalization).

Both compute m-sharpness on the same checkpoint, the same sub-batches and the same radius:

- flatscope: :func:`flatscope.analyses.sharpness.sharpness` with ``m`` (projected gradient ascent in
  the scaled variable ``u = δ ⊘ c``, monotone step halving, one restart from δ = 0);
- reference: ``eval_APGD_sharpness`` of their ``sharpness.py`` (normalized-gradient ascent with
  momentum 0.75, APGD-style step-size halving at checkpoints, start at δ = 0 as their
  ``eval_sharpness.py`` does by default, i.e. without ``--sharpness_rand_init``), called with the
  sub-batches flatscope uses, each as ``(x, None, y, None, None)``;
- average case: their ``eval_average_sharpness`` (δ ~ N(0, σ² |w|²) per coordinate, fresh draws per
  batch) against flatscope's ``average="gaussian"`` at ``ρ = σ √d`` (the same distribution) over the
  samples of the same sub-batches.

Their code calls ``.cuda()`` on tensors; on a machine without a GPU this script makes
``torch.Tensor.cuda`` the identity inside this process (no file of theirs is changed). Their code is
not part of flatscope: pass the folder of a checkout (``git clone
https://github.com/tml-epfl/sharpness-vs-generalization``) as ``--reference``; without it only
flatscope's side runs.

Times are process CPU seconds with one thread (the work done, whatever else runs on a shared
machine), the median of ``--repeats`` interleaved repeats; wall seconds beside them.

Usage: python benchmarks/bench_sharpness.py --reference PATH [--repeats 3] [--threads 1] [--steps 20] [--m 128]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from _machine import cpu_name

from flatscope.analyses.sharpness import sharpness, sub_batches
from flatscope.checkpoint import load_checkpoint
from flatscope.data import load_data
from flatscope.objective import Objective

# (label, norm, adaptive, rho)
CASES = [("adaptive l2", "l2", True, 0.5), ("standard l2", "l2", False, 0.05),
         ("adaptive linf", "linf", True, 0.005), ("standard linf", "linf", False, 0.0005)]


def timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs), process CPU seconds, wall seconds)."""
    c, w = time.process_time(), time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.process_time() - c, time.perf_counter() - w


def med(rows, i: int) -> float:
    return statistics.median(r[i] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", default=None, help="folder of a tml-epfl/sharpness-vs-generalization checkout")
    ap.add_argument("--checkpoint", default="sample_checkpoints/mlp-sgd.pt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--m", type=int, default=128)
    ap.add_argument("--avg-sigma", type=float, default=0.01, help="their σ for the average case (adaptive l2)")
    ap.add_argument("--avg-samples", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ck = load_checkpoint(args.checkpoint)
    X, y = load_data(ck.data_spec).split("train")
    obj = Objective(ck.model, X, y, loss=ck.loss)
    parts = sub_batches(obj.n, args.m, 0)
    used = np.concatenate(parts)
    batches = [(obj.X[ix], None, obj.y[ix], None, None) for ix in parts]
    ref = None
    if args.reference:
        torch.Tensor.cuda = lambda self, *a, **k: self    # their code calls .cuda(); CPU here
        sys.path.insert(0, os.path.abspath(args.reference))
        import sharpness as ref  # their sharpness.py

    # warm-up (torch.func's first call and the allocator), untimed
    sharpness(obj, [0.1], m=args.m, steps=2, samples=2, seed=0)
    if ref is not None:
        with contextlib.redirect_stdout(io.StringIO()):
            ref.eval_APGD_sharpness(copy.deepcopy(ck.model).eval(), batches[:1], F.cross_entropy, None, None, rho=0.1,
                                    n_iters=2, n_restarts=1, rand_init=False, adaptive=False, norm="l2")
    print(f"# sharpness benchmark: {args.checkpoint} ({obj.dim:,} parameters), digits train, {len(parts)} sub-batches "
          f"of m = {args.m} ({used.size} samples), {args.steps} ascent steps, 1 restart from δ = 0, float32, "
          f"{args.threads} thread(s), torch {torch.__version__}, {cpu_name()}, median of {args.repeats} interleaved "
          "repeats; CPU = process time, wall = elapsed")
    print()
    print("| ball | ρ | flatscope worst | reference worst | flatscope δ err | reference δ err | "
          "flatscope CPU (s) | reference CPU (s) | flatscope wall (s) | reference wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, norm, adaptive, rho in CASES:
        mine, theirs = [], []
        for _ in range(args.repeats):
            res, c, w = timed(sharpness, obj, [rho], norm=norm, adaptive=adaptive, eta=0.0, m=args.m,
                              steps=args.steps, restarts=1, samples=0, seed=0)
            res = res.curves["train"]
            mine.append((float(res.worst[0]), float(res.worst_error[0].mean()), c, w))
            if ref is not None:
                model = copy.deepcopy(ck.model).eval()
                with contextlib.redirect_stdout(io.StringIO()):
                    vals, c, w = timed(ref.eval_APGD_sharpness, model, batches, F.cross_entropy, None, None, rho=rho,
                                       n_iters=args.steps, n_restarts=1, rand_init=False, adaptive=adaptive, norm=norm,
                                       version="default")
                theirs.append((float(vals[0]), float(vals[1]), c, w))
        r_cols = ([f"{med(theirs, 0):.5g}", f"{med(theirs, 1):.4f}", f"{med(theirs, 2):.2f}", f"{med(theirs, 3):.2f}"]
                  if theirs else ["-"] * 4)
        print(f"| {label} | {rho:g} | {med(mine, 0):.5g} | {r_cols[0]} | {med(mine, 1):.4f} | {r_cols[1]} | "
              f"{med(mine, 2):.2f} | {r_cols[2]} | {med(mine, 3):.2f} | {r_cols[3]} |")

    # average case, adaptive l2: theirs N(0, σ²|w|²) per coordinate; flatscope gaussian at ρ = σ √d
    sigma, n = args.avg_sigma, args.avg_samples
    sub = obj.subset(torch.as_tensor(np.sort(used)))
    rho = sigma * math.sqrt(obj.dim)
    res, c, w = timed(sharpness, sub, [rho], norm="l2", adaptive=True, average="gaussian", samples=n, steps=1, seed=0)
    res = res.curves["train"]
    print()
    print(f"average case, adaptive l2, their σ = {sigma:g} (flatscope ρ = σ√d = {rho:.4g}), {n} draws: "
          f"flatscope {float(res.average[0]):.5g} ± {float(res.average_sem[0]):.2g} (s.e.), {c:.2f} s CPU "
          f"(over the {used.size} samples, the same draws on every sub-batch)", end="")
    if ref is not None:
        torch.manual_seed(0)
        model = copy.deepcopy(ck.model).eval()
        with contextlib.redirect_stdout(io.StringIO()):
            vals, c, w = timed(ref.eval_average_sharpness, model, batches, F.cross_entropy, n_iters=n, rho=sigma,
                               adaptive=True, norm="l2")
        print(f"; reference {float(vals[0]):.5g}, {c:.2f} s CPU ({n} fresh draws per sub-batch)")
    else:
        print()


if __name__ == "__main__":
    main()
