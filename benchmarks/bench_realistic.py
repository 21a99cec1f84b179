"""Top-5 Hessian eigenvalues of realistic models, side by side (issue 12's benchmark):
flatscope, hessian-eigenthings (its Hugging Face path for GPT-2) and curvlinops + scipy eigsh, on the
same model, data batches and loss, CPU, float32, one thread.

Cases (see ``_tools.py`` for the models and data):

- ``resnet18``: torchvision's ResNet-18 architecture (11,181,642 parameters), 10 classes, at its seeded
  initialization, eval mode, on ``--images`` real digits upsampled to 3 x 32 x 32, cross-entropy;
- ``gpt2``: ``GPT2LMHeadModel`` from a config (6 layers x 384, 6 heads, byte vocabulary,
  10,795,008 parameters), seeded initialization, on ``--seqs`` x 128 byte tokens of CPython's
  LICENSE.txt, next-token cross-entropy (flatscope ``--loss lm``; eigenthings the model's own
  ``labels`` loss; curvlinops ``CrossEntropyLoss`` on the shifted logits).

Each tool runs in a fresh subprocess, so its peak RSS (``ru_maxrss``) is its own; ``base`` is the RSS
after the model and data were built, before the tool started. Relative error: the largest
``|lambda_i - ref_i| / |ref_i|`` over the top 5, against flatscope's Lanczos on a float64 copy of the
model at tol 1e-7 (its true residuals bound its own error, reported). Results are appended to a
JSON-lines file as they come, so a long run can be stopped and reported on:

    OMP_NUM_THREADS=1 python benchmarks/bench_realistic.py --cases resnet18,gpt2 --out runs/realistic.jsonl
    python benchmarks/bench_realistic.py --report runs/realistic.jsonl

Competitors are benchmark-only installs, e.g. in a venv that sees the system packages (its python in
FLATSCOPE_BENCH_PYTHON, default this interpreter): ``pip install --no-deps hessian-eigenthings curvlinops-for-pytorch
backpack-for-pytorch einops einconv linear_operator opt-einsum tqdm unfoldNd``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tools import (  # noqa: E402
    ResNet18,
    digits_images,
    gpt2,
    rel_err,
    run_and_append,
    text_tokens,
    worker_main,
)

K = 5


def build(spec):
    torch.manual_seed(0)
    if spec["case"] == "resnet18":
        X, y = digits_images(spec["n"])
        return ResNet18(num_classes=10), X, y, "ce"
    model = gpt2(384, 6, 6)
    if spec.get("attn"):
        model.config._attn_implementation = spec["attn"]
    X = text_tokens(spec["n"], 128)
    return model, X, X, "lm"


def plan(case: str, n: int, batch: int, device: str = "cpu"):
    base = dict(case=case, n=n, k=K, batch_size=batch, threads=1, device=device)
    runs = [
        dict(base, tool="flatscope", label="flatscope Lanczos (tol 1e-5, float32)"),
        dict(base, tool="flatscope", label="flatscope Lanczos (40 steps, float32)", kw={"max_iter": 40}),
        dict(base, tool="eigenthings", label="hessian-eigenthings lanczos (40 steps)", kw={"steps": 40}),
        dict(base, tool="curvlinops", label="curvlinops HessianLinearOperator + eigsh"),
    ]
    if case == "gpt2":  # the default (SDPA) attention first, as a user would; then eager attention
        runs = (
            runs[:2]
            + [dict(r, attn="sdpa", label=r["label"] + ", default SDPA attention") for r in runs[2:]]
            + [dict(r, attn="eager", label=r["label"] + ", eager attention") for r in runs[2:]]
        )
    runs.append(
        dict(
            base,
            tool="flatscope",
            label="reference: flatscope Lanczos, float64 model, tol 1e-7",
            ref=True,
            kw={"dtype": "float64", "tol": 1e-7, "max_basis": 40, "max_iter": 400},
        )
    )
    return runs


def report(path: str) -> None:
    rows = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
    cases = list(dict.fromkeys(r["spec"]["case"] for r in rows))
    for case in cases:
        rs = list({r["spec"]["label"]: r for r in rows if r["spec"]["case"] == case}.values())  # last of each
        ref = next((r for r in rs if r["spec"].get("ref") and r["ok"]), None)
        spec = rs[0]["spec"]
        ok = next((r for r in rs if r.get("n_params")), {})
        count = f"{ok['n_params']:,} parameters" if ok else "parameters not reported (no run finished)"
        print(
            f"#### {case}: {count}, {spec['n']} "
            f"{'images' if case == 'resnet18' else 'sequences x 128 tokens'}, batches of {spec['batch_size']}\n"
        )
        gpu = spec.get("device", "cpu") != "cpu"  # on a GPU: wall times and the device's peak allocation
        clock, mem = ("wall", "peak GPU MB") if gpu else ("CPU", "peak RSS MB (base)")
        if gpu:
            print(f"Device: {next((r['gpu'] for r in rs if r.get('gpu')), spec['device'])}\n")
        print(
            f"| tool | wall s | CPU s | HVPs | {clock} s / HVP | {mem} | top-5 | max rel. error "
            f"| {clock} time / flatscope's |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        flat = next((r for r in rs if r["spec"]["tool"] == "flatscope" and not r["spec"].get("ref") and r["ok"]), None)
        for r in rs:
            lab = r["spec"]["label"]
            if not r["ok"]:
                print(
                    f"| {lab} | failed after {r.get('wall_s', 0):.0f} s | | | | {r.get('peak_rss_mb', 0):.0f} | "
                    f"`{r['error']}` | | |"
                )
                continue
            vals = np.array(r["eigenvalues"])
            err = "" if r["spec"].get("ref") or ref is None else f"{rel_err(vals, ref['eigenvalues']):.1e}"
            cpu = r.get("cpu_s", float("nan"))
            key = "wall_s" if gpu else "cpu_s"
            t = r.get(key, float("nan"))
            ratio = f"{t / flat[key]:.2f}x" if flat and key in flat else ""
            peak = (
                f"{r.get('peak_gpu_mb', float('nan')):.0f}"
                if gpu
                else f"{r['peak_rss_mb']:.0f} ({r['base_rss_mb']:.0f})"
            )
            print(
                f"| {lab} | {r['wall_s']:.1f} | {cpu:.0f} | {r['hvps']} | {t / max(r['hvps'], 1):.3g} | "
                f"{peak} | "
                f"{', '.join(f'{v:.5g}' for v in np.sort(vals)[::-1])} | {err} | {ratio} |"
            )
        if ref is not None:
            res = np.array(ref["residuals"])
            vals = np.array(ref["eigenvalues"])
            gaps = np.array([np.min(np.abs(np.delete(vals, i) - v)) for i, v in enumerate(vals)])
            print(
                f"\nReference: true residuals {', '.join(f'{x:.1e}' for x in res)}; the error bound "
                f"residual / |lambda| is at most {np.max(res / np.abs(vals)):.1e}, and residual^2 / (gap "
                f"to the nearest other Ritz value) / |lambda| at most {np.max(res**2 / gaps / np.abs(vals)):.1e} "
                f"(converged: {ref['converged']}).\n"
            )
        print()


def main():
    if "--worker" in sys.argv:
        return worker_main(build)
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="resnet18,gpt2")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--image-batch", type=int, default=250)
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--seq-batch", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine (wall times, GPU peak memory)")
    ap.add_argument("--only", default="", help="run labels' prefixes to keep, separated by ;")
    ap.add_argument("--out", default="runs/realistic.jsonl")
    ap.add_argument("--report")
    args = ap.parse_args()
    if args.report:
        return report(args.report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for case in args.cases.split(","):
        n, b = (args.images, args.image_batch) if case == "resnet18" else (args.seqs, args.seq_batch)
        for spec in plan(case, n, b, args.device):
            if args.only and not any(spec["label"].startswith(p) for p in args.only.split(";")):
                continue
            print(f"{case}: {spec['label']} ...", file=sys.stderr, flush=True)
            run_and_append(__file__, spec, args.out, timeout=args.timeout)


if __name__ == "__main__":
    main()
