"""rSGD replicas as a Python loop vs stacked parameters under torch.func.vmap: time per round.

Measures one rSGD round (y minibatch gradients + the coupled update) with ``--replica-exec loop``
and ``vmap`` on the digits MLP (and the small CNN), one thread, interleaved repeats, medians and
the loop/vmap ratio measured in the same run. The crossover sets ``VMAP_FROM`` in
flatscope/methods/rsgd.py.

    python benchmarks/bench_rsgd_exec.py [--replicas 2 3 4 8 16] [--rounds 60] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from flatscope.data import load_data
from flatscope.methods import get
from flatscope.models import build_model
from flatscope.objective import loss_value
from flatscope.training import BatchStream, TrainConfig


def round_time(model_name: str, y: int, mode: str, rounds: int, data) -> float:
    spec = {"name": model_name, "kwargs": {"in_features": 64, "out_features": 10}}
    torch.manual_seed(0)
    model = build_model(spec)
    model.train()
    cfg = TrainConfig(opt="rsgd", seed=0, extra={"replicas": y, "replica_exec": mode})
    m = get("rsgd")(model, lambda f, xb, yb: loss_value(f(xb), yb, "ce"), cfg)
    stream = BatchStream(data.X_train, data.y_train, 64, 0)
    m.setup(stream)
    for _ in range(3):                      # warm-up (first vmap call traces)
        m.step(stream, 0.05)
    t0 = time.perf_counter()
    for _ in range(rounds):
        m.step(stream, 0.05)
    return (time.perf_counter() - t0) / rounds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, nargs="+", default=[2, 3, 4, 8, 16])
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_data({"name": "digits"})
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} rounds x {args.repeats} interleaved repeats")
    print(f"{'model':<5} {'y':>3} {'loop ms/round':>14} {'vmap ms/round':>14} {'loop/vmap':>10}")
    for model_name in args.models:
        for y in args.replicas:
            times = {"loop": [], "vmap": []}
            for _ in range(args.repeats):
                for mode in ("loop", "vmap"):
                    times[mode].append(round_time(model_name, y, mode, args.rounds, data))
            lo, vm = statistics.median(times["loop"]), statistics.median(times["vmap"])
            print(f"{model_name:<5} {y:>3} {1e3 * lo:>14.2f} {1e3 * vm:>14.2f} {lo / vm:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
