"""What issues 12 and 13 ask of a lent GPU, in two commands of a few minutes each (prepared and dry-run
on CPU; the figures it gives go to benchmarks/RESULTS.md with the machine it ran on).

``scale``: GPT-2-small (124M: 12 layers x 768, GPT-2's vocabulary of 50,257) and a ~1B GPT-2 (18
layers x 2048), built from configs with ``save_pretrained`` (nothing downloaded), on 8 sequences x
512 byte tokens (flatscope's own sources as text), through the CLI: ``flatscope hessian --loss lm
--top 5 --probes 4 --steps 40`` (top-5 with residuals, a 4 x 40 SLQ density, a 12-product Hutch++
trace), float32 and bfloat16, wall time and the device's peak memory from each result's provenance.
The 1B model runs with ``--slq-reorth none`` (a fully reorthogonalized 40-step probe holds 40 vectors
of 4 GB) and ``--max-basis 16``.

``realistic``: ``bench_realistic.py --device cuda`` at the issue's sizes (ResNet-18 on 2,000 images,
a 10.8M GPT-2 on 64 x 128 tokens), side by side with hessian-eigenthings and curvlinops + eigsh
when they import (carry them as wheels: ``bash benchmarks/gpu_wheels.sh`` here, then ``.whl`` in the
device tool's carry).

    python benchmarks/gpu_suite.py scale --out runs/gpu          # ~5 min on one H200
    python benchmarks/gpu_suite.py realistic --out runs/gpu      # ~3 min
    python benchmarks/gpu_suite.py scale --device cpu --tiny --out /tmp/dry   # the dry run (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# name -> (n_embd, n_layer, n_head, vocab); "tiny" ones for the CPU dry run
MODELS = {
    "gpt2-124m": (768, 12, 12, 50257),
    "gpt2-1b": (2048, 18, 16, 50257),
    "tiny-a": (32, 2, 2, 300),
    "tiny-b": (48, 2, 4, 300),
}


def tokens(n_seq: int, seq: int) -> np.ndarray:
    """``(n_seq, seq)`` byte tokens of flatscope's sources (sorted by path), consecutive."""
    raw = b"".join(f.read_bytes() for f in sorted((ROOT / "flatscope").rglob("*.py")))
    need = n_seq * seq
    if len(raw) < need:
        raise SystemExit(f"flatscope's sources have {len(raw)} bytes, {need} needed")
    return np.frombuffer(raw[:need], dtype=np.uint8).astype(np.int64).reshape(n_seq, seq)


def build(name: str, folder: Path, seq: int) -> int:
    import torch
    import transformers

    d, L, h, vocab = MODELS[name]
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=d, n_layer=L, n_head=h,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def flatscope(args: list[str], log) -> dict:
    """``python -m flatscope hessian ARGS --json``: its JSON (or the error line), wall seconds, exit status."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "flatscope", "hessian", *args, "--json"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    out = {"args": args, "rc": p.returncode, "wall_s": time.perf_counter() - t}
    try:
        out["result"] = json.loads(p.stdout)
    except json.JSONDecodeError:
        out["error"] = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
    log.write(json.dumps(out) + "\n")
    log.flush()
    print(f"  rc {p.returncode} in {out['wall_s']:.1f} s: {out.get('error', 'ok')}", flush=True)
    return out


def scale(a) -> None:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    seq, n_seq = (32, 4) if a.tiny else (512, 8)
    X = tokens(n_seq, seq)
    np.savez(work / "tokens.npz", X=X, y=X)
    names = ["tiny-a", "tiny-b"] if a.tiny else ["gpt2-124m", "gpt2-1b"]
    with open(Path(a.out) / "scale.jsonl", "a") as log:
        for name in names:
            n = build(name, work / name, seq)
            print(f"{name}: {n:,} parameters", flush=True)
            big = name in ("gpt2-1b", "tiny-b")
            for dtype in ("float32", "bfloat16"):
                args = [str(work / name), "--data", f"npz:{work / 'tokens.npz'}", "--loss", "lm", "--top", "5",
                        "--probes", "4", "--steps", "40", "--trace-probes", "12", "--batch-size", "4" if big else "8",
                        "--device", a.device, "--dtype", dtype, "-o", str(Path(a.out) / f"{name}-{dtype}.h5")]  # fmt: skip
                if big:
                    args += ["--slq-reorth", "none", "--max-basis", "16"]
                if dtype == "bfloat16":  # residuals stall near bfloat16's unit roundoff (3.9e-3) x |lambda_max|
                    args += ["--tol", "5e-3"]
                print(f"{name} {dtype} ...", flush=True)
                flatscope(args, log)


def realistic(a) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_realistic.py"), "--device", a.device,
           "--out", str(Path(a.out) / "realistic.jsonl")]  # fmt: skip
    if a.tiny:
        cmd += ["--cases", "resnet18", "--images", "8", "--image-batch", "8", "--only", "flatscope Lanczos (40"]
    subprocess.run(cmd, check=False, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    rep = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_realistic.py"), "--report",
                          str(Path(a.out) / "realistic.jsonl")], capture_output=True, text=True)  # fmt: skip
    (Path(a.out) / "realistic.md").write_text(rep.stdout)
    print(rep.stdout)


def report(path: str) -> None:
    """The scale runs as a Markdown table (from ``scale.jsonl``)."""
    print("| model | parameters | dtype | wall s | HVPs | λ_1 … λ_5 | max residual / λ_1 | density mean ± s.e. "
          "| trace ± s.e. | peak device memory |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for ln in Path(path).read_text().splitlines():
        r = json.loads(ln)
        name, dtype = Path(r["args"][0]).name, r["args"][r["args"].index("--dtype") + 1]
        if "result" not in r:
            print(f"| {name} | | {dtype} | {r['wall_s']:.0f} | | failed: `{r.get('error')}` | | | | |")
            continue
        j = r["result"]
        ev, res = j.get("eigenvalues", []), j.get("residuals", [])
        rel = max(res) / abs(ev[0]) if ev and res else float("nan")
        d = j.get("density") or {}
        mem = ""
        h5 = r["args"][r["args"].index("-o") + 1]
        if Path(h5).exists():
            import h5py

            with h5py.File(h5, "r") as f:
                a = f["hessian"].attrs
                mem = f"{int(a['peak_memory_bytes']) / 2**30:.1f} GiB ({a['peak_memory_of']})"
        print(f"| {name} | {j.get('dim', 0):,} | {dtype} | {r['wall_s']:.0f} | {j.get('n_matvec')} | "
              f"{', '.join(f'{v:.4g}' for v in ev)} | {rel:.1e} | {d.get('mean', float('nan')):.3g} ± "
              f"{d.get('mean_stderr', float('nan')):.1g} | {j.get('trace', float('nan')):.4g} ± "
              f"{j.get('trace_stderr', float('nan')):.2g} | {mem} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=["scale", "realistic", "report"])
    ap.add_argument("--out", default="runs/gpu")
    ap.add_argument("--work", default="/tmp/flatscope-gpu", help="where the models and tokens are built")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models and data: a dry run of the commands")
    a = ap.parse_args()
    if a.part == "report":
        return report(str(Path(a.out) / "scale.jsonl"))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (scale if a.part == "scale" else realistic)(a)


if __name__ == "__main__":
    main()
