"""Which exact Hessian-vector product is fastest, per model class (issue 13, item 6).

For the sample checkpoints (MLP, CNN, ResNet with BatchNorm; 1,347 digits) and the models of
``tests/yourmodels.py`` (a token Transformer through SDPA, an LSTM+GRU, a small CNN), over the whole
training split in one batch, the median time of

- ``grad``: one split gradient (``Objective.loss_and_grad``), the unit of every ratio;
- ``rr-cached``: reverse-over-reverse through the cached linearization (``Objective.hvp_operator``);
- ``rr-rebuilt``: reverse-over-reverse rebuilt for every product (``Objective.hvp``, ``--hvp double-backward``);
- ``fwd-rev``: forward-over-reverse, ``jvp`` of ``grad`` (the torch.func recipe);
- ``cached x8 vmap`` / ``cached x8 loop``: eight products through the cached operator, in one vmapped
  call or one after another (per product);
- ``x8 as chosen``: the same eight through the operator as ``--hvp auto`` runs them: vmapped or row by
  row, whichever the objective's first block measured faster (``hvp_info["rows"]``);
- ``compiled``: ``torch.compile`` of the one-batch reverse-over-reverse product (or why it failed).

    OMP_NUM_THREADS=1 python benchmarks/bench_hvp_modes.py --repeats 7

Interleaved repeats, medians, ratios to one gradient. Every mode is checked against ``rr-rebuilt``
before it is timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.func import grad, jvp, vjp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from flatscope.checkpoint import load_checkpoint  # noqa: E402
from flatscope.data import load_data  # noqa: E402
from flatscope.objective import Objective, second_order_kernels  # noqa: E402

from _machine import machine  # noqa: E402


def fwd_over_rev(obj: Objective, v: torch.Tensor) -> torch.Tensor:
    g = grad(obj._batch_loss)
    out = torch.zeros_like(v)
    with second_order_kernels():
        for xb, yb, wt in obj.batches():
            out += wt * jvp(lambda p: g(p, xb, yb), (obj.w0,), (v,))[1]
    return out


def compiled_hvp(obj: Objective):
    """torch.compile of the one-batch reverse-over-reverse product (the split is one batch here)."""
    (xb, yb, wt), *rest = list(obj.batches())
    assert not rest
    g = grad(obj._batch_loss)

    def hvp(w, v):
        with second_order_kernels():
            return wt * vjp(lambda p: g(p, xb, yb), w)[1](v)[0]

    c = torch.compile(hvp, dynamic=False)
    return lambda v: c(obj.w0, v)


def models():
    for name in ("mlp", "cnn", "resnet"):
        ck = load_checkpoint(str(ROOT / "sample_checkpoints" / f"{name}-sgd.pt"))
        X, y = load_data(ck.data_spec).split("train")
        yield f"{name} (sample)", Objective(ck.model, X, y, loss=ck.loss)
    import yourmodels as ym

    torch.manual_seed(0)
    ids = ym.token_data(256, 0)
    yield "transformer (SDPA)", Objective(ym.TinyTransformer(d=16), ids, ids.clone(), loss="lm")
    torch.manual_seed(0)
    ids = ym.token_data(256, 1)
    labels = torch.randint(0, 3, (256,), generator=torch.Generator().manual_seed(2))
    yield "lstm+gru", Objective(ym.Recurrent(d=16), ids, labels, loss="ce")
    torch.manual_seed(0)
    d = ym.ImageDataset(256, 0)
    yield "tiny conv", Objective(ym.TinyConv(), d.x, d.y, loss="ce")


def median_ms(f, repeats: int) -> float:
    return statistics.median(_times(f, repeats)) * 1e3


def _times(f, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--only", default=None, help="Comma list of model names (prefixes) to run.")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(machine() + "\n")
    cols = ["rr-cached", "rr-rebuilt", "fwd-rev", "cached x8 vmap", "cached x8 loop", "x8 as chosen", "compiled"]
    print("| model | params | gradient ms | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    only = args.only.split(",") if args.only else None
    for name, obj in models():
        if only and not any(name.startswith(o) for o in only):
            continue
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(obj.dim, generator=gen)
        V = torch.randn(8, obj.dim, generator=gen)
        op = obj.hvp_operator()
        ref = obj.hvp(v)
        refV = obj.hvp(V)
        scale = float(ref.norm())
        chosen = obj.hvp_info["rows"]  # what the objective's first block measured faster: vmap or loop

        def block(mode, obj=obj, op=op, V=V):
            obj.hvp_info["rows"] = mode
            return op(V)

        fns = {
            "grad": lambda: obj.loss_and_grad(),
            "rr-cached": lambda: op(v),
            "rr-rebuilt": lambda: obj.hvp(v),
            "cached x8 vmap": lambda: block("vmap"),
            "cached x8 loop": lambda: [op(V[i]) for i in range(8)],
            "x8 as chosen": lambda: block(chosen),
        }
        notes = {"x8 as chosen": chosen}
        try:
            err = float((fwd_over_rev(obj, v) - ref).norm()) / scale
            assert err < 1e-4, f"fwd-rev differs by {err:.1e}"
            fns["fwd-rev"] = lambda: fwd_over_rev(obj, v)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            notes["fwd-rev"] = f"fails: {type(exc).__name__}"
        assert float((op(v) - ref).norm()) / scale < 1e-5
        assert float((op(V) - refV).norm()) / float(refV.norm()) < 1e-5
        if not args.no_compile:
            try:
                t0 = time.perf_counter()
                c = compiled_hvp(obj)
                err = float((c(v) - ref).norm()) / scale
                notes["compile_s"] = f"{time.perf_counter() - t0:.0f} s to compile"
                assert err < 1e-4, f"compiled differs by {err:.1e}"
                fns["compiled"] = lambda: c(v)
            except Exception as exc:  # noqa: BLE001 - reported in the table
                msg = str(exc).strip().splitlines()[0][:60] if str(exc).strip() else ""
                notes["compiled"] = f"fails: {type(exc).__name__} {msg}"
        for f in fns.values():
            f()
        times = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(t) * 1e3 for k, t in times.items()}
        for k in ("cached x8 vmap", "cached x8 loop", "x8 as chosen"):
            med[k] /= 8
        cells = []
        for k in cols:
            if k in med:
                cell = f"{med[k]:.2f} ({med[k] / med['grad']:.2f}x)"
                if k == "compiled":
                    cell += f", {notes['compile_s']}"
                if k == "x8 as chosen":
                    cell += f", {chosen}"
                cells.append(cell)
            else:
                cells.append(notes.get(k, "not run"))
        print(f"| {name} | {obj.dim} | {med['grad']:.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
