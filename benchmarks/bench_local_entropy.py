"""Speed of the local-entropy samplers (flatscope.samplers).

1. SGLD steps/s (one chain, minibatch M, every measurement included: the run_chains loop as
   `flatscope local-entropy` runs it) against plain SGD steps/s (torch.optim.SGD on the module:
   zero_grad, forward, cross-entropy, backward, step) at the same batch size, same minibatch draw.
   Target: SGLD >= 0.8x SGD.
2. Several chains per step: vmap (one batched call) against a loop over chains (the flat-buffer
   module), in chain-steps per second, for minibatch and full-batch gradients.

Repeats are interleaved (other processes share the CPU); medians and ratios of the same run.

    python benchmarks/bench_local_entropy.py --repeats 7 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flatscope.checkpoint import load_checkpoint  # noqa: E402
from flatscope.data import load_data  # noqa: E402
from flatscope.objective import Objective  # noqa: E402
from flatscope.samplers import ObjectivePotential, run_chains  # noqa: E402
from _machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def sgd_rate(model, X, y, batch, steps, gen) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    n = X.shape[0]
    t = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(n, (batch,), generator=gen)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    return steps / (time.perf_counter() - t)


def sgld_rate(pot, center, chains, batch, steps, gen, full=False) -> float:
    init = center + 1e-3 * torch.randn(chains, center.numel(), generator=gen)
    t = time.perf_counter()
    run_chains(pot, center, 1.0, 1e4, init, sampler="sgld", step=1e-3, steps=steps, burn_in=0,
               minibatch=None if full else batch, generator=gen)
    return chains * steps / (time.perf_counter() - t)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=str(ROOT / "sample_checkpoints" / "mlp-sgd.pt"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chains", default="1,4,16")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    ck = load_checkpoint(a.checkpoint)
    data = load_data(ck.data_spec)
    obj = Objective(ck.model, data.X_train, data.y_train, loss=ck.loss)
    model = ck.model.train(False)
    gen = torch.Generator().manual_seed(0)
    loop = ObjectivePotential(obj, chain_mode="loop")
    vm = ObjectivePotential(obj, chain_mode="vmap")
    chains = [int(c) for c in a.chains.split(",")]

    # warm-up
    sgd_rate(model, obj.X, obj.y, a.batch, 20, gen)
    sgld_rate(loop, obj.w0, 1, a.batch, 20, gen)
    for c in chains:
        sgld_rate(vm, obj.w0, c, a.batch, 5, gen)

    rec = {"sgd": [], "sgld": [], "ratio": []}
    modes = {(mode, c, full): [] for mode in ("loop", "vmap") for c in chains for full in (False, True)}
    for _ in range(a.repeats):
        s = sgd_rate(model, obj.X, obj.y, a.batch, a.steps, gen)
        l = sgld_rate(loop, obj.w0, 1, a.batch, a.steps, gen)
        rec["sgd"].append(s)
        rec["sgld"].append(l)
        rec["ratio"].append(l / s)
        for (mode, c, full) in modes:
            pot = loop if mode == "loop" else vm
            st = max(10, a.steps // (4 * c)) if full else max(20, a.steps // c)
            modes[(mode, c, full)].append(sgld_rate(pot, obj.w0, c, a.batch, st, gen, full=full))
    med = statistics.median
    out = {
        "machine": f"{platform.machine()} {cpu_name()}, torch {torch.__version__}, threads {a.threads}",
        "model": f"{ck.model_spec} ({obj.dim} parameters), {obj.n} training samples, batch {a.batch}",
        "sgd_steps_per_s": med(rec["sgd"]), "sgld_steps_per_s": med(rec["sgld"]),
        "sgld_over_sgd": med(rec["ratio"]), "sgld_over_sgd_range": [min(rec["ratio"]), max(rec["ratio"])],
        "chains": {},
    }
    for c in chains:
        for full in (False, True):
            lo, vv = modes[("loop", c, full)], modes[("vmap", c, full)]
            ratios = [v / l for v, l in zip(vv, lo)]
            out["chains"][f"{c} chains, {'full batch' if full else f'minibatch {a.batch}'}"] = {
                "loop_chain_steps_per_s": med(lo), "vmap_chain_steps_per_s": med(vv), "vmap_over_loop": med(ratios),
                "vmap_over_loop_range": [min(ratios), max(ratios)]}
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
