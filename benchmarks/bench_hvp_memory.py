"""What one cached Hessian-vector product holds, in parameter vectors (issue 13, item 1).

For bench_scale.py's 10^7-parameter MLP and Transformer (same models and data), in one fresh process
per case with glibc returning every freed tensor to the kernel (``MALLOC_MMAP_THRESHOLD_=65536``), so
that the kernel's resident high-water mark ``VmHWM`` (reset by writing 5 to /proc/self/clear_refs)
counts live tensors:

- ``held``: what a batch's linearization keeps between products (its saved graph);
- ``first``: the peak of the first one-vector product above the linearization (the result included);
- ``row k``: the same for a later product of ``k`` rows, per row;
- ``measured``: flatscope's own estimate of the linearization (``Objective.batch_bytes``).

Two ways of building the linearization, side by side: flatscope's (:class:`flatscope.objective.
Linearization`: plain autograd on per-tensor leaves that are views of ``w``) and ``torch.func``'s
``vjp`` of ``grad`` on the flat vector, which flatscope used before (its products accumulated as they
did then).

    OMP_NUM_THREADS=1 python benchmarks/bench_hvp_memory.py [--cases mlp,transformer] [--size 1e7]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import vm_hwm as hwm  # noqa: E402


def reset() -> int:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return hwm()


def worker(case: str, size: str, how: str) -> dict:
    from bench_scale import build
    from torch.func import grad, vjp

    from flatscope.objective import Linearization, Objective, second_order_kernels

    torch.set_num_threads(1)
    model, X, y, loss = build({"case": case, "size": size, "tool": "flatscope"})
    obj = Objective(model.eval(), X, y, loss=loss, hvp_mode="exact")
    del model
    n = obj.dim
    vec = 4 * n
    xb, yb, _ = next(iter(obj.batches()))
    out: dict = {"case": case, "size": size, "how": how, "n": n, "measured": obj.batch_bytes() / vec}
    before = reset()
    with second_order_kernels():
        if how == "flatscope":
            lin = Linearization(obj, obj.w0, xb, yb)

            def product(V):
                res = torch.zeros(V.shape)
                lin.pull(V, 1.0, res)
                return res
        else:
            pb = vjp(lambda p: grad(obj._batch_loss)(p, xb, yb), obj.w0)[1]

            def product(V):  # as flatscope accumulated it before
                res = torch.zeros(V.shape)
                res += 1.0 * (pb(V)[0] if V.dim() == 1 else torch.func.vmap(pb)(V)[0])
                return res

        held = reset() - before
        out["held"] = held / vec
        for k in (1, 1, 2, 4):
            V = torch.randn(n) if k == 1 else torch.randn(k, n)
            base = reset()
            r = product(V)
            out.setdefault("first row", (hwm() - base) / vec)
            out[f"row {k}"] = (hwm() - base) / vec / k
            del r, V
    return out


def main() -> None:
    if "--worker" in sys.argv:
        case, size, how = sys.argv[sys.argv.index("--worker") + 1 :][:3]
        print("RESULT " + json.dumps(worker(case, size, how)), flush=True)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="mlp,transformer")
    ap.add_argument("--size", default="1e7")
    args = ap.parse_args()
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    rows = []
    for case in args.cases.split(","):
        for how in ("flatscope", "torch.func vjp of grad"):
            p = subprocess.run(
                [sys.executable, __file__, "--worker", case, args.size, how], capture_output=True, text=True, env=env
            )
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not line:
                print(f"{case} {how}: failed: {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            rows.append(json.loads(line[-1][7:]))
    print(
        "| model | n | linearization | held between products | first product | later, per row: 1 / 2 / 4 rows | batch_bytes estimate |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['n']:,} | {r['how']} | {r['held']:.2f} | {r['first row']:.2f} | "
            f"{r['row 1']:.2f} / {r['row 2']:.2f} / {r['row 4']:.2f} | {r['measured']:.2f} |"
        )
    print("(in float32 parameter vectors of the model; torch", torch.__version__, ")")


if __name__ == "__main__":
    main()
