"""How well ``--estimate`` predicts the real run: products and wall time, each in a fresh process.

    OMP_NUM_THREADS=1 python benchmarks/bench_estimate.py

For each command line below, ``flatscope ... --estimate --json`` and then the run itself
(``--no-plot --json``), one after the other on the same machine; the table gives the predicted and
the real products and wall times (the real wall time is the whole process: imports, loading, the
analysis, writing the results) and their ratios.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _machine import machine  # noqa: E402

RUNS = [
    "hessian sample_checkpoints/mlp-sgd.pt",
    "hessian sample_checkpoints/cnn-sgd.pt --top 5 --probes 4 --steps 30 --trace-probes 24",
    "hessian sample_checkpoints/mlp-esgd.pt --top 20 --no-density",
    "local-energy sample_checkpoints/mlp-sgd.pt --samples 8",
    "landscape sample_checkpoints/cnn-sgd.pt --grid 21",
    "sharpness sample_checkpoints/mlp-sgd.pt --rho 0.05,0.1 --steps 5",
]

def main() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    print(machine() + "\n")
    print("| command | predicted products | real products | predicted wall s | real wall s | ratio |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, line in enumerate(RUNS):
            args = [sys.executable, "-m", "flatscope", *line.split(), "--threads", "1"]
            e = subprocess.run([*args, "-o", f"{tmp}/e{i}.h5", "--estimate", "--json"], capture_output=True, text=True,
                               env=env, cwd=ROOT, check=True)  # fmt: skip
            est = json.loads(e.stdout)
            t = time.perf_counter()
            r = subprocess.run([*args, "-o", f"{tmp}/r{i}.h5", "--no-plot", "--json"], capture_output=True, text=True,
                               env=env, cwd=ROOT, check=True)  # fmt: skip
            wall = time.perf_counter() - t
            real = json.loads(r.stdout)
            pred = ", ".join(f"{k} {v}" for k, v in est["products"].items())
            got = f"hvp {real['n_matvec']}" if "n_matvec" in real else "(not reported)"
            print(f"| `{line}` | {pred} | {got} | {est['wall_seconds']:.1f} | {wall:.1f} | "
                  f"{est['wall_seconds'] / wall:.2f} |", flush=True)  # fmt: skip

if __name__ == "__main__":
    main()
