"""Time of one cached Hessian-vector product with and without ``flatscope.linear_rule`` (A/B).

The digits MLP sample checkpoint and bench_scale.py's 10^6 MLP and Transformer and 10^7 MLP: an
operator is built each way (``Objective.hvp_operator(cache=True)``, the rule switched off by
replacing it with a null context), the two are timed interleaved (15 repeats; 7 at 10^7) and the
medians printed with their ratio and the relative difference of the two products.

    OMP_NUM_THREADS=1 python benchmarks/bench_linear_rule.py
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import flatscope.objective as objective  # noqa: E402
from flatscope.checkpoint import load_checkpoint  # noqa: E402
from flatscope.data import load_data  # noqa: E402
from flatscope.objective import Objective  # noqa: E402


def cases():
    ck = load_checkpoint(str(ROOT / "sample_checkpoints" / "mlp-sgd.pt"))
    X, y = load_data(ck.data_spec).split("train")
    yield "digits MLP (sample)", Objective(ck.model, X, y), 15
    from bench_scale import build

    for case, size in (("mlp", "1e6"), ("transformer", "1e6"), ("mlp", "1e7")):
        model, X, y, loss = build({"case": case, "size": size, "tool": "flatscope"})
        yield (
            f"bench_scale {case} {size}",
            Objective(model.eval(), X, y, loss=loss, hvp_mode="exact"),
            (7 if size == "1e7" else 15),
        )


def main() -> None:
    torch.set_num_threads(1)
    rule = objective.linear_rule
    print("| model | n | without the rule, ms | with it, ms | ratio | relative difference |")
    print("|---|---|---|---|---|---|")
    for name, obj, reps in cases():
        v = torch.randn(obj.dim, generator=torch.Generator().manual_seed(0))
        ops, times = {}, {"rule": [], "plain": []}
        for label, ctx in (("rule", rule), ("plain", contextlib.nullcontext)):
            objective.linear_rule = ctx  # type: ignore[assignment]
            try:
                ops[label] = obj.hvp_operator(cache=True)
                ops[label](v)  # builds the linearization under this setting
            finally:
                objective.linear_rule = rule
        a, b = ops["rule"](v), ops["plain"](v)
        for _ in range(reps):
            for label in ("rule", "plain"):
                t0 = time.perf_counter()
                ops[label](v)
                times[label].append(time.perf_counter() - t0)
        mr, mp = statistics.median(times["rule"]), statistics.median(times["plain"])
        diff = ((a - b).norm() / b.norm()).item()
        print(f"| {name} | {obj.dim:,} | {mp * 1e3:.2f} | {mr * 1e3:.2f} | {mr / mp:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
