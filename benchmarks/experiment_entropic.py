"""Experiment (not a test): entropic optimizers vs SGD on digits at an equal gradient budget.

For sgd, esgd, rsgd, sam and heat, trained from the same initialization per seed with the same
budget of gradient evaluations (``flatscope train``'s counting: Langevin steps, replica steps and
SAM's second gradient all count), it measures at the final weights

- test accuracy and test loss;
- lambda_max of the training-loss Hessian (power iteration on ``Objective.hvp``);
- its trace (Hutchinson, Rademacher probes, with the standard error of the mean);
- the local energy dE(sigma) = E_z E(w + sigma z * w) - E(w), z ~ N(0, I), multiplicative noise as in
  Pittorino et al. 2021 (arXiv:2006.07897), for the training
  error (dE_err) and loss (dE_loss), by Monte Carlo with its standard error, at "informative" sigma:
  those where SGD's dE_err lies between 1% and 20%.

Flatness measures follow the loss level, so each method is also compared with the SGD run of the
same seed stopped where its training loss first falls to the method's final training loss (SGD's
trajectory is recorded by resuming ``train`` in small increments, which is bit-identical to one run).
Differences to SGD are paired by seed; significance is a two-sided paired t-test over seeds.

The measures are flatscope's own: Lanczos for λ_max, Hutchinson for the trace (200 probes) and
the local-energy analysis (200 draws, common random numbers across σ).

    python benchmarks/experiment_entropic.py --seeds 5 --epochs 30        # ~7 min on 1 shared thread
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import subprocess
import time

import numpy as np
import torch
from scipy import stats

from flatscope.analyses.hessian import top_eigenvectors
from flatscope.analyses.local_energy import local_energy
from flatscope.data import load_data
from flatscope.linalg import trace
from flatscope.models import build_model
from flatscope.objective import Objective
from flatscope.training import TrainConfig, train

SPEC = {"name": "mlp", "kwargs": {"in_features": 64, "out_features": 10}}
METHODS = {   # the CLI defaults, plus the authors' Nesterov momentum on eSGD's outer step
    "sgd": dict(opt="sgd"),
    "esgd": dict(opt="esgd", nesterov=True),
    "rsgd": dict(opt="rsgd"),
    "sam": dict(opt="sam"),
    "heat": dict(opt="heat"),
}


# ------------------------------------------------------------------ measures (flatscope's own analyses)
def lambda_max(obj: Objective, seed: int = 0) -> float:
    """Largest Hessian eigenvalue: Lanczos on exact HVPs (``flatscope.analyses.hessian``), tol 1e-5."""
    return float(top_eigenvectors(obj, 1, seed=seed).eigenvalues[0])


def hutchinson_trace(obj: Objective, probes: int = 200, seed: int = 0) -> tuple[float, float]:
    """tr(H) by Hutchinson over Rademacher probes (``flatscope.linalg.trace``): (mean, standard error)."""
    res = trace(obj.hvp_operator(), obj.dim, probes, method="hutchinson", seed=seed, device=obj.device)
    return float(res.trace), float(res.stderr)


def local_energies(obj: Objective, sigmas, samples: int = 200, seed: int = 0) -> dict[float, dict]:
    """dE(sigma) of the training error and loss with standard errors (``flatscope.analyses.local_energy``,
    multiplicative noise, common random numbers across sigma)."""
    c = local_energy(obj, np.asarray(sigmas, dtype=float), samples=samples, seed=seed).curves["train"]
    return {float(s): {"d_err": float(c.delta_err_mean[i]), "d_err_se": float(c.delta_err_sem[i]),
                       "d_loss": float(c.delta_loss_mean[i]), "d_loss_se": float(c.delta_loss_sem[i])}
            for i, s in enumerate(sigmas)}


# ------------------------------------------------------------------ training
def init_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(SPEC)


def train_method(name: str, seed: int, budget: int, data) -> tuple[torch.nn.Module, dict]:
    model = init_model(seed)
    cfg = TrainConfig(seed=seed, budget=budget, batch_size=64, **METHODS[name])
    rec = train(model, data, "ce", cfg, model_spec=SPEC, data_spec={"name": "digits"})
    return model, rec


def sgd_trajectory(seed: int, budget: int, data, every: int) -> list[tuple[int, float, torch.nn.Module]]:
    """SGD snapshots every ``every`` evaluations: (evals, train loss, model), by bit-identical resumption."""
    model = init_model(seed)
    snaps, rec = [], None
    for b in range(every, budget + 1, every):
        cfg = TrainConfig(seed=seed, budget=b, batch_size=64, **METHODS["sgd"])
        rec = train(model, data, "ce", cfg, model_spec=SPEC, data_spec={"name": "digits"},
                    resume_state=rec and rec["resume"], history=rec and rec["history"])
        snaps.append((b, rec["history"]["train_loss"][-1], copy.deepcopy(model)))
    return snaps


def measure(model, data, sigmas, seed) -> dict:
    obj = Objective(model, data.X_train, data.y_train, batch_size=2048)
    test = Objective(model, data.X_test, data.y_test, batch_size=2048).evaluate()
    out = {"train_loss": obj.evaluate()[0], "test_loss": test[0], "test_acc": test[1],
           "lambda_max": lambda_max(obj, seed=seed)}
    out["trace"], out["trace_se"] = hutchinson_trace(obj, seed=seed)
    for s, le in local_energies(obj, sigmas, seed=seed).items():
        out.update({f"{k}@{s:g}": v for k, v in le.items()})
    return out


def pick_sigmas(model, data, grid=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)) -> tuple[list[float], dict]:
    """sigmas at which SGD's dE_err lies in [1%, 20%] (the informative range)."""
    obj = Objective(model, data.X_train, data.y_train, batch_size=2048)
    scan = {s: v["d_err"] for s, v in local_energies(obj, grid, samples=100).items()}
    chosen = [s for s, d in scan.items() if 0.01 <= d <= 0.20]
    if len(chosen) > 2:
        chosen = [chosen[0], chosen[-1]]
    return chosen, scan


