"""Wall time of ``--help`` and usage errors, against ``python -c "import torch"``.

Each command runs in a fresh process (interpreter start-up included), the commands interleaved, and
the medians are printed as a Markdown table with the 1-minute load average seen during the runs:

    python benchmarks/bench_cli_startup.py --repeats 7

Every flatscope row is checked to leave torch unimported (``-X importtime`` lists no ``torch``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _machine import machine  # noqa: E402

CASES = {
    'python -c "import torch"': ["-c", "import torch"],
    "flatscope --help": ["-m", "flatscope", "--help"],
    "flatscope hessian --help": ["-m", "flatscope", "hessian", "--help"],
    "flatscope audit --help": ["-m", "flatscope", "audit", "--help"],
    "flatscope compare --help": ["-m", "flatscope", "compare", "--help"],
    "flatscope hessian ckpt.pt --top x (usage error)": ["-m", "flatscope", "hessian", "ckpt.pt", "--top", "x"],
}


def run(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], capture_output=True, env=env, cwd=ROOT, check=False)
    return time.perf_counter() - t0


def imports_torch(args: list[str], env: dict) -> bool:
    p = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    return any(line.rstrip().endswith("| torch") for line in p.stderr.splitlines())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    times: dict[str, list[float]] = {k: [] for k in CASES}
    loads = []
    for _ in range(args.repeats):
        for name, argv in CASES.items():
            times[name].append(run(argv, env))
        loads.append(os.getloadavg()[0])
    base = statistics.median(times['python -c "import torch"'])
    print(
        f"machine: {machine()}; load average {min(loads):.1f} to {max(loads):.1f} (median {statistics.median(loads):.1f})"
    )
    print(f"{args.repeats} runs each, interleaved; median wall seconds\n")
    print("| command | median s | min s | / import torch | imports torch |")
    print("|---|---|---|---|---|")
    for name, argv in CASES.items():
        med = statistics.median(times[name])
        torch_row = name.startswith("python")
        print(
            f"| `{name}` | {med:.2f} | {min(times[name]):.2f} | {med / base:.2f} | "
            f"{'yes' if torch_row else ('yes' if imports_torch(argv, env) else 'no')} |"
        )


if __name__ == "__main__":
    main()
