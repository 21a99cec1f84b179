"""Train a controlled family of checkpoints for ``flatscope correlate``, and the equal-budget optimizer table.

Two modes (both write flatscope checkpoints and a ``manifest.json`` beside them):

``family``: the grid optimizer x learning-rate factor x batch size x width x seed (Jiang et al. 2019,
"Fantastic Generalization Measures and Where to Find Them", arXiv:1912.02178, section 2: a family that
varies one hyperparameter at a time around each other model). Every model gets the same largest budget of
gradient evaluations (flatscope's counting: Langevin steps, replica steps and SAM's second gradient all
count) and stops at the first check where its training loss reaches the criterion ``--stop-loss`` (Jiang
et al.'s cross-entropy 0.01 by default), so every member sits at the same training loss; a model that does
not reach it within the budget is trained to the budget and marked ``reached: false`` in the manifest
(one still at 95% of its initial loss a third of the way in stops there, also ``reached: false``;
``flatscope correlate`` reads the training record; leave those files out of the glob, or keep them,
as you choose: the manifest lists both). Checks are every ``--check-every`` evaluations, by bit-identical
resumption of ``flatscope.training.train``. The axes are written into each checkpoint's training record
under ``axes`` (optimizer, lr, batch_size, width, seed), which ``flatscope correlate`` reads.

``table``: sgd, esgd, rsgd (equal budget, y replicas share it) and rsgd x y (each replica gets the whole
budget, Pittorino et al. 2021, "Entropic gradient descent algorithms and wide flat minima",
arXiv:2006.07897, Table 1's "×y" rows), with sgd x y (SGD given the same y-fold budget) as its control, each with a small learning-rate search at that budget (extended by
factors of 2 while the best candidate is at an edge of the grid, at most ``--search-extend`` times): every
candidate trained on 80% of the training split with search seeds and scored by its error on the held-out
20% (the test split is never used to choose); the best candidate then trained on the whole training split
with ``--seeds`` seeds, all to the full budget (no early stop).

    python benchmarks/make_family.py family --data digits -o runs/family          # ~64 CNNs
    python benchmarks/make_family.py table --data digits --seeds 5 -o runs/table
    python benchmarks/make_family.py family --data mnist1d --model cnn1d -o runs/family-mnist1d
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

from flatscope.checkpoint import save_checkpoint
from flatscope.data import Dataset, load_data
from flatscope.models import build_model
from flatscope.training import TrainConfig, evaluate_model, train

OPTS = ("sgd", "esgd", "rsgd", "sam")
# Each optimizer's base learning rate (the CLI defaults, flatscope.methods.*.default_lr) and extras.
BASE = {"sgd": (0.05, {}), "esgd": (10.0, {}), "rsgd": (0.05, {"replicas": 3}), "sam": (0.05, {"rho": 0.05})}


def model_spec(name: str, width: int, data: Dataset) -> dict:
    """The architecture at width multiplier ``width``: cnn channels (4w, 8w), hidden 16w; cnn1d (for mnist1d's
    40-sample signals) channels (8w, 16w), hidden 16w; mlp (32w, 32w)."""
    kw = {"in_features": data.in_features, "out_features": data.n_outputs}
    if name == "cnn":
        kw.update(channels=[4 * width, 8 * width], hidden=16 * width)
    elif name == "cnn1d":
        kw.update(channels=[8 * width, 16 * width], hidden=16 * width)
    elif name == "mlp":
        kw.update(widths=[32 * width, 32 * width])
    else:
        raise SystemExit(f"unknown --model {name!r} (cnn, cnn1d or mlp)")
    return {"name": name, "kwargs": kw}


def fit(spec: dict, data: Dataset, data_spec: dict, opt: str, lr: float, extra: dict, batch_size: int, seed: int,
        budget: int, stop_loss: float | None = None, check_every: int = 0) -> tuple[torch.nn.Module, dict, bool]:
    """Train from the seed's initialization to ``budget`` evaluations, or until the training loss is at most
    ``stop_loss`` at a check (every ``check_every`` evaluations). Returns (model, record, reached)."""
    torch.manual_seed(seed)
    model = build_model(spec)
    rec = None
    steps = [budget] if not stop_loss else list(range(check_every, budget, check_every)) + [budget]
    reached = False
    for b in steps:
        cfg = TrainConfig(opt=opt, lr=lr, batch_size=batch_size, budget=b, seed=seed, extra=dict(extra))
        rec = train(model, data, "ce", cfg, model_spec=spec, data_spec=data_spec,
                    resume_state=rec and rec["resume"], history=rec and rec["history"])
        loss = rec["history"]["train_loss"][-1]
        if stop_loss and loss <= stop_loss:
            reached = True
            break
        if stop_loss and b >= budget // 3 and loss >= 0.95 * rec["history"]["train_loss"][0]:
            break   # stuck at the initial loss (a dead network) a third of the way in: not worth the budget
    return model, rec, reached


def save(path: str, model, spec, data_spec, rec: dict, axes: dict) -> None:
    rec = dict(rec, axes=axes)
    rec.pop("resume", None)   # these checkpoints are not meant to be resumed; keeps them small
    rec.pop("replicas", None)
    save_checkpoint(path, model, spec, data_spec, "ce", rec)


def family(args, data, data_spec) -> list[dict]:
    rows = []
    grid = list(itertools.product(args.opts, args.lr_factors, args.batch_sizes, args.widths, args.seed_list))
    for i, (opt, f, bs, w, seed) in enumerate(grid, 1):
        base, extra = BASE[opt]
        lr = args.base_lr.get(opt, base) * f
        spec = model_spec(args.model, w, data)
        name = f"{opt}-lr{f:g}-bs{bs}-w{w}-s{seed}"
        path = os.path.join(args.out, name + ".pt")
        t0 = time.time()
        if os.path.exists(path) and not args.force:
            with open(path + ".json") as fh:
                rows.append(json.load(fh))
            continue
        try:
            model, rec, reached = fit(spec, data, data_spec, opt, lr, extra, bs, seed, args.budget,
                                      args.stop_loss, args.check_every)
        except Exception as exc:  # noqa: BLE001 - a diverged member is part of the record, not a crash of the family
            row = {"name": name, "opt": opt, "lr": lr, "batch_size": bs, "width": w, "seed": seed,
                   "error": str(exc).splitlines()[0]}
            rows.append(row)
            print(f"[{i}/{len(grid)}] {name}: {row['error']}", flush=True)
            continue
        h = rec["history"]
        axes = {"optimizer": opt, "lr": lr, "batch_size": bs, "width": w, "seed": seed}
        save(path, model, spec, data_spec, rec, axes)
        row = {"name": name, "path": path, **axes, "reached": reached, "grad_evals": rec["grad_evals"],
               "train_loss": h["train_loss"][-1], "train_acc": h["train_acc"][-1], "test_acc": h["test_acc"][-1],
               "seconds": time.time() - t0}
        with open(path + ".json", "w") as fh:
            json.dump(row, fh)
        rows.append(row)
        print(f"[{i}/{len(grid)}] {name}: {'reached' if reached else 'NOT reached'} loss {row['train_loss']:.4f} "
              f"after {rec['grad_evals']} evals, test acc {row['test_acc']:.4f} ({row['seconds']:.1f} s)", flush=True)
    return rows


TABLE = {   # method -> (optimizer, extras, budget multiplier)
    "sgd": ("sgd", {}, 1), "esgd": ("esgd", {}, 1), "rsgd": ("rsgd", {"replicas": 3}, 1),
    "rsgd_x3": ("rsgd", {"replicas": 3}, 3),
    "sgd_x3": ("sgd", {}, 3),   # the control for rsgd_x3: SGD given the same total budget
}


def table(args, data, data_spec) -> dict:
    X, y = data.split("train")
    g = torch.Generator().manual_seed(12345)
    perm = torch.randperm(X.shape[0], generator=g)
    n_val = X.shape[0] // 5
    val_data = Dataset(X[perm[n_val:]], y[perm[n_val:]], X[perm[:n_val]], y[perm[:n_val]], name="search")
    spec = model_spec(args.model, args.table_width, data)
    out = {"budget": args.budget, "batch_size": args.table_batch_size, "model": spec, "search": {}, "final": {}}
    for method in args.methods:
        opt, extra, mult = TABLE[method]
        base = BASE[opt][0]
        scores: dict[float, float] = {}
        factors = [] if args.lr else sorted(args.search_factors)
        while factors:
            f = factors.pop(0)
            errs = []
            for s in args.search_seeds:
                try:
                    model, rec, _ = fit(spec, val_data, data_spec, opt, base * f, extra, args.table_batch_size, s,
                                        args.budget * mult)
                    errs.append(1 - evaluate_model(model, val_data, "ce", "test")[1])
                except Exception as exc:  # noqa: BLE001 - a diverged candidate scores 1.0
                    print(f"search {method} lr {base * f:g} seed {s}: {str(exc).splitlines()[0]}", flush=True)
                    errs.append(1.0)
            scores[base * f] = sum(errs) / len(errs)
            print(f"search {method} lr {base * f:g}: validation error {scores[base * f]:.4f}", flush=True)
            if not factors and len(scores) < len(args.search_factors) + args.search_extend:
                # a best lr at the edge of the grid is not a choice: extend by x2 on that side
                lrs = sorted(scores)
                best_lr = min(scores, key=scores.__getitem__)
                if best_lr == lrs[-1]:
                    factors.append(lrs[-1] / base * 2)
                elif best_lr == lrs[0]:
                    factors.append(lrs[0] / base / 2)
        best = args.lr or min(scores, key=scores.get)
        out["search"][method] = {"validation_error": scores, "best_lr": best, "given": bool(args.lr)}
        finals = []
        for s in args.seed_list:
            path = os.path.join(args.out, f"{method}-s{s}.pt")
            model, rec, _ = fit(spec, data, data_spec, opt, best, extra, args.table_batch_size, s, args.budget * mult)
            axes = {"optimizer": method, "lr": best, "batch_size": args.table_batch_size, "width": args.table_width,
                    "seed": s}
            save(path, model, spec, data_spec, rec, axes)
            h = rec["history"]
            finals.append({"path": path, "seed": s, "grad_evals": rec["grad_evals"], "train_loss": h["train_loss"][-1],
                           "test_error": 1 - h["test_acc"][-1]})
            print(f"final {method} seed {s}: test error {finals[-1]['test_error']:.4f}, train loss "
                  f"{finals[-1]['train_loss']:.4f}", flush=True)
        out["final"][method] = finals
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["family", "table"])
    p.add_argument("--data", default="digits", help="a flatscope data name (digits, mnist1d, npz:PATH)")
    p.add_argument("--data-kwargs", default="{}", help="JSON keyword arguments for --data")
    p.add_argument("--model", default="cnn", choices=["cnn", "cnn1d", "mlp"])
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--budget", type=int, default=1500, help="gradient evaluations (the same for every member)")
    p.add_argument("--stop-loss", type=float, default=0.01, help="family: the training-loss criterion")
    p.add_argument("--check-every", type=int, default=50, help="family: evaluations between criterion checks")
    p.add_argument("--opts", default=",".join(OPTS))
    p.add_argument("--lr-factors", default="0.5,1", help="family: multiples of each optimizer's base lr")
    p.add_argument("--base-lr", default="",
                   help="family: base lrs that replace the CLI defaults, e.g. rsgd=0.2 (the table's search choice)")
    p.add_argument("--batch-sizes", default="32,128")
    p.add_argument("--widths", default="1,2")
    p.add_argument("--seeds", default=None, help="comma list of seeds (default: family 0,1; table 0,1,2,3,4)")
    p.add_argument("--methods", default=",".join(TABLE), help="table: methods")
    p.add_argument("--search-factors", default="0.5,1,2", help="table: lr multiples searched")
    p.add_argument("--search-seeds", default="100,101")
    p.add_argument("--search-extend", type=int, default=3,
                   help="table: while the best lr is at an edge of the grid, add lr x2 (or /2) beyond it, at most this often")
    p.add_argument("--lr", type=float, default=None,
                   help="table: no search, this lr (e.g. rsgd_x3 with the lr rsgd's search chose)")
    p.add_argument("--table-batch-size", type=int, default=64)
    p.add_argument("--table-width", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true", help="family: retrain members already on disk")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.opts = args.opts.split(",")
    args.methods = args.methods.split(",")
    args.lr_factors = [float(x) for x in args.lr_factors.split(",")]
    args.base_lr = {k: float(v) for k, v in (kv.split("=") for kv in args.base_lr.split(",") if kv)}
    args.search_factors = [float(x) for x in args.search_factors.split(",")]
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    args.widths = [int(x) for x in args.widths.split(",")]
    args.search_seeds = [int(x) for x in args.search_seeds.split(",")]
    args.seeds = args.seeds or ("0,1" if args.mode == "family" else "0,1,2,3,4")
    args.seed_list = [int(x) for x in args.seeds.split(",")]
    data_spec = {"name": args.data, "kwargs": json.loads(args.data_kwargs)}
    data = load_data(data_spec)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    result = family(args, data, data_spec) if args.mode == "family" else table(args, data, data_spec)
    manifest = {"command": " ".join([os.path.basename(sys.executable), "benchmarks/make_family.py"] + sys.argv[1:]),
                "threads": args.threads, "seconds": time.time() - t0, "torch": torch.__version__,
                "result": result}
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"done in {time.time() - t0:.0f} s; manifest {os.path.join(args.out, 'manifest.json')}")


if __name__ == "__main__":
    main()
