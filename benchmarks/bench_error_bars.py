"""Are the local-entropy error bars honest?  z = (estimate - exact) / reported error, by quadrature.

Two models whose q_gamma(w'|w) ∝ exp(-beta L(w') - beta gamma/2 |w'-w|^2) can be integrated on a
dense grid (the exact reference; no sampler involved):

- ``well``: a 1-parameter double well, L(w) = mean_i (w^2 - y_i)^2 (MSE of the constant output
  w^2; the parameter is a 0-d tensor), N = 200 samples, centred at the minimum w = +sqrt(mean y);
- ``logreg``: 2-parameter logistic regression (cross-entropy, logits (0, x.w)), N = 200, centred at
  its maximum-likelihood weights.

beta = N (the default). For every configuration and seed the script runs
:func:`flatscope.analyses.local_entropy.local_entropy` and prints, per gamma, the z of ⟨L⟩_q, ⟨|d|^2⟩_q,
each component of the mean shift ⟨w'⟩ - w and F, against the reported standard error (``err``)
and, where a minibatch bias estimate exists, against the error with that bias folded in.

    python benchmarks/bench_error_bars.py --configs mb64,full --seeds 4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flatscope.analyses.local_entropy import default_minibatch, local_entropy
from flatscope.objective import Objective
from _machine import machine


# ---------------------------------------------------------------------------------------------------
# The two reference problems (also imported by tests/test_error_bars.py)
# ---------------------------------------------------------------------------------------------------
class Well(torch.nn.Module):
    """Outputs w^2 for every input: MSE against targets y_i is the double well mean (w^2 - y_i)^2."""

    def __init__(self, w: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(float(w), dtype=torch.float64))

    def forward(self, x):
        return self.w ** 2 + 0.0 * x[:, 0]


class LogReg(torch.nn.Module):
    """Logits (0, x . w): binary logistic regression with 2 weights, no bias."""

    def __init__(self, w):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1, bias=False).double()
        with torch.no_grad():
            self.lin.weight.copy_(torch.as_tensor(w, dtype=torch.float64)[None])

    def forward(self, x):
        z = self.lin(x)
        return torch.cat([torch.zeros_like(z), z], dim=-1)


def well_problem(N: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = 0.3 + 0.3 * rng.standard_normal(N)
    w0 = float(np.sqrt(y.mean()))
    X = torch.zeros(N, 1, dtype=torch.float64)
    obj = Objective(Well(w0), X, torch.tensor(y), loss="mse", dtype=torch.float64)

    def loss(W):            # W: (P, 1) -> (P,)
        w2 = W[:, 0] ** 2
        return (w2 - y.mean()) ** 2 + y.var()
    return obj, loss


def logreg_problem(N: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, 2))
    p = 1 / (1 + np.exp(-(X @ np.array([1.5, -1.0]))))
    lab = (rng.random(N) < p).astype(np.int64)
    w = np.zeros(2)
    for _ in range(50):     # Newton's method to the maximum-likelihood weights
        s = 1 / (1 + np.exp(-(X @ w)))
        g = X.T @ (s - lab) / N
        H = (X * (s * (1 - s))[:, None]).T @ X / N
        w = w - np.linalg.solve(H, g)
    obj = Objective(LogReg(w), torch.tensor(X), torch.tensor(lab), loss="ce", dtype=torch.float64)

    def loss(W):            # W: (P, 2) -> (P,)
        z = X @ W.T          # (N, P)
        return np.mean(np.logaddexp(0.0, z) - lab[:, None] * z, axis=0)
    return obj, loss


def reference(loss, center: np.ndarray, gammas, beta: float, half_width: float, points: int) -> dict:
    """⟨L⟩, ⟨|d|^2⟩, ⟨d⟩ and F under q_gamma by a tensor-product grid quadrature (1 or 2 dims)."""
    n = center.size
    ax = np.linspace(-half_width, half_width, points)
    h = ax[1] - ax[0]
    D = ax[:, None] if n == 1 else np.stack(np.meshgrid(ax, ax, indexing="ij"), -1).reshape(-1, 2)
    L = np.concatenate([loss(center[None] + D[i:i + 200_000]) for i in range(0, len(D), 200_000)])
    sq = (D * D).sum(1)
    L0 = float(loss(center[None])[0])
    out = {k: [] for k in ("mean_loss", "mean_sq_dist", "shift", "local_entropy")}
    for g in gammas:
        lw = -beta * (L - L0) - 0.5 * beta * g * sq
        M = lw.max()
        wt = np.exp(lw - M)
        Z = wt.sum()
        out["mean_loss"].append(float((wt * L).sum() / Z))
        out["mean_sq_dist"].append(float((wt * sq).sum() / Z))
        out["shift"].append((wt[:, None] * D).sum(0) / Z)
        log_int = M + np.log(Z * h**n) + 0.5 * n * np.log(beta * g / (2 * np.pi))
        out["local_entropy"].append(L0 - log_int / beta)
    return {k: np.array(v) for k, v in out.items()}


def problem(name: str):
    obj, loss = (well_problem if name == "well" else logreg_problem)()
    return obj, loss


GAMMAS = {"well": np.geomspace(0.3, 300.0, 7), "logreg": np.geomspace(0.03, 30.0, 7)}


def zscores(res, ref, center: np.ndarray) -> dict:
    """z per quantity and gamma against the reported error."""
    p = res.per_gamma
    est_shift = res.vectors["mean_params"] - center[None]
    se_shift = res.vectors["grad_err"] / res.gamma[:, None]
    z = {"mean_loss": (p["mean_loss"] - ref["mean_loss"]) / p["mean_loss_err"],
         "mean_sq_dist": (p["mean_sq_dist"] - ref["mean_sq_dist"]) / p["mean_sq_dist_err"],
         "local_entropy": (p["local_entropy"] - ref["local_entropy"]) / p["local_entropy_err"]}
    for j in range(est_shift.shape[1]):
        z[f"shift{j}"] = (est_shift[:, j] - ref["shift"][:, j]) / se_shift[:, j]
    return z


CONFIGS = {
    # name: (kwargs for local_entropy)
    "mb64": {"minibatch": 64},
    "mb64-long": {"minibatch": 64, "steps": 2000},
    "full": {"minibatch": None},
    "full-long": {"minibatch": None, "steps": 2000},
    "default": {"minibatch": "default"},
    "default-long": {"minibatch": "default", "steps": 2000},
    "mb16": {"minibatch": 16},
    "mala": {"sampler": "mala"},
}


def run(name: str, config: str, seed: int, ref_cache: dict) -> dict:
    obj, loss = problem(name)
    gam = GAMMAS[name]
    beta = float(obj.n)
    if name not in ref_cache:
        c = obj.w0.numpy()
        hw = 10 / np.sqrt(beta * gam[0])
        ref_cache[name] = reference(loss, c, gam, beta, hw, 200_001 if c.size == 1 else 1601)
    kw = {"chains": 8, "steps": 1000, "burn_in": 200, "is_samples": 256}
    kw.update(CONFIGS[config])
    if kw.get("minibatch") == "default":     # what `flatscope local-entropy` picks for this split
        kw["minibatch"] = default_minibatch(obj.n)
    t0 = time.time()
    res = local_entropy(obj, gam, seed=seed, **kw)
    wall = time.time() - t0
    z = zscores(res, ref_cache[name], obj.w0.numpy())
    p = res.per_gamma
    out = {"problem": name, "config": config, "seed": seed, "wall_s": wall,
           "max_abs_z": {k: float(np.nanmax(np.abs(v))) for k, v in z.items()},
           "minibatch": res.minibatch, "flagged": p["minibatch_biased"].tolist(),
           "n_warnings": len(res.warnings)}
    # the same against the Monte Carlo standard errors alone (what was reported before the bias was folded in)
    zmc = {"mean_loss": (p["mean_loss"] - ref_cache[name]["mean_loss"]) / p["mean_loss_sem"],
           "mean_sq_dist": (p["mean_sq_dist"] - ref_cache[name]["mean_sq_dist"]) / p["mean_sq_dist_sem"],
           "local_entropy": (p["local_entropy"] - ref_cache[name]["local_entropy"])
           / np.sqrt(p["local_entropy_err"] ** 2 - np.nan_to_num(p["local_entropy_bias"]) ** 2
                     - np.nan_to_num(p["local_entropy_bias_sem"]) ** 2)}
    out["max_abs_z_mc_only"] = {k: float(np.nanmax(np.abs(v))) for k, v in zmc.items()}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", default="well,logreg")
    ap.add_argument("--configs", default="mb64,full")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write every row to this file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(machine())
    rows, cache = [], {}
    for name in a.problems.split(","):
        for config in a.configs.split(","):
            for seed in range(a.seeds):
                r = run(name, config, seed, cache)
                rows.append(r)
                zs = "  ".join(f"{k} {v:5.2f}" for k, v in r["max_abs_z"].items())
                zm = " ".join(f"{k} {v:.2f}" for k, v in r["max_abs_z_mc_only"].items())
                print(f"{name:7s} {config:12s} seed {seed}: max|z| {zs}  flagged {sum(r['flagged'])}  "
                      f"{r['wall_s']:.1f}s  [vs Monte Carlo error alone: {zm}]", flush=True)
            sel = [r for r in rows if r["problem"] == name and r["config"] == config]
            worst = {k: max(r["max_abs_z"][k] for r in sel) for k in sel[0]["max_abs_z"]}
            print(f"  -> {name} {config}: worst max|z| over {len(sel)} seeds: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in worst.items()), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
