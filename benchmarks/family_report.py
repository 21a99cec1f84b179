"""Markdown tables for benchmarks/RESULTS.md from ``make_family.py`` manifests and ``flatscope correlate --json``.

    python benchmarks/family_report.py reached runs/family            # the members that met the criterion
    python benchmarks/family_report.py table runs/table-corr.json runs/table-*/manifest.json
    python benchmarks/family_report.py family runs/family-corr.json

``table``: per method, test error (mean ± s.e. over seeds) and each measure (mean ± s.e.), and the
difference to SGD paired by seed with a two-sided paired t-test. ``family``: the rank correlations.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys

import numpy as np
from scipy import stats


def _ms(v) -> str:
    v = np.asarray([x for x in v if x is not None and math.isfinite(x)], float)
    if v.size == 0:
        return "–"
    se = v.std(ddof=1) / math.sqrt(v.size) if v.size > 1 else float("nan")
    return f"{v.mean():.4g} ± {se:.2g}"


def reached(folder: str) -> None:
    rows = []
    for p in sorted(glob.glob(os.path.join(folder, "*.pt.json"))):
        with open(p) as f:
            r = json.load(f)
        if r.get("reached"):
            rows.append(r["path"])
    print(" ".join(rows))


def table(corr: str, *manifests: str) -> None:
    man = {"search": {}, "final": {}}
    for path in manifests:
        with open(path) as f:
            part = json.load(f)["result"]
        man["search"].update(part["search"])
        for m, finals in part["final"].items():   # one method's seeds may come from several runs
            man["final"].setdefault(m, []).extend(finals)
    with open(corr) as f:
        c = json.load(f)
    measures = [r["measure"] for r in c["correlations"]]
    by_path = {os.path.realpath(ck["checkpoint"]): ck for ck in c["checkpoints"]}
    print("search (validation error, mean over search seeds, per lr):\n")
    for m, s in man["search"].items():
        cells = ", ".join(f"lr {float(lr):g}: {e:.4f}" for lr, e in s["validation_error"].items())
        print(f"- {m}: {cells} → lr {s['best_lr']:g}")
    print()
    head = ["method", "lr", "seeds", "grad evals", "train loss", "test error"] + measures
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    per = {}
    for m, finals in man["final"].items():
        cks = [by_path[os.path.realpath(f["path"])] for f in finals]
        per[m] = {"seed": [f["seed"] for f in finals], "test_error": [ck["quantities"]["test_error"] for ck in cks],
                  **{k: [ck["measures"][k] for ck in cks] for k in measures}}
        row = [m, f"{man['search'][m]['best_lr']:g}", str(len(finals)), str(finals[0]["grad_evals"]),
               _ms([ck["quantities"]["train_loss"] for ck in cks]), _ms(per[m]["test_error"])]
        row += [_ms(per[m][k]) for k in measures]
        print("| " + " | ".join(row) + " |")
    # each method against SGD at its budget: x3 methods against sgd_x3 when it was run
    for base_m, title in (("sgd", "method − sgd"), ("sgd_x3", "method − sgd_x3 (both at 3x the budget)")):
        if base_m not in per:
            continue
        others = [m for m in per if m != base_m and (m.endswith("_x3") == base_m.endswith("_x3"))]
        if base_m == "sgd" and "sgd_x3" not in per:
            others = [m for m in per if m != "sgd"]
        if not others:
            continue
        print(f"\npaired by seed, {title}: mean difference (two-sided paired t-test p)\n")
        head = ["method", "test error"] + measures
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        base = per[base_m]
        for m in others:
            d = per[m]
            row = [m]
            for k in ["test_error"] + measures:
                pairs = [(a, b) for s, a in zip(d["seed"], d[k]) for s2, b in zip(base["seed"], base[k])
                         if s == s2 and a is not None and b is not None]
                if len(pairs) < 2:
                    row.append("–")
                    continue
                a, b = np.array(pairs).T
                p = stats.ttest_rel(a, b).pvalue
                row.append(f"{(a - b).mean():+.3g} (p {p:.2g})")
            print("| " + " | ".join(row) + " |")


def family(corr: str) -> None:
    with open(corr) as f:
        c = json.load(f)
    axes = c["axes"]
    pct = f"{100 * c['level']:g}%"
    print(f"{len(c['checkpoints'])} models; gap {c['gap']}; axes {', '.join(axes)}; fixed within ψ groups: "
          f"{', '.join(c['fixed']) or 'none'}\n")
    head = ["measure", "flatter", "n", f"Kendall τ [{pct}]", f"Spearman ρ [{pct}]"] + [f"ψ {a}" for a in axes] + ["Ψ"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))

    def f3(v):
        return "–" if v is None else f"{v:+.3f}"

    for r in c["correlations"]:
        row = [f"`{r['measure']}`", r["flatter"] or "–", str(r["n"]),
               f"{f3(r['kendall'])} [{f3(r['kendall_ci'][0])}, {f3(r['kendall_ci'][1])}]",
               f"{f3(r['spearman'])} [{f3(r['spearman_ci'][0])}, {f3(r['spearman_ci'][1])}]"]
        row += [f"{f3(r['psi'].get(a))} ({r['psi_groups'].get(a, 0)})" for a in axes] + [f3(r["Psi"])]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"reached": reached, "table": table, "family": family}[mode](*rest)
