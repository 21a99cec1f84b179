"""Benchmark of ``flatscope landscape`` against loss-landscapes (PyPI) on the digits sample checkpoints.

Measures, with 1 thread and interleaved repeats (medians and ratios from the same repeat):

A. the same 25x25 plane (flatscope's filter-normalized random directions, x, y in [-1, 1]) around each
   sample checkpoint: flatscope (``compute``, auto batching, loss *and* accuracy) vs loss-landscapes'
   ``planar_interpolation`` (loss only) on the very same plane, and vs 625 x one full-data forward pass;
B. agreement: the 1-D interpolation from the sample checkpoint to a second one trained with
   ``--seed 1`` (definition-free), flatscope vs ``linear_interpolation``, 25 steps;
C. the batching rule: seconds per point of the plain loop (``PointEvaluator``, what ``--batching loop``
   runs) and of vmapped calls (``Objective.evaluate_many``, 4 to 32 points per call) for several samples
   per forward pass.

Usage (loss-landscapes is a benchmark-only dependency):
    pip install --no-deps loss-landscapes==3.0.6
    PYTHONPATH=. python benchmarks/bench_landscape.py [--repeats 3] [--models mlp,cnn,resnet] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flatscope.analyses.landscape import (Grid, LandscapeResult, PointEvaluator, axis, choose_batching,  # noqa: E402
                                         compute)
from flatscope.checkpoint import load_checkpoint  # noqa: E402
from flatscope.data import load_data  # noqa: E402
from flatscope.directions import interpolation, random_directions  # noqa: E402
from flatscope.objective import Objective  # noqa: E402
from _machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

TRAIN_ARGS = {"mlp": ["--epochs", "30"], "cnn": ["--epochs", "20"], "resnet": ["--epochs", "10"]}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def flatscope_plane(obj, dirs, n):
    res = LandscapeResult("bench", dirs, Grid(axis(-1, 1, n), axis(-1, 1, n)), ["train"])
    compute(res, {"train": obj})
    return res


def ll_plane(ll, model, w, d1, d2, layout, X, y, n):
    """loss-landscapes' planar_interpolation on the plane w + x d1 + y d2, x, y in [-1, 1]."""
    h = 2.0 / (n - 1)

    def at(vec):
        m = copy.deepcopy(model)
        torch.nn.utils.vector_to_parameters(vec.to(torch.float32), [p for p in m.parameters()])
        return m.eval()

    start = w - d1 - d2       # planar_interpolation steps D = (end - start) / n from start
    m0, m1, m2 = at(start), at(start + n * h * d1), at(start + n * h * d2)
    metric = ll.metrics.Loss(torch.nn.CrossEntropyLoss(), X, y)
    return np.array(ll.planar_interpolation(m0, m1, m2, metric, steps=n, deepcopy_model=True))


def bench_model(name: str, repeats: int, ckpt_b: str, ll) -> dict:
    ck = load_checkpoint(str(ROOT / "sample_checkpoints" / f"{name}-sgd.pt"))
    X, y = load_data(ck.data_spec).split("train")
    obj = Objective(ck.model, X, y, loss="ce", batch_size=2048)
    w = obj.w0.to(torch.float64)
    dirs = random_directions(obj.w0, obj.layout, 2, torch.Generator().manual_seed(0)).rounded(torch.float32)
    n = 25
    model = copy.deepcopy(ck.model).eval()
    out: dict = {"model": name, "params": obj.dim, "samples": obj.n, "batching": choose_batching(obj)}
    t_fs, t_ll, t_ref = [], [], []
    fs_vals = ll_vals = None
    for _ in range(repeats):
        dt, res = timed(lambda: flatscope_plane(obj, dirs, n))
        t_fs.append(dt)
        fs_vals = res.loss["train"]
        dt, ll_vals = timed(lambda: ll_plane(ll, ck.model, w, dirs.vectors[0], dirs.vectors[1], obj.layout, X, y, n))
        t_ll.append(dt)
        with torch.no_grad():
            t_ref.append(timed(lambda: [model(X) for _ in range(n * n)])[0])
    out["plane_s"] = {"flatscope": statistics.median(t_fs), "loss_landscapes": statistics.median(t_ll),
                      "points_x_forward": statistics.median(t_ref)}
    out["ratio_ll_over_fs"] = statistics.median([b / a for a, b in zip(t_fs, t_ll)])
    out["ratio_fs_over_forward"] = statistics.median([a / c for a, c in zip(t_fs, t_ref)])
    # loss-landscapes' column i holds y-steps 1..n for even i and 0..n-1 for odd i (its serpentine walk
    # inserts odd columns one step lower); compare each column on the points both grids hold.
    diffs_as_documented, diffs_shifted = [], []
    for i in range(n):
        col = ll_vals[i]
        ours = fs_vals[:, i]      # fs_vals[j, i] is at (x_i, y_j)
        diffs_as_documented.append(np.abs(col[:-1] - ours[1:]).max())
        shift = 1 if i % 2 == 0 else 0
        diffs_shifted.append(np.abs(col[: n - shift] - ours[shift:]).max())
    out["plane_max_abs_diff"] = float(max(diffs_shifted))
    out["plane_max_abs_diff_if_columns_aligned"] = float(max(diffs_as_documented))

    # B. 1-D interpolation agreement (a's BatchNorm buffers along the line, as loss-landscapes does)
    cb = load_checkpoint(ckpt_b)
    obj_b = Objective(cb.model, X, y, loss="ce", batch_size=2048)
    line = interpolation(obj.w0, [obj_b.w0], obj.layout)
    res = LandscapeResult("interp", line, Grid(axis(0, 1, n + 1)), ["train"])
    t_fs_line, _ = timed(lambda: compute(res, {"train": obj}))
    metric = ll.metrics.Loss(torch.nn.CrossEntropyLoss(), X, y)
    t_ll_line, ll_line = timed(lambda: np.array(ll.linear_interpolation(ck.model, cb.model, metric, steps=n,
                                                                         deepcopy_model=True)))
    out["interp_max_abs_diff"] = float(np.abs(ll_line - res.loss["train"][1:]).max())
    out["interp_s"] = {"flatscope": t_fs_line, "loss_landscapes": t_ll_line}
    return out


