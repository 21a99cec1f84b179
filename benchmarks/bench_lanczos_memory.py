"""Where the memory of a top-k Lanczos run peaks, phase by phase (issue 13, item 1).

bench_scale.py's MLP (64-w-w-10 on 256 digits, float32) and flatscope's Lanczos as bench_scale runs
it (a float32 basis of ``--max-basis`` vectors with thick restart, tol 1e-5, true residuals), in one
fresh process with glibc returning every freed tensor to the kernel (``MALLOC_MMAP_THRESHOLD_=65536``),
so that the resident set counts live tensors. A thread samples the RSS every 2 ms and labels each
sample with the phase the run is in: inside product ``i``, or after it (orthogonalization, restart,
Ritz vectors). Printed: the peak above the RSS with model, data and objective built, in float32
parameter vectors, overall and per phase, with the basis buffer (``max_basis + 1`` vectors) that is
part of it.

    OMP_NUM_THREADS=1 python benchmarks/bench_lanczos_memory.py [--size 1e7] [--max-basis 20] [--k 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def worker(size: str, max_basis: int, k: int) -> dict:
    sys.path.insert(0, str(HERE))
    from bench_scale import build

    from flatscope.analyses.hessian import HessianOperator
    from flatscope.linalg import lanczos
    from flatscope.objective import Objective

    torch.set_num_threads(1)
    model, X, y, loss = build({"case": "mlp", "size": size, "tool": "flatscope"})
    obj = Objective(model.eval(), X, y, loss=loss, hvp_mode="exact")
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    vec = 4 * obj.dim
    gc.collect()
    base = rss()
    samples: list[tuple[int, str]] = []
    phase = ["before the first product"]
    running = [True]

    def sample() -> None:
        while running[0]:
            samples.append((rss(), phase[0]))
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    op = HessianOperator(obj)
    calls = [0]

    def matvec(v: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        phase[0] = "in a product"
        r = op(v)
        phase[0] = "after a product"
        return r

    r = lanczos(matvec, obj.dim, k, seed=0, tol=1e-5, max_basis=max_basis, dtype=torch.float32)
    phase[0] = "done"
    time.sleep(0.05)
    running[0] = False
    thread.join()
    peaks: dict[str, float] = {}
    for s, ph in samples:
        peaks[ph] = max(peaks.get(ph, 0.0), (s - base) / vec)
    top = max(samples)
    return {
        "n": obj.dim,
        "products": int(r.n_matvec),
        "converged": bool(r.all_converged),
        "eigenvalues": [float(x) for x in r.eigenvalues],
        "basis": max_basis + 1,
        "peak": (top[0] - base) / vec,
        "peak_phase": top[1],
        "phases": peaks,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1e7")
    ap.add_argument("--max-basis", type=int, default=20)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.size, args.max_basis, args.k)), flush=True)
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--worker", "--size", args.size, "--max-basis", str(args.max_basis)]
    p = subprocess.run(cmd + ["--k", str(args.k)], capture_output=True, text=True, env=env)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not line:
        sys.exit(f"worker failed: {p.stderr.strip().splitlines()[-1:]}")
    r = json.loads(line[-1][7:])
    print(f"n = {r['n']:,}, {r['products']} products, converged {r['converged']}, basis buffer {r['basis']} vectors")
    print(f"peak {r['peak']:.2f} vectors above model + data + objective, {r['peak_phase']}")
    for ph, v in sorted(r["phases"].items(), key=lambda t: -t[1]):
        print(f"  {ph:28s} {v:6.2f}")


if __name__ == "__main__":
    main()
