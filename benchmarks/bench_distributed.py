"""Scaling of flatscope under torchrun from 1 to 2 processes on this CPU (gloo backend).

For each sample checkpoint (digits train split, 1347 samples, float32, 1 thread per process) it
times, inside the processes (start-up excluded; a barrier before and after each timed block):

A. Hessian-vector products: ``HessianOperator`` (what ``flatscope hessian`` uses, cached double
   backward) on a data-parallel objective (``Objective.shard``: each rank half of the samples, one
   all-reduce per product): products per second;
B. landscape points, ``--parallel data``: ``landscape.compute`` on the sharded objective (two
   all-reduces per point): points per second;
C. landscape points, ``--parallel points``: ``landscape.compute(parallel="points")``, every rank the
   whole data and every other chunk of 16 points, gathered to rank 0: points per second.

1 and 2 processes alternate within each repeat (both launched by ``python -m torch.distributed.run``),
and the speed-up is the ratio within a repeat; medians over repeats. The 1-minute load average is
recorded before each launch: the machine has 2 cores shared with other jobs, so a second process
competes with them, and a speed-up near 2 is only possible when both cores are idle.

Because the wall-clock speed-up on a shared machine says as much about the neighbours as about
flatscope, the CPU time per product / point summed over all ranks (``time.process_time``, every
thread of each process, gloo's included) is reported too: its ratio 1-process / 2-process is the
parallel efficiency, the part of the work that is not overhead of distribution, and
``2 x efficiency`` bounds the speed-up two idle cores could give.

Usage:
    PYTHONPATH=. python benchmarks/bench_distributed.py [--repeats 5] [--models mlp,cnn] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from _machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# work per model: Hessian-vector products, landscape points
WORK = {"mlp": (300, 320), "cnn": (40, 64), "resnet": (20, 64)}


# ------------------------------------------------------------------------------------------ worker
def worker(model: str) -> None:
    import torch

    from flatscope import distributed
    from flatscope.analyses.hessian import HessianOperator
    from flatscope.analyses.landscape import Grid, LandscapeResult, axis, compute
    from flatscope.checkpoint import load_checkpoint
    from flatscope.data import load_data
    from flatscope.directions import random_directions
    from flatscope.objective import Objective

    torch.set_num_threads(1)
    distributed.init_from_env(torch.device("cpu"))
    ck = load_checkpoint(str(ROOT / "sample_checkpoints" / f"{model}-sgd.pt"))
    X, y = load_data(ck.data_spec).split("train")
    whole = Objective(ck.model, X, y, loss=ck.loss, batch_size=2048)
    shard = Objective(ck.model, X, y, loss=ck.loss, batch_size=2048).shard()
    n_hvp, n_points = WORK[model]

    def timed(fn) -> tuple[float, float]:
        """Wall seconds (rank 0) and CPU seconds summed over the ranks (all threads of each process)."""
        distributed.barrier()
        t, c = time.perf_counter(), time.process_time()
        fn()
        c = time.process_time() - c
        distributed.barrier()
        wall = time.perf_counter() - t
        return wall, float(distributed.all_reduce_sum(torch.tensor(c, dtype=torch.float64)))

    op = HessianOperator(shard)
    v = torch.randn(shard.dim, generator=torch.Generator().manual_seed(0))
    op(v)   # builds the cached graph (as the first Lanczos product does)

    def hvps():
        for _ in range(n_hvp):
            op(v)

    dirs = random_directions(whole.w0, whole.layout, 1, torch.Generator().manual_seed(0)).rounded(torch.float32)
    grid = Grid(axis(-1.0, 1.0, n_points))

    def landscape(obj, parallel):
        res = LandscapeResult("bench", dirs, grid, ["train"])
        compute(res, {"train": obj}, batching="loop", points_per_call=16, parallel=parallel)
        return res

    t_hvp, c_hvp = timed(hvps)
    landscape(shard, "data")     # warm-up of both paths (first forward passes of a size allocate)
    landscape(whole, "points")
    t_data, c_data = timed(lambda: landscape(shard, "data"))
    t_points, c_points = timed(lambda: landscape(whole, "points"))
    if distributed.is_main():
        print(json.dumps({"model": model, "world": distributed.world_size(), "load": os.getloadavg()[0],
                          "hvp_per_s": n_hvp / t_hvp, "data_points_per_s": n_points / t_data,
                          "points_points_per_s": n_points / t_points, "hvp_cpu_ms": 1e3 * c_hvp / n_hvp,
                          "data_points_cpu_ms": 1e3 * c_data / n_points,
                          "points_points_cpu_ms": 1e3 * c_points / n_points}))
    distributed.shutdown()


# ------------------------------------------------------------------------------------------ driver
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model: str, nproc: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), str(Path(__file__).resolve()), "--worker", model]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    import torch

    models = args.models.split(",")
    rows: dict = {m: {1: [], 2: []} for m in models}
    loads = []
    t0 = time.time()
    for r in range(args.repeats):
        for m in models:
            for nproc in (1, 2) if r % 2 == 0 else (2, 1):   # alternate the order between repeats
                loads.append(os.getloadavg()[0])
                rows[m][nproc].append(launch(m, nproc))
                print(f"repeat {r} {m} x{nproc}: {rows[m][nproc][-1]}", file=sys.stderr, flush=True)
    keys = [("hvp", "HVPs/s (data-parallel)"), ("data_points", "landscape points/s, --parallel data"),
            ("points_points", "landscape points/s, --parallel points")]
    out = {"machine": f"{os.cpu_count()}-core CPU, torch {torch.__version__}, {cpu_name()}",
           "load_1min": {"median": statistics.median(loads), "min": min(loads), "max": max(loads)},
           "repeats": args.repeats, "seconds": time.time() - t0, "results": {}}
    print(f"{out['machine']}; 1-min load before launches: median {statistics.median(loads):.2f} "
          f"(min {min(loads):.2f}, max {max(loads):.2f}); {args.repeats} repeats, medians\n")
    print("| model | measure | 1 process | 2 processes | wall speed-up (range) | CPU ms per item, 1 / 2 processes "
          "| efficiency |")
    print("|---|---|---|---|---|---|---|")
    for m in models:
        out["results"][m] = {}
        for key, label in keys:
            one = [row[key + "_per_s"] for row in rows[m][1]]
            two = [row[key + "_per_s"] for row in rows[m][2]]
            ratios = [b / a for a, b in zip(one, two)]
            c1 = statistics.median(row[key + "_cpu_ms"] for row in rows[m][1])
            c2 = statistics.median(row[key + "_cpu_ms"] for row in rows[m][2])
            eff = statistics.median(a[key + "_cpu_ms"] / b[key + "_cpu_ms"] for a, b in zip(rows[m][1], rows[m][2]))
            out["results"][m][key] = {"1": statistics.median(one), "2": statistics.median(two),
                                      "speedup": statistics.median(ratios), "speedup_min": min(ratios),
                                      "speedup_max": max(ratios), "cpu_ms_1": c1, "cpu_ms_2": c2, "efficiency": eff}
            print(f"| {m} | {label} | {statistics.median(one):.1f} | {statistics.median(two):.1f} | "
                  f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | {c1:.2f} / {c2:.2f} "
                  f"| {eff:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
