"""Cost against model size (issue 13's benchmark): MLPs and GPT-2-style Transformers at about 10^5,
10^6, 10^7 and 10^8 parameters, on the same data at every size, CPU, float32, one thread. For each size:

- ``cost`` (one subprocess, CPU times by ``time.process_time``): three plain training steps (forward, backward, SGD step) and their peak
  RSS = "one training step's memory"; then the median time of a plain ``loss.backward()`` gradient and
  of one flatscope Hessian-vector product (``HessianOperator``, the linearization built once; the first
  product, which builds it, reported apart), interleaved;
- top-5 by each tool in its own subprocess (flatscope Lanczos tol 1e-5 with a 30-vector float32 basis (20 at 10^8), as the CLI keeps for a float32 model;
  hessian-eigenthings lanczos, 40 steps; curvlinops ``HessianLinearOperator`` + scipy ``eigsh``):
  wall time, HVPs, peak RSS, relative error against a float64 flatscope Lanczos at tol 1e-7 (40-vector basis);
  at 10^8, where that basis would need 32 GB, flatscope's residuals bound its own error and the others are
  compared with flatscope.

Data: the first 256 digits (64 features) for the MLPs; 4 sequences x 64 byte tokens of CPython's
LICENSE.txt for the Transformers (``--loss lm``; eager attention for the competitors, which cannot
differentiate PyTorch's default attention twice, see bench_realistic.py).

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --out runs/scale.jsonl
    python benchmarks/bench_scale.py --report runs/scale.jsonl --plot docs/images/bench_scale.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tools import (  # noqa: E402
    current_rss_mb,
    digits_features,
    gpt2,
    mlp,
    n_params,
    peak_rss_mb,
    rel_err,
    run_and_append,
    text_tokens,
    worker_main,
)

K = 5
# width of the 2-hidden-layer MLP; (n_embd, n_layer, n_head) of the Transformer
MLP_WIDTH = {"1e5": 280, "1e6": 960, "1e7": 3125, "1e8": 10000}
TRANSFORMER = {"1e5": (64, 2, 4), "1e6": (128, 5, 4), "1e7": (320, 8, 5), "1e8": (768, 12, 12)}
SEQ, N_SEQ, N_MLP = 64, 4, 256


def build(spec):
    torch.manual_seed(0)
    if spec["case"] == "mlp":
        X, y = digits_features(N_MLP)
        return mlp(MLP_WIDTH[spec["size"]]), X, y, "ce"
    d, L, h = TRANSFORMER[spec["size"]]
    model = gpt2(d, L, h, n_positions=SEQ)
    if spec["tool"] != "flatscope":
        model.config._attn_implementation = "eager"
    X = text_tokens(N_SEQ, SEQ)
    return model, X, X, "lm"


def plain_loss(model, X, y, loss):
    if loss == "lm":
        logits = model(input_ids=X).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), X[:, 1:].reshape(-1))
    return torch.nn.functional.cross_entropy(model(X), y)


def cost_worker(spec) -> None:
    from flatscope.analyses.hessian import HessianOperator
    from flatscope.objective import Objective

    torch.set_num_threads(1)
    model, X, y, loss = build(dict(spec, tool="flatscope"))
    model.eval()
    base = current_rss_mb()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay those of the other runs
    ts_step = []
    for _ in range(3):
        t = time.process_time()
        opt.zero_grad()
        plain_loss(model, X, y, loss).backward()
        opt.step()
        ts_step.append(time.process_time() - t)
    train_peak = peak_rss_mb()
    out = dict(
        ok=True,
        n_params=n_params(model),
        base_rss_mb=base,
        train_peak_rss_mb=train_peak,
        step_s=statistics.median(ts_step),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    obj = Objective(model, X, y, loss=loss, hvp_mode="exact")
    op = HessianOperator(obj)
    v = torch.randn(obj.dim, generator=torch.Generator().manual_seed(0))
    t = time.process_time()
    op(v)
    out["hvp_first_s"] = time.process_time() - t
    tg, th = [], []
    for _ in range(int(spec.get("repeats", 3))):
        t = time.process_time()
        torch.autograd.grad(plain_loss(model, X, y, loss), params)
        tg.append(time.process_time() - t)
        t = time.process_time()
        op(v)
        th.append(time.process_time() - t)
    out.update(
        grad_s=statistics.median(tg),
        hvp_s=statistics.median(th),
        hvp_peak_rss_mb=peak_rss_mb(),
        hvp_mode=op.mode,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    print("RESULT " + json.dumps(out), flush=True)


def plan(cases, sizes):
    runs = []
    for case in cases:
        for size in sizes:
            if case == "transformer" and size not in TRANSFORMER:
                continue
            base = dict(case=case, size=size, k=K, batch_size=N_MLP if case == "mlp" else N_SEQ, threads=1)
            runs.append(dict(base, tool="cost", label="cost"))
            big = size == "1e8"
            # the basis flatscope's CLI uses for a float32 model: float32 vectors (30 of them, 20 at 10^8)
            fs = {"max_basis": 20 if big else 30, "basis_dtype": "float32"}
            runs += [
                dict(base, tool="flatscope", label="flatscope", kw=fs),
                dict(base, tool="eigenthings", label="hessian-eigenthings", kw={"steps": 40}),
                dict(base, tool="curvlinops", label="curvlinops + eigsh"),
            ]
            if not big:  # a float64 40-vector basis at 10^8 would need 32 GB: the residuals certify instead
                runs.append(
                    dict(
                        base,
                        tool="flatscope",
                        label="reference",
                        ref=True,
                        kw={"dtype": "float64", "tol": 1e-7, "max_basis": 40, "max_iter": 400},
                    )
                )
    return runs


def load(path):
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def net(peak: float, c: dict) -> float:
    """Peak RSS above the interpreter's (model and data built) over a training step's, both net."""
    return (peak - c["base_rss_mb"]) / (c["train_peak_rss_mb"] - c["base_rss_mb"])


def report(path: str, plot: str | None) -> None:
    rows = load(path)
    get = {(r["spec"]["case"], r["spec"]["size"], r["spec"]["label"]): r for r in rows}  # the last run of each
    print(
        "| model | n | step s | grad s | HVP s (first) | HVP / grad | train peak MB (HVP peak; net ratio) | tool | top-5 wall / CPU s | HVPs "
        "| peak RSS MB | (peak - basis) / train peak | max rel. error |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case in ("mlp", "transformer"):
        for size in ("1e5", "1e6", "1e7", "1e8"):
            c = get.get((case, size, "cost"))
            if c is None:
                continue
            ref = get.get((case, size, "reference"))
            ref_ok = ref is not None and ref["ok"]
            if not c["ok"]:
                print(f"| {case} | {size} | cost run failed: `{c['error']}` |||||||||||")
                continue
            head = (
                f"| {case} | {c['n_params']:,} | {c['step_s']:.3f} | {c['grad_s']:.3f} | {c['hvp_s']:.3f} "
                f"({c['hvp_first_s']:.2f}) | {c['hvp_s'] / c['grad_s']:.2f} | {c['train_peak_rss_mb']:.0f} "
                f"({c['hvp_peak_rss_mb']:.0f}; {net(c['hvp_peak_rss_mb'], c):.1f}x) |"
            )
            tools = [t for t in ("flatscope", "hessian-eigenthings", "curvlinops + eigsh") if (case, size, t) in get]
            if not tools:
                print(head + " (costs only) ||||||")
            for i, t in enumerate(tools):
                r = get[(case, size, t)]
                lead = head if i == 0 else "| | | | | | | |"
                if not r["ok"]:
                    print(f"{lead} {t} | failed: `{r['error']}` | | {r.get('peak_rss_mb', 0):.0f} | | |")
                    continue
                kw = r["spec"].get("kw", {})
                width = 4 if kw.get("basis_dtype") == "float32" else 8
                basis = (
                    (min(r["hvps"], kw.get("max_basis", 30)) * width if t == "flatscope" else 0) * c["n_params"] / 2**20
                )
                fs = get.get((case, size, "flatscope"))
                if ref_ok:
                    err = f"{rel_err(r['eigenvalues'], ref['eigenvalues']):.1e}"
                elif t == "flatscope" and r.get("residuals"):
                    err = f"residual / λ ≤ {np.max(np.array(r['residuals']) / np.abs(r['eigenvalues'])):.0e} (no float64 reference)"
                elif fs is not None and fs["ok"]:
                    err = f"{rel_err(r['eigenvalues'], fs['eigenvalues']):.1e} vs flatscope"
                else:
                    err = "no reference"
                print(
                    f"{lead} {t} | {r['wall_s']:.0f} / {r.get('cpu_s', float('nan')):.0f} | {r['hvps']} | {r['peak_rss_mb']:.0f} | "
                    f"{(r['peak_rss_mb'] - basis) / c['train_peak_rss_mb']:.2f} | {err} |"
                )
            if ref_ok:
                res, vals = np.array(ref["residuals"]), np.array(ref["eigenvalues"])
                print(
                    f"| | | | | | | | reference (float64) | {ref['wall_s']:.0f} / {ref.get('cpu_s', float('nan')):.0f} | {ref['hvps']} | "
                    f"{ref['peak_rss_mb']:.0f} | | residual / λ ≤ {np.max(res / np.abs(vals)):.0e} |"
                )
            elif ref is not None:
                print(f"| | | | | | | | reference (float64) | failed: `{ref['error']}` | | | | |")
    if plot:
        make_plot(rows, plot)


def make_plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list({(r["spec"]["case"], r["spec"]["size"], r["spec"]["label"]): r for r in rows}.values())  # last of each
    rows = [r for r in rows if r["spec"]["label"] == "cost" or "cpu_s" in r]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"flatscope": "C0", "hessian-eigenthings": "C1", "curvlinops + eigsh": "C2", "train step": "0.4"}
    for case, ls, mk in (("mlp", "-", "o"), ("transformer", "--", "s")):
        costs = {
            r["spec"]["size"]: r for r in rows if r["spec"]["case"] == case and r["spec"]["label"] == "cost" and r["ok"]
        }
        for tool in ("flatscope", "hessian-eigenthings", "curvlinops + eigsh"):
            pts = sorted(
                (costs[r["spec"]["size"]]["n_params"], r.get("cpu_s", r["wall_s"]), r["peak_rss_mb"])
                for r in rows
                if r["spec"]["case"] == case and r["spec"]["label"] == tool and r["ok"] and r["spec"]["size"] in costs
            )
            if pts:
                n, t, m = map(np.array, zip(*pts))
                ax_t.plot(n, t, ls=ls, marker=mk, color=colors[tool], label=f"{tool}, {case}")
                ax_m.plot(n, m / 1024, ls=ls, marker=mk, color=colors[tool], label=f"{tool}, {case}")
        pts = sorted((c["n_params"], c["train_peak_rss_mb"]) for c in costs.values())
        if pts:
            n, m = map(np.array, zip(*pts))
            ax_m.plot(n, m / 1024, ls=ls, marker=mk, color=colors["train step"], label=f"one training step, {case}")
    for ax, lab in ((ax_t, "top-5 CPU time (s)"), (ax_m, "peak RSS (GB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters n")
        ax.set_ylabel(lab)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.legend(fontsize=7, loc="upper left")
    fig.suptitle("Top-5 Hessian eigenvalues against model size (CPU, 1 thread, float32)", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    if "--worker" in sys.argv:
        spec = json.loads(sys.argv[sys.argv.index("--worker") + 1])
        return cost_worker(spec) if spec["tool"] == "cost" else worker_main(build)
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="mlp,transformer")
    ap.add_argument("--sizes", default="1e5,1e6,1e7")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default="runs/scale.jsonl")
    ap.add_argument("--report")
    ap.add_argument("--plot")
    args = ap.parse_args()
    if args.report:
        return report(args.report, args.plot)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for spec in plan(args.cases.split(","), args.sizes.split(",")):
        if args.only and spec["label"] not in args.only.split(","):
            continue
        print(f"{spec['case']} {spec['size']}: {spec['label']} ...", file=sys.stderr, flush=True)
        run_and_append(__file__, spec, args.out, timeout=args.timeout)


if __name__ == "__main__":
    main()