# ------------------------------------------------------------------ report
def paired(diffs: list[float]) -> tuple[float, float, float]:
    d = np.asarray(diffs, dtype=float)
    se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    p = float(stats.ttest_1samp(d, 0.0).pvalue) if len(d) > 1 and d.std() > 0 else float("nan")
    return float(d.mean()), float(se), p


def fmt(mean, se):
    return f"{mean:.4g} ± {se:.2g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=float, default=30)
    ap.add_argument("--snapshot-every", type=int, default=4, help="SGD trajectory resolution in evaluations")
    ap.add_argument("--json", default=None, help="also write all numbers to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    data = load_data({"name": "digits"})
    bpe = math.ceil(data.X_train.shape[0] / 64)
    budget = int(round(args.epochs * bpe))
    budget -= budget % 6                       # a multiple of every method's step (rSGD: 3, SAM: 2)
    seeds = list(range(args.seeds))

    results: dict = {m: [] for m in METHODS}
    matched: dict = {m: [] for m in METHODS if m != "sgd"}
    models = {}
    for seed in seeds:
        for name in METHODS:
            models[name, seed] = train_method(name, seed, budget, data)
    sigmas, scan = pick_sigmas(models["sgd", 0][0], data)
    print(f"budget {budget} gradient evaluations ({budget / bpe:g} epochs of {bpe} batches); seeds {seeds}")
    print("SGD seed 0 dE_err scan: " + ", ".join(f"sigma {s:g}: {d:.3f}" for s, d in scan.items()))
    print(f"informative sigmas: {sigmas}")
    for seed in seeds:
        for name in METHODS:
            model, rec = models[name, seed]
            r = measure(model, data, sigmas, seed)
            r["grad_evals"] = rec["grad_evals"]
            results[name].append(r)
        traj = sgd_trajectory(seed, budget, data, args.snapshot_every)
        for name in matched:
            target = results[name][-1]["train_loss"]
            hit = next((s for s in traj if s[1] <= target), None)
            reached = hit is not None
            evals, loss, m = hit if reached else traj[-1]
            r = measure(m, data, sigmas, seed)
            r.update({"sgd_evals": evals, "reached": reached, "target_train_loss": target})
            matched[name].append(r)
        print(f"seed {seed} done ({time.time() - t0:.0f} s)", flush=True)

    keys = ["test_acc", "test_loss", "train_loss", "lambda_max", "trace"] + \
        [f"{k}@{s:g}" for s in sigmas for k in ("d_err", "d_loss")]
    print("\n### At equal budget (mean ± SEM over seeds)\n")
    print("| method | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, rows in results.items():
        cells = []
        for k in keys:
            v = np.array([r[k] for r in rows])
            cells.append(fmt(v.mean(), v.std(ddof=1) / math.sqrt(len(v))))
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n### Paired differences to SGD at equal budget (method − sgd; mean ± SEM, p of a paired t-test)\n")
    print("| method | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name in matched:
        cells = []
        for k in keys:
            m, se, p = paired([a[k] - b[k] for a, b in zip(results[name], results["sgd"])])
            cells.append(f"{m:+.3g} ± {se:.2g} (p={p:.2g})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n### Paired differences to SGD stopped at the same training loss (method − matched sgd)\n")
    print("| method | SGD evals at match | reached | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 3) + "|")
    for name, rows in matched.items():
        cells = []
        for k in keys:
            m, se, p = paired([a[k] - b[k] for a, b in zip(results[name], rows)])
            cells.append(f"{m:+.3g} ± {se:.2g} (p={p:.2g})")
        ev = ", ".join(str(r["sgd_evals"]) for r in rows)
        reached = sum(r["reached"] for r in rows)
        print(f"| {name} | {ev} | {reached}/{len(rows)} | " + " | ".join(cells) + " |")
    se_keys = ["trace_se"] + [f"{k}_se@{s:g}" for s in sigmas for k in ("d_err", "d_loss")]
    se_note = {k: float(np.median([r[k] for rows in results.values() for r in rows])) for k in se_keys}
    print("\nmedian within-model standard errors: " + ", ".join(f"{k} {v:.2g}" for k, v in se_note.items()))
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    print(f"\n{time.time() - t0:.0f} s; torch {torch.__version__}, 1 thread, {platform.machine()}; {cpu}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"budget": budget, "sigmas": sigmas, "scan": scan, "results": results, "matched": matched},
                      f, indent=1, default=float)


if __name__ == "__main__":
    main()
