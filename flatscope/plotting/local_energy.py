"""Plot of ``/local_energy``: δE against σ (log x) with standard-error bars, loss and error panels.

One curve per checkpoint (colour) and split (train solid, test dashed); the target σ, when one was
asked for, is a dotted vertical line on the error panel and ε a grey horizontal line.
"""

from __future__ import annotations

import numpy as np

from . import figure, log_axis, register, save

_STYLE = {"train": ("-", "o"), "test": ("--", "s")}


def _splits(tree: dict) -> list[str]:
    names = str(tree.get("splits", "")).split(",")
    return [s for s in names if s and isinstance(tree.get(s), dict)]


@register("local_energy")
def plot(items, out_base, fmt):
    has_err = any(
        np.isfinite(np.asarray(tree[s]["delta_err_mean"], dtype=float)).any()
        for _, tree in items
        for s in _splits(tree)
    )
    fig, axes = figure(1, 2 if has_err else 1, figsize=(11 if has_err else 5.8, 4.2), squeeze=False)
    ax_loss = axes[0, 0]
    ax_err = axes[0, 1] if has_err else None
    many = len(items) > 1
    eps_drawn = set()
    floor = np.inf
    for k, (label, tree) in enumerate(items):
        color = f"C{k % 10}"
        sigma = np.asarray(tree["sigma"], dtype=float)
        keep = sigma > 0  # a log axis cannot show σ = 0 (where δE = 0 exactly)
        splits = _splits(tree)
        for split in splits:
            c = tree[split]
            ls, marker = _STYLE.get(split, ("-.", "^"))
            name = " ".join(x for x in (label if many else "", split if len(splits) > 1 or many else "") if x)
            for ax, key in ((ax_loss, "delta_loss"), (ax_err, "delta_err")):
                if ax is None:
                    continue
                ax.errorbar(
                    sigma[keep],
                    np.asarray(c[f"{key}_mean"])[keep],
                    yerr=np.asarray(c[f"{key}_sem"])[keep],
                    color=color,
                    ls=ls,
                    marker=marker,
                    ms=3.5,
                    capsize=2.5,
                    lw=1.3,
                    label=(name or None) if ax is ax_loss else None,
                )
            pos = np.abs(np.asarray(c["delta_loss_mean"], dtype=float)[keep])
            pos = pos[np.isfinite(pos) & (pos > 0)]
            if pos.size:
                floor = min(floor, float(pos.min()))
            tg = c.get("target")
            if ax_err is not None and isinstance(tg, dict) and bool(tg.get("reached")):
                ax_err.axvline(
                    float(tg["sigma"]),
                    color=color,
                    ls=ls,
                    lw=0.9,
                    alpha=0.6,
                    label=f"σ* {name}".rstrip() if name else "σ*",
                )
                eps = float(tg["epsilon"])
                if eps not in eps_drawn:
                    ax_err.axhline(eps, color="0.5", ls=":", lw=1)
                    eps_drawn.add(eps)

    def same(key):
        vals = {str(tree.get(key, "")) for _, tree in items}
        return vals.pop() if len(vals) == 1 else None

    noise, n, bn = same("noise"), same("samples"), same("bn")
    how = [f"{noise} noise" if noise else "noise differs", f"{n} draws" if n else "draws differ"]
    if bn != "eval":
        how.append("BN recomputed" if bn == "recompute" else "BN differs")
    if np.isfinite(floor):
        # symlog: log above the smallest |mean| (δ loss grows like σ² at small σ), linear through 0 for
        # the small negative means that noise produces at the smallest σ
        ax_loss.set_yscale("symlog", linthresh=10.0 ** np.floor(np.log10(floor)), linscale=1.0)
    ax_loss.set_ylabel("δ loss  (mean ± s.e., symlog)")
    ax_loss.set_title("local energy: loss")
    for ax in (ax_loss, ax_err):
        if ax is None:
            continue
        ax.set_xscale("log")
        log_axis(ax, np.concatenate([np.asarray(tree["sigma"], dtype=float) for _, tree in items]))
        ax.set_xlabel(f"σ  ({', '.join(how)})")
        ax.axhline(0, color="0.75", lw=0.8, zorder=0)
        ax.grid(True, which="both", alpha=0.25)
    if ax_err is not None:
        ax_err.set_ylabel("δ error rate  (mean ± s.e.)")
        ax_err.set_title("local energy: error rate" + ("  (dotted: ε, vertical: target σ*)" if eps_drawn else ""))
    for ax in (ax_loss, ax_err):
        if ax is not None and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return [save(fig, out_base, "curves", fmt)]
