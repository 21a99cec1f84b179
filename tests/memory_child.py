"""Memory measurements in one fresh process for tests/test_memory.py; prints one JSON object.

torch's CPU allocator keeps no statistics and tracemalloc does not see it, so the measure is the
kernel's resident-set high-water mark ``VmHWM``, reset before each measurement (``5`` written to
/proc/self/clear_refs). The parent starts this process with ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB:
every tensor above it is its own mapping, returned to the kernel when freed, so the high-water mark
counts live tensors (glibc would otherwise keep freed heap chunks resident and raise it).

Usage: ``python tests/memory_child.py CKPT OUT_DIR``. Measurements (bytes of peak RSS, and the
analyses' own figures):

- ``step``: load the checkpoint and its data, one forward and backward pass over the split (one batch);
- ``hessian``: ``flatscope hessian --top 5 --no-density --max-iter 6 --trace-probes 2``, its JSON;
- ``local_energy``, ``landscape``: small runs of the commands;
- ``lanczos_k``: :func:`flatscope.linalg.lanczos` on a diagonal operator of the same dimension with a
  float32 basis of ``k`` = 6 and 12 vectors (the basis alone, filled by ``max_iter``).
"""

import gc
import json
import sys

import torch

torch.set_num_threads(1)


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def reset() -> int:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss("VmRSS")


def main(ckpt: str, out_dir: str) -> None:
    from flatscope.checkpoint import load_checkpoint
    from flatscope.cli import main as cli
    from flatscope.data import load_data
    from flatscope.linalg import lanczos

    res: dict = {}

    def step():
        ck = load_checkpoint(ckpt)
        src = load_data(ck.data_spec).source("train")
        model = ck.model
        torch.nn.functional.cross_entropy(model(src.inputs.float()), src.targets).backward()
        return sum(p.numel() for p in model.parameters())

    res["base"] = reset()
    res["n"] = step()
    res["step"] = rss("VmHWM")
    common = ["--no-plot", "-q", "--json", "-o", f"{out_dir}/r.h5"]
    runs = {
        "hessian": ["hessian", ckpt, "--top", "5", "--no-density", "--trace-probes", "2", "--max-iter", "6"],
        "local_energy": ["local-energy", ckpt, "--samples", "4", "--chunk", "4", "--sigma", "0.01,0.02"],
        "landscape": ["landscape", ckpt, "--1d", "--grid", "5", "--points-per-call", "4"],
    }
    import contextlib
    import io

    import time

    for name, args in runs.items():
        t0 = time.perf_counter()
        reset()
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            cli(args + common, standalone_mode=False)
        res[name] = rss("VmHWM")
        res[name + "_json"] = json.loads(buf.getvalue().strip().splitlines()[-1])
        res[name + "_s"] = time.perf_counter() - t0
    n = res["n"]
    d = torch.linspace(1.0, 2.0, n, dtype=torch.float32)
    for k in (6, 12):
        t0 = time.perf_counter()
        reset()
        lanczos(
            lambda V: V * d, n, 2, max_iter=k + 2, max_basis=k, tol=1e-14, dtype=torch.float32, true_residuals=False
        )
        res[f"lanczos_{k}"] = rss("VmHWM")
        res[f"lanczos_{k}_s"] = time.perf_counter() - t0
    res["end_base"] = reset()
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
