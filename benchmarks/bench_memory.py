"""Peak memory of `flatscope hessian --top K --no-density` against one training step (issue 13).

The model is the MLP 64-1400-1400-10 (2,066,810 parameters, float32) on 256 digits samples. Each
measurement runs in a fresh Python process and reports its RSS high-water mark (``VmHWM`` of
/proc/self/status): torch's CPU allocator keeps no statistics and ``tracemalloc`` does not see it.

- ``step``: load the checkpoint and the data, one forward and backward pass over the 256 samples
  (the memory of "one training step", with the interpreter and torch counted in);
- ``hessian K``: the whole CLI run ``flatscope hessian CKPT --top K --no-density`` in-process.

Figures: each peak, its excess over the step (``extra``), that excess in parameter vectors of the
model's dtype (``extra / (4 n)``) and the ratio peak / step.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py [--top 10 20] [--extra-args "--memory-budget 2GB"] \
        [--mmap-threshold 65536]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIDTHS = [1400, 1400]
SAMPLES = 256


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def make_checkpoint(folder: Path) -> Path:
    import torch

    from flatscope.checkpoint import save_checkpoint
    from flatscope.models import build_model

    spec = {"name": "mlp", "kwargs": {"in_features": 64, "out_features": 10, "widths": WIDTHS}}
    torch.manual_seed(0)
    model = build_model(spec)
    path = folder / "mlp2m.pt"
    save_checkpoint(str(path), model, spec, {"name": "digits", "kwargs": {}}, "ce", {})
    return path


def child(argv: list[str]) -> None:
    """Run one measurement in this (fresh) process and print a JSON line."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    kind, ckpt = argv[0], argv[1]
    if kind == "step":
        from flatscope.checkpoint import load_checkpoint
        from flatscope.data import load_data, subsample_source

        ck = load_checkpoint(ckpt)
        src = subsample_source(load_data(ck.data_spec).source("train"), SAMPLES, 0)
        model = ck.model
        loss = torch.nn.functional.cross_entropy(model(src.inputs.float()), src.targets)
        loss.backward()
        n = sum(p.numel() for p in model.parameters())
        print(json.dumps({"peak": vm_hwm(), "n": n}))
        return
    from flatscope.cli import main

    args = ["hessian", ckpt, "--max-samples", str(SAMPLES), "--no-density", "--no-plot", "-q", "--json"]
    args += ["-o", str(Path(ckpt).with_suffix(f".{os.getpid()}.h5")), *argv[2:]]
    try:
        main(args, standalone_mode=False)
    finally:
        sys.stdout.flush()
    print(json.dumps({"peak": vm_hwm()}))


def measure(kind: str, ckpt: Path, extra: list[str], mmap_threshold: int | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(ckpt), *extra], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    res = json.loads(lines[-1])
    if len(lines) > 1:
        res["result"] = json.loads(lines[-2])
    return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    from _machine import machine  # noqa: E402

    ap = argparse.ArgumentParser()
    ap.add_argument("--top", type=int, nargs="+", default=[10])
    ap.add_argument("--extra-args", default="", help="more hessian options, e.g. '--memory-budget 1GB'")
    ap.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        metavar="BYTES",
        help="MALLOC_MMAP_THRESHOLD_ for the measured processes: glibc then maps every block above it on "
        "its own and returns it when freed, so the peak counts live tensors, not retained heap",
    )
    args = ap.parse_args()
    print(
        f"machine: {machine()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold or 'glibc default (dynamic)'}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp))
        step = measure("step", ckpt, [], args.mmap_threshold)
        n = step["n"]
        mib = 2**20
        print(f"model: MLP 64-{'-'.join(map(str, WIDTHS))}-10, n = {n:,} parameters, {SAMPLES} samples, float32")
        print(f"one training step: peak RSS {step['peak'] / mib:.0f} MiB")
        print("| run | peak RSS (MiB) | extra over step (MiB) | extra / (4 n) vectors | peak / step | lambda_max |")
        print("|---|---|---|---|---|---|")
        for k in args.top:
            r = measure("hessian", ckpt, ["--top", str(k), *args.extra_args.split()], args.mmap_threshold)
            extra = r["peak"] - step["peak"]
            lmax = r.get("result", {}).get("lambda_max", float("nan"))
            print(
                f"| hessian --top {k} {args.extra_args} | {r['peak'] / mib:.0f} | {extra / mib:.0f} | "
                f"{extra / (4 * n):.1f} | {r['peak'] / step['peak']:.2f} | {lmax:.6g} |"
            )


if __name__ == "__main__":
    main()
