"""Runtime of ``flatscope audit``'s default suite on the sample checkpoints (is it cheap enough for CI?).

For each model it runs, as a user or a CI job would (a fresh ``python -m flatscope`` process each time,
imports and checkpoint loading included), interleaved over repeats:

- ``computed``: ``flatscope audit CKPT --recompute --json`` (every step computed), with the seconds of
  each step as the audit reports them;
- ``cached``: ``flatscope audit CKPT --json`` right after it (every step read from the results file).

Medians over the repeats are printed as a Markdown table. Wall times on a shared machine: other jobs
slow them down, so the median of interleaved repeats is reported.

Usage: python benchmarks/bench_audit.py [--repeats 3] [--threads 1] [--models mlp,cnn,resnet]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def audit(ckpt: Path, threads: int, recompute: bool) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "flatscope", "audit", str(ckpt), "--threads", str(threads), "--json"]
    if recompute:
        cmd.append("--recompute")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - t0
    return wall, json.loads(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="mlp,cnn,resnet")
    args = ap.parse_args()
    models = args.models.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    ckpts = {}
    for m in models:
        ckpts[m] = tmp / f"{m}-sgd.pt"
        shutil.copy(ROOT / "sample_checkpoints" / f"{m}-sgd.pt", ckpts[m])
    rows: dict[str, dict[str, list]] = {m: {} for m in models}
    for _ in range(args.repeats):
        for m in models:
            wall, out = audit(ckpts[m], args.threads, recompute=True)
            rows[m].setdefault("computed", []).append(wall)
            for s in out["steps"]:
                rows[m].setdefault(s["analysis"], []).append(s["seconds"])
            wall, out = audit(ckpts[m], args.threads, recompute=False)
            assert all(s["cached"] for s in out["steps"])
            rows[m].setdefault("cached", []).append(wall)
    shutil.rmtree(tmp)
    try:
        import torch
        tv = torch.__version__
    except ImportError:  # pragma: no cover
        tv = "?"
    print(f"threads {args.threads}, repeats {args.repeats}, torch {tv}, python {platform.python_version()}")
    steps = [k for k in next(iter(rows.values())) if k not in ("computed", "cached")]
    head = ["model", "audit, computed (s)"] + [f"{s} (s)" for s in steps] + ["audit, cached (s)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for m in models:
        r = rows[m]
        cells = [m, f"{statistics.median(r['computed']):.1f}"] + [f"{statistics.median(r[s]):.2f}" for s in steps]
        cells.append(f"{statistics.median(r['cached']):.1f}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
