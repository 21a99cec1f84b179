"""Wall time of flatscope commands with --threads 1, torch's default and flatscope's default.

Each configuration runs the same command in a fresh process (imports included), interleaved, and
the medians are printed as a Markdown table with the load average seen during the runs:

    python benchmarks/bench_threads.py --repeats 3

``torch`` is torch's own default (one thread per physical core), forced with --threads; ``flatscope``
passes no --threads and clears OMP_NUM_THREADS, so the policy of flatscope/threads.py decides.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _machine import machine  # noqa: E402

WORKLOADS = {
    "train esgd, 3 epochs": ["train", "--model", "mlp", "--data", "digits", "--opt", "esgd", "--epochs", "3",
                             "-o", "{d}/t.pt", "-q"],
    "hessian top 5, trace": ["hessian", "{d}/mlp-sgd.pt", "--top", "5", "--no-density", "--no-plot", "-q",
                             "-o", "{d}/h.h5"],
    "local-energy, 4 σ x 16 draws": ["local-energy", "{d}/cnn-sgd.pt", "--sigma", "0.05..0.5:4", "--samples", "16",
                                     "--no-plot", "-q", "-o", "{d}/le.h5"],
}


def run_once(args: list[str], threads: int | None, d: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    argv = [sys.executable, "-m", "flatscope", *[a.format(d=d) for a in args]]
    if threads is not None:
        argv += ["--threads", str(threads)]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    from flatscope.threads import default_threads, usable_cores

    torch_default = torch.get_num_threads()
    configs = {"1": 1, f"torch ({torch_default})": torch_default, "flatscope": None}
    times = {w: {c: [] for c in configs} for w in WORKLOADS}
    loads, chosen = [], []
    with tempfile.TemporaryDirectory() as d:
        for name in ("mlp-sgd.pt", "cnn-sgd.pt"):
            shutil.copy(ROOT / "sample_checkpoints" / name, Path(d) / name)
        for _ in range(args.repeats):
            for w, cmd in WORKLOADS.items():
                for c, n in configs.items():
                    loads.append(os.getloadavg()[0])
                    if n is None:
                        chosen.append(default_threads(torch_default))
                    times[w][c].append(run_once(cmd, n, d))
    print(f"Machine: {machine()}; {usable_cores()} usable cores; torch {torch.__version__}; "
          f"1-minute load average during the runs {min(loads):.1f}..{max(loads):.1f} "
          f"(median {statistics.median(loads):.1f}); flatscope's default chose {sorted(set(chosen))} thread(s). "
          f"Median wall seconds over {args.repeats} interleaved runs, fresh process each:\n")
    print("| workload | " + " | ".join(f"--threads {c}" if c == "1" else c for c in configs) + " | flatscope / best |")
    print("|---" * (len(configs) + 2) + "|")
    for w in WORKLOADS:
        med = {c: statistics.median(v) for c, v in times[w].items()}
        best = min(med.values())
        print(f"| {w} | " + " | ".join(f"{med[c]:.1f}" for c in configs) + f" | {med['flatscope'] / best:.2f} |")


if __name__ == "__main__":
    main()
