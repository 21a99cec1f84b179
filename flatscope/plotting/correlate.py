"""Plots of ``/correlate``: each measure against the generalization gap, one panel per hyperparameter axis.

One figure per measure (``<base>.scatter-<measure>.<fmt>``): in the panel of axis a, every checkpoint is
a point (measure, gap) coloured by its value on a (a log x axis when every value is positive and they
span more than a factor 20). The title of the figure gives Kendall's tau and Spearman's rho with their
intervals; each panel's title gives that axis' granulated coefficient psi. The x label says which
direction of the measure means flatter.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

from . import figure, register, save


def _fmt(v) -> str:
    return "–" if v is None or not math.isfinite(float(v)) else f"{float(v):+.2f}"


def _axis_label(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


@register("correlate")
def plot(items, out_base, fmt):
    paths = []
    for _label, tree in items[:1]:  # one family per file; overlaying families would mix their axes
        names = json.loads(tree["measures"])
        flatter = json.loads(tree.get("flatter", "[]")) or [""] * len(names)
        axes = json.loads(tree["axes"]) or ["(all)"]
        values = json.loads(tree["axis_values"])
        X = np.asarray(tree["values"], dtype=float)
        gap = np.asarray(tree["gap"], dtype=float)
        level = float(tree.get("level", 0.95))
        for k, name in enumerate(names):
            x = X[:, k]
            fig, panels = figure(1, len(axes), figsize=(4.2 * len(axes), 3.8), squeeze=False, sharey=True)
            ok = np.isfinite(x) & np.isfinite(gap)
            logx = bool(ok.any() and (x[ok] > 0).all() and x[ok].max() > 20 * x[ok].min())
            for j, a in enumerate(axes):
                ax = panels[0, j]
                col = values.get(a, ["all"] * len(x))
                levels = list(dict.fromkeys(_axis_label(v) for v in col))
                try:
                    levels.sort(key=float)
                except ValueError:
                    pass
                for c, lev in enumerate(levels):
                    sel = np.array([_axis_label(v) == lev for v in col]) & ok
                    ax.scatter(x[sel], gap[sel], s=22, color=f"C{c % 10}", label=lev, alpha=0.85, edgecolors="none")
                if logx:
                    ax.set_xscale("log")
                psi = np.asarray(tree["psi"], dtype=float)
                title = a if a == "(all)" else f"{a}: ψ = {_fmt(psi[k, j]) if psi.size else '–'}"
                ax.set_title(title, fontsize=10)
                ax.set_xlabel(f"{name}" + (f"  ({flatter[k]})" if flatter[k] else ""), fontsize=9)
                ax.legend(fontsize=7, title=a if a != "(all)" else None, title_fontsize=7, loc="best")
                ax.grid(alpha=0.3)
            panels[0, 0].set_ylabel(f"gap: {tree['gap_expression']}")
            kt, kc = float(tree["kendall"][k]), np.asarray(tree["kendall_ci"], dtype=float)[k]
            sp, sc = float(tree["spearman"][k]), np.asarray(tree["spearman_ci"], dtype=float)[k]
            fig.suptitle(
                f"{name} vs gap, {int(ok.sum())} models: Kendall τ = {_fmt(kt)} [{_fmt(kc[0])}, {_fmt(kc[1])}], "
                f"Spearman ρ = {_fmt(sp)} [{_fmt(sc[0])}, {_fmt(sc[1])}] ({100 * level:g}% bootstrap), "
                f"Ψ = {_fmt(float(tree['Psi'][k]))}",
                fontsize=10,
            )
            fig.tight_layout()
            safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", name)
            paths.append(save(fig, out_base, f"scatter-{safe}", fmt))
    return paths
