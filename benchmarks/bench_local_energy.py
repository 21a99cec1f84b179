"""Local energy speed: 10 σ × 64 draws on the sample checkpoints, loop vs batched (vmap).

For each model (train split of digits, 1347 samples, float32) it times, interleaved over repeats:

- ``forward``: one plain ``model(X)`` over the split in eval mode under ``no_grad`` (the reference);
- ``fwd+loss+acc``: the same forward plus ``cross_entropy`` and ``argmax == y`` on its output, the
  least work an evaluation of loss and error rate can do;
- ``loop``: ``local_energy(..., batched="off")``, one ``Objective.evaluate`` per perturbed point;
- ``batched/C``: ``local_energy(..., batched="on", chunk=C)``, C draws per vmapped call.

A run evaluates 10 × 64 perturbed points plus the base point; ``per eval`` is the run's wall time
over those 641 evaluations (noise generation, filter/mask work and bookkeeping included) and
``× fwd`` divides it by the median plain forward pass measured in the same run. Times are process
CPU time (one thread: the work done, whatever else runs on a shared machine); the wall-time ratio
is printed beside it.

Usage: python benchmarks/bench_local_energy.py [--repeats 3] [--threads 1] [--models mlp,cnn,resnet] [--chunks 4,16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from flatscope.analyses.local_energy import local_energy, parse_sigmas
from flatscope.checkpoint import load_checkpoint
from flatscope.data import load_data
from flatscope.objective import Objective
from _machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def timed(fn) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) of one call. With one thread, CPU time is the work done,
    unaffected by other jobs on a shared machine; wall time is shown beside it."""
    c, w = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c, time.perf_counter() - w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="mlp,cnn,resnet")
    ap.add_argument("--chunks", default="4,16", help="chunk sizes for the batched runs")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--sigma", default="0.01..1:10")
    ap.add_argument("--forwards", type=int, default=64, help="plain forward passes timed per repeat")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sigmas = parse_sigmas(args.sigma)
    n_evals = len(sigmas) * args.samples + 1
    print(f"# local-energy benchmark: {len(sigmas)} σ × {args.samples} draws (+1 base) = {n_evals} evaluations, "
          f"{args.threads} thread(s), torch {torch.__version__}, {cpu_name()}, median of {args.repeats} "
          "interleaved repeats; CPU = process time (the ratio column), wall = elapsed")
    print()
    print("| model | params | variant | run CPU (s) | per eval CPU (ms) | × fwd (CPU) | × fwd (wall) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        ck = load_checkpoint(f"sample_checkpoints/{name}-sgd.pt")
        data = load_data(ck.data_spec)
        obj = Objective(ck.model, data.X_train, data.y_train, loss=ck.loss, batch_size=2048)
        variants = {"loop": dict(batched="off")}
        for c in args.chunks.split(","):
            variants[f"batched/{c}"] = dict(batched="on", chunk=int(c))

        def forwards():
            with torch.no_grad():
                for _ in range(args.forwards):
                    obj.model(obj.X)

        def forwards_loss_acc():
            with torch.no_grad():
                for _ in range(args.forwards):
                    out = obj.model(obj.X)
                    float(torch.nn.functional.cross_entropy(out, obj.y))
                    float((out.argmax(-1) == obj.y).sum())

        forwards()
        local_energy(obj, sigmas[:1], samples=2, batched="on", chunk=2)   # warm up vmap
        times = {k: [] for k in ["forward", "fwd+loss+acc", *variants]}
        for _ in range(args.repeats):
            times["forward"].append([t / args.forwards for t in timed(forwards)])
            times["fwd+loss+acc"].append([t / args.forwards for t in timed(forwards_loss_acc)])
            for key, kw in variants.items():
                cpu, wall = timed(lambda: local_energy(obj, sigmas, samples=args.samples, seed=0, **kw))
                times[key].append([cpu / n_evals, wall / n_evals])
        med = {k: [statistics.median(t[i] for t in v) for i in (0, 1)] for k, v in times.items()}
        f_cpu, f_wall = med["forward"]
        for key, (cpu, wall) in med.items():
            run = f"{cpu * n_evals:.2f}" if key in variants else ""
            print(f"| {name} | {obj.dim:,} | {key} | {run} | {cpu * 1e3:.2f} | {cpu / f_cpu:.2f} | "
                  f"{wall / f_wall:.2f} |", flush=True)


if __name__ == "__main__":
    main()