def bench_batching(name: str, repeats: int, sizes=(64, 256, 512, 2048), points: int = 32) -> list[dict]:
    ck = load_checkpoint(str(ROOT / "sample_checkpoints" / f"{name}-sgd.pt"))
    X, y = load_data(ck.data_spec).split("train")
    rows = []
    for bs in sizes:
        obj = Objective(ck.model, X, y, loss="ce", batch_size=bs)
        W = obj.w0 + 0.01 * torch.randn(points, obj.dim, generator=torch.Generator().manual_seed(0))
        ev = PointEvaluator(obj)
        modes = {"loop": lambda: [ev(W[i]) for i in range(points)]}
        for m in (4, 8, 16, 32):
            modes[f"vmap{m}"] = (lambda m=m: [obj.evaluate_many(W[s:s + m]) for s in range(0, points, m)])
        times = {k: [] for k in modes}
        for _ in range(repeats):
            for k, f in modes.items():
                times[k].append(timed(f)[0] / points)
        row = {"model": name, "samples_per_forward": min(bs, obj.n)}
        row.update({k: statistics.median(v) for k, v in times.items()})
        row.update({f"{k}_min": min(v) for k, v in times.items()})
        row["best"] = min(modes, key=lambda k: row[k])
        row["best_by_min"] = min(modes, key=lambda k: row[f"{k}_min"])
        row["rule"] = choose_batching(obj)
        rows.append(row)
        print(f"  batching {name} {row['samples_per_forward']:5d} samples/forward: "
              + "  ".join(f"{k} {row[k] * 1e3:.2f} ms" for k in modes) + f"  -> best {row['best']} (by min {row['best_by_min']}), rule {row['rule']}",
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="mlp,cnn,resnet")
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-batching", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import loss_landscapes as ll
    import loss_landscapes.metrics  # noqa: F401

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores visible, torch {torch.__version__}, 1 thread", flush=True)
    results = {"machine": cpu_name(), "torch": str(torch.__version__), "models": [], "batching": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            b = os.path.join(tmp, f"{name}-seed1.pt")
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            subprocess.run([sys.executable, "-m", "flatscope", "train", "--model", name, "--data", "digits", "--opt", "sgd",
                            "--lr", "0.05", "--seed", "1", "--threads", "1", "-q", "-o", b] + TRAIN_ARGS[name],
                           check=True, env=env)
            r = bench_model(name, args.repeats, b, ll)
            results["models"].append(r)
            p = r["plane_s"]
            print(f"{name:6s} {r['params']:6d} params  25x25 plane: flatscope {p['flatscope']:.2f} s ({r['batching']}), "
                  f"loss-landscapes {p['loss_landscapes']:.2f} s, 625 forwards {p['points_x_forward']:.2f} s | "
                  f"loss-landscapes/flatscope {r['ratio_ll_over_fs']:.2f}x, flatscope/forwards "
                  f"{r['ratio_fs_over_forward']:.2f}x | plane max|diff| {r['plane_max_abs_diff']:.1e} "
                  f"(columns as documented: {r['plane_max_abs_diff_if_columns_aligned']:.1e}) | "
                  f"interpolation max|diff| {r['interp_max_abs_diff']:.1e}", flush=True)
            if not args.skip_batching:
                results["batching"] += bench_batching(name, args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
