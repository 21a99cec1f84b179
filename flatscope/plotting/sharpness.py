"""Plot of ``/sharpness``: worst-case and average-case sharpness against ρ (log x, symlog y), and the error
rate at δ*.

Worst case: filled circles; its error bars are the standard error over sub-batches (m-sharpness)
or, without ``m``, the spread of the restarts (down to the worst restart). Average case: open
squares, mean ± standard error over the draws. One checkpoint: worst case in C0, average in C1;
several: one colour per checkpoint, the average dotted. The test split is dashed. Lower curves are
flatter.
"""

from __future__ import annotations

import numpy as np

from . import figure, register, save

_STYLE = {"train": "-", "test": "--"}


def _splits(tree: dict) -> list[str]:
    names = str(tree.get("splits", "")).split(",")
    return [s for s in names if s and isinstance(tree.get(s), dict)]


@register("sharpness")
def plot(items, out_base, fmt):
    has_err = any(
        np.isfinite(np.asarray(tree[s]["worst_error"], dtype=float)).any() for _, tree in items for s in _splits(tree)
    )
    fig, axes = figure(1, 2 if has_err else 1, figsize=(11 if has_err else 5.8, 4.2), squeeze=False)
    ax, ax_err = axes[0, 0], (axes[0, 1] if has_err else None)
    many = len(items) > 1
    floor = np.inf
    lo, hi = 0.0, 0.0
    # several checkpoints with an error panel: the checkpoints' legend is there, the markers say which curve is which
    short = many and has_err
    for k, (label, tree) in enumerate(items):
        # one checkpoint: colour by kind (worst C0, average C1); several: colour by checkpoint
        color = f"C{k % 10}"
        avg_color = color if many else "C1"
        rho = np.asarray(tree["rho"], dtype=float)
        m = int(tree.get("m", 0) or 0)
        splits = _splits(tree)
        for split in splits:
            c = tree[split]
            ls = _STYLE.get(split, "-.")
            name = " ".join(x for x in (label if many else "", split if len(splits) > 1 or many else "") if x)
            worst = np.asarray(c["worst"], dtype=float)
            if m:
                yerr = np.asarray(c["worst_sem"], dtype=float)
            else:
                restarts = np.asarray(c["worst_restarts"], dtype=float).mean(axis=1)  # (n_rho, R)
                yerr = np.vstack([worst - restarts.min(axis=1), np.zeros_like(worst)])
            yerr = np.broadcast_to(np.nan_to_num(yerr), (2, worst.size))
            vals, ends = [worst], [worst - yerr[0], worst + yerr[1]]
            ax.errorbar(
                rho,
                worst,
                yerr=yerr,
                color=color,
                ls=ls,
                marker="o",
                ms=4,
                capsize=2.5,
                lw=1.4,
                label=None if short else " ".join(x for x in ("worst", f"(m = {m})" if m else "", name) if x),
            )
            if "average" in c:
                avg, sem = np.asarray(c["average"], dtype=float), np.asarray(c["average_sem"], dtype=float)
                vals.append(avg)
                ends += [avg - np.nan_to_num(sem), avg + np.nan_to_num(sem)]
                ax.errorbar(
                    rho,
                    avg,
                    yerr=sem,
                    color=avg_color,
                    ls=ls if not many else ":",
                    marker="s",
                    mfc="white",
                    ms=4,
                    capsize=2.5,
                    lw=1.2,
                    label=None if short else " ".join(x for x in ("average", name) if x),
                )
            ends = np.concatenate(ends)
            ends = ends[np.isfinite(ends)]
            if ends.size:
                lo, hi = min(lo, float(ends.min())), max(hi, float(ends.max()))
            pos = np.abs(np.concatenate(vals))
            pos = pos[np.isfinite(pos) & (pos > 0)]
            if pos.size:
                floor = min(floor, float(pos.min()))
            if ax_err is not None:
                err = np.asarray(c["worst_error"], dtype=float).mean(axis=1)
                ax_err.plot(rho, err, color=color, ls=ls, marker="o", ms=4, lw=1.4, label=name or None)

    def same(key):
        vals = {str(tree.get(key, "")) for _, tree in items}
        return vals.pop() if len(vals) == 1 else None

    norm, adaptive, eta = same("norm"), same("adaptive"), same("eta")
    if norm is None or adaptive is None:
        ball = "balls differ"
    else:
        ad = adaptive.lower() in ("true", "1")
        ball = (
            (f"adaptive {norm}" + (f", η = {float(eta):g}" if eta not in (None, "") else ""))
            if ad
            else f"standard {norm}"
        )
    ax.set_xscale("log")
    if np.isfinite(floor):
        # symlog: log above the smallest |value| (sharpness grows like ρ to ρ²), linear through 0 for the
        # small negative average-case means that noise (or a loss that falls under perturbation) gives
        ax.set_yscale("symlog", linthresh=10.0 ** np.floor(np.log10(floor)), linscale=1.0)
        ax.set_ylim(2 * lo if lo < 0 else 0.0, 2 * hi if hi > 0 else None)
    ax.axhline(0, color="0.75", lw=0.8, zorder=0)
    ax.set_xlabel(f"ρ  ({ball} ball)")
    ax.set_ylabel("L(w + δ) − L(w)  (symlog)")
    ax.set_title("sharpness: ● worst case (bars: restarts / s.e.), □ average")
    ax.grid(True, which="both", alpha=0.25)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    if ax_err is not None:
        ax_err.set_xscale("log")
        ax_err.set_xlabel(f"ρ  ({ball} ball)")
        ax_err.set_ylabel("error-rate rise at the worst-case δ")
        ax_err.set_title("error rate at the worst-case point")
        ax_err.axhline(0, color="0.75", lw=0.8, zorder=0)
        ax_err.grid(True, which="both", alpha=0.25)
        if ax_err.get_legend_handles_labels()[0]:
            ax_err.legend(fontsize=8)
    fig.tight_layout()
    return [save(fig, out_base, "rho", fmt)]
