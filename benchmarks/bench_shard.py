"""Per-rank memory of the Lanczos basis with ``--shard-params``: 1 process against 2 ranks (gloo, CPU).

A ~1M-parameter MLP (64-1024-896-10, 993,930 parameters, float32) on 256 random samples of 10
classes. Each run builds the objective (data-parallel under torchrun: half the samples per rank),
its cached HVP operator and one warm-up product, then runs :func:`flatscope.linalg.lanczos` (top 2)
in a :class:`flatscope.linalg.ShardedSpace` for exactly ``m`` products (``tol`` 1e-30, so it never
stops early, and no restart: the basis grows to ``m`` vectors). It records, per rank,

- the basis it holds: ``m x local_dim x 8`` bytes (float64), from the shapes;
- the growth of its peak resident memory (``ru_maxrss``) during Lanczos, measured.

Two runs per world size, ``m`` = 10 and ``m`` = 60: the difference of the peak growths over 50
vectors is the measured memory per basis vector per rank, free of the model, the data, the HVP
cache and the gathered blocks (the same in both runs). Each run is its own process (peak resident
memory only grows). World 1 runs the same code path (one shard holding every coordinate).

``--fsdp``: the same model sharded by FSDP2 (``--shard-params --hvp fd``,
:class:`flatscope.fsdp.FSDPObjective`, float64 shards of the float32 model), 1 rank against 2, both
under a gloo group: per rank, the parameters it holds (numel, from the DTensors' local shards), the
growth of its resident memory while the sharded model is built (current, not peak; FSDP2's first
use is paid on a 4 x 4 layer before), and the same
Lanczos runs on fd products (m = 10 and 60) with their peak growth per basis vector.

Usage:
    PYTHONPATH=. python benchmarks/bench_shard.py [--repeats 1] [--json out.json] [--fsdp]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

from _machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WIDTHS = [1024, 896]
SAMPLES = 256
SHORT, LONG = 10, 60  # Lanczos products (= basis vectors) of the two runs


def _maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(m: int, out_dir: str) -> None:
    import numpy as np
    import torch

    from flatscope import distributed
    from flatscope.analyses.hessian import HessianOperator
    from flatscope.linalg import lanczos
    from flatscope.models import build_model
    from flatscope.objective import Objective
    from flatscope.sharding import ParamShard

    torch.set_num_threads(1)
    distributed.init_from_env(torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "kwargs": {"widths": WIDTHS}})
    rng = np.random.default_rng(0)
    X = torch.as_tensor(rng.standard_normal((SAMPLES, 64)), dtype=torch.float32)
    y = torch.as_tensor(rng.integers(0, 10, SAMPLES))
    obj = Objective(model, X, y)
    if distributed.active():
        obj.shard()
    shard = ParamShard(obj.dim)
    op = HessianOperator(obj)
    mv = shard.operator(op)
    mv(torch.zeros(1, shard.local_dim, dtype=torch.float64))  # builds the HVP cache; one gathered block
    distributed.barrier()
    before = _maxrss_mib()
    r = lanczos(mv, obj.dim, 2, tol=1e-30, max_iter=m, max_basis=m + 10, true_residuals=False, space=shard.space)
    after = _maxrss_mib()
    distributed.barrier()
    Path(out_dir, f"rank{distributed.rank()}.json").write_text(
        json.dumps(
            {
                "rank": distributed.rank(),
                "world": distributed.world_size(),
                "m": m,
                "n_matvec": r.n_matvec,
                "dim": obj.dim,
                "local_dim": shard.local_dim,
                "basis_mib": m * shard.local_dim * 8 / 2**20,
                "rss_before_mib": before,
                "rss_growth_mib": after - before,
                "lambda_max": float(r.eigenvalues[0]),
            }
        )
    )
    distributed.finish()


def _rss_mib() -> float:
    """Current resident memory (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker_fsdp(m: int, out_dir: str) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from flatscope import distributed
    from flatscope.analyses.hessian import HessianOperator
    from flatscope.fsdp import FSDPObjective
    from flatscope.linalg import lanczos
    from flatscope.models import build_model
    from flatscope.sources import TensorSource

    torch.set_num_threads(1)
    if not distributed.launched_by_torchrun():  # one rank: its own gloo group of one
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    else:
        distributed.init_from_env(torch.device("cpu"))
    from flatscope.fsdp import shard_model

    shard_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.device("cpu"))  # FSDP2's first-use cost, unmeasured

    rng = np.random.default_rng(0)
    X = torch.as_tensor(rng.standard_normal((SAMPLES, 64)), dtype=torch.float32)
    y = torch.as_tensor(rng.integers(0, 10, SAMPLES))
    data = TensorSource(X, y)
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "kwargs": {"widths": WIDTHS}})
    before = _rss_mib()
    obj = FSDPObjective(model, data=data, dtype=torch.float32)
    del model
    built = _rss_mib()
    op = HessianOperator(obj)
    op(torch.zeros(1, obj.local_dim, dtype=torch.float64))  # one warm-up product
    dist.barrier()
    peak0 = _maxrss_mib()
    r = lanczos(op, obj.dim, 2, tol=1e-30, max_iter=m, max_basis=m + 10, true_residuals=False, space=obj.space)
    peak1 = _maxrss_mib()
    dist.barrier()
    Path(out_dir, f"rank{distributed.rank()}.json").write_text(
        json.dumps(
            {
                "rank": distributed.rank(),
                "world": dist.get_world_size(),
                "m": m,
                "n_matvec": r.n_matvec,
                "dim": obj.dim,
                "local_dim": obj.local_dim,
                "local_param_numel": sum(p.to_local().numel() for p in obj.model.parameters()),
                "param_dtype": str(obj.fd_dtype),
                "build_rss_mib": built - before,
                "basis_mib": m * obj.local_dim * 8 / 2**20,
                "rss_before_mib": peak0,
                "rss_growth_mib": peak1 - peak0,
                "lambda_max": float(r.eigenvalues[0]),
            }
        )
    )
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, m: int, fsdp: bool = False) -> list[dict]:
    import tempfile

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, __file__, "--worker", str(m), "--out", d] + (["--fsdp"] if fsdp else [])
        if world > 1:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                str(world),
                "--master-port",
                str(_free_port()),
                __file__,
                "--worker",
                str(m),
                "--out",
                d,
            ] + (["--fsdp"] if fsdp else [])
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        if p.returncode:
            raise SystemExit(p.stderr[-3000:])
        return [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--fsdp", action="store_true", help="the model itself sharded by FSDP2, fd products")
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--summarize", default=None, metavar="JSON", help="print the table of a saved --json run")
    a = ap.parse_args()
    if a.worker is not None:
        (worker_fsdp if a.fsdp else worker)(a.worker, a.out)
        return
    if a.summarize:
        runs = json.loads(Path(a.summarize).read_text())["runs"]
        summarize(runs, 1 + max(r["repeat"] for r in runs), fsdp="local_param_numel" in runs[0])
        return
    print(f"machine: {cpu_name()}; 1 thread per process; load average {os.getloadavg()[0]:.2f}")
    runs = []
    for rep in range(a.repeats):
        for world in (1, 2):
            for m in (SHORT, LONG):
                rows = launch(world, m, a.fsdp)
                runs += [dict(r, repeat=rep) for r in rows]
                print(json.dumps(rows), flush=True)
    table = summarize(runs, a.repeats, a.fsdp)
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": runs, "table": table}, indent=1))


def summarize(runs: list[dict], repeats: int, fsdp: bool = False) -> list[dict]:
    table = []
    for world in (1, 2):
        per_vec = []
        for rep in range(repeats):
            for rank in range(world):
                g = {r["m"]: r for r in runs if r["world"] == world and r["repeat"] == rep and r["rank"] == rank}
                per_vec.append((g[LONG]["rss_growth_mib"] - g[SHORT]["rss_growth_mib"]) / (LONG - SHORT))
        one = next(r for r in runs if r["world"] == world and r["m"] == LONG)
        table.append(
            {
                "world": world,
                "dim": one["dim"],
                "local_dim": max(r["local_dim"] for r in runs if r["world"] == world),
                "basis_long_mib": max(r["basis_mib"] for r in runs if r["world"] == world and r["m"] == LONG),
                "measured_mib_per_vector": statistics.median(per_vec),
                "range": (min(per_vec), max(per_vec)),
                "expected_mib_per_vector": one["local_dim"] * 8 / 2**20,
                "lambda_max": sorted({r["lambda_max"] for r in runs if r["world"] == world and r["m"] == LONG}),
            }
        )
        if fsdp:
            mine = [r for r in runs if r["world"] == world]
            table[-1]["param_numel"] = max(r["local_param_numel"] for r in mine)
            table[-1]["build_rss_mib"] = statistics.median(r["build_rss_mib"] for r in mine)
    if fsdp:
        print(
            "| ranks | parameters held per rank (float64) | resident growth while building the sharded model "
            "(MiB, median) | peak RSS per basis vector, measured (MiB, median (range)) | 8 x parameters per rank (MiB) |"
        )
        print("|---|---|---|---|---|")
        for t in table:
            print(
                f"| {t['world']} | {t['param_numel']:,} | {t['build_rss_mib']:.1f} | "
                f"{t['measured_mib_per_vector']:.2f} ({t['range'][0]:.2f}-{t['range'][1]:.2f}) | "
                f"{t['expected_mib_per_vector']:.2f} |"
            )
        print(f"Ritz value lambda_max after {LONG} products, by ranks:", {t["world"]: t["lambda_max"] for t in table})
        return table
    print(
        f"| ranks | parameters per rank | basis of {LONG} vectors per rank (MiB) | peak RSS per basis vector, "
        "measured (MiB, median (range)) | 8 x parameters per rank (MiB) |"
    )
    print("|---|---|---|---|---|")
    for t in table:
        print(
            f"| {t['world']} | {t['local_dim']:,} | {t['basis_long_mib']:.1f} | {t['measured_mib_per_vector']:.2f} "
            f"({t['range'][0]:.2f}-{t['range'][1]:.2f}) | {t['expected_mib_per_vector']:.2f} |"
        )
    print(f"Ritz value lambda_max after {LONG} products, by ranks:", {t["world"]: t["lambda_max"] for t in table})
    return table


if __name__ == "__main__":
    main()
