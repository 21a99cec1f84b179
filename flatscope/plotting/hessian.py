"""Plots of a ``/hessian`` group: eigenvalue stems, the spectral density on a log scale, per-layer bars.

Several items (``flatscope plot a.h5 b.h5``) are overlaid in one figure per kind, one colour each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import figure, register, save


def _colors(n: int) -> list:
    import matplotlib.pyplot as plt

    cyc = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cyc[i % len(cyc)] for i in range(n)]


def _stems(ax, x, y, conv, color, label, marker="o"):
    ax.vlines(x, 0, y, color=color, lw=1.2, alpha=0.8)
    conv = np.asarray(conv, dtype=bool) if conv is not None and len(conv) == len(y) else np.ones(len(y), bool)
    ax.plot(x[conv], y[conv], marker, color=color, ms=5, label=label, ls="none")
    if (~conv).any():
        ax.plot(x[~conv], y[~conv], marker, mfc="white", color=color, ms=5, ls="none", label=f"{label} (not converged)")


def _eigen_plot(items, out_base: Path, fmt: str) -> Path | None:
    items = [(lab, t) for lab, t in items if "eigenvalues" in t]
    if not items:
        return None
    has_bottom = any("bottom_eigenvalues" in t and len(t["bottom_eigenvalues"]) for _, t in items)
    fig, axes = figure(1, 2 if has_bottom else 1, figsize=(10 if has_bottom else 6, 4), squeeze=False)
    cols = _colors(len(items))
    off = np.linspace(-0.15, 0.15, len(items)) if len(items) > 1 else [0.0]
    for (lab, t), c, o in zip(items, cols, off):
        ev = np.asarray(t["eigenvalues"])
        _stems(axes[0, 0], np.arange(1, len(ev) + 1) + o, ev, t.get("converged"), c, lab)
        if has_bottom and "bottom_eigenvalues" in t:
            bv = np.asarray(t["bottom_eigenvalues"])
            _stems(axes[0, 1], np.arange(1, len(bv) + 1) + o, bv, t.get("bottom_converged"), c, lab, "s")
    from matplotlib.ticker import MaxNLocator

    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set(xlabel="rank from the top", ylabel="eigenvalue", title="Top Hessian eigenvalues")
    axes[0, 0].axhline(0, color="k", lw=0.6)
    if has_bottom:
        axes[0, 1].set(xlabel="rank from the bottom", ylabel="eigenvalue", title="Bottom Hessian eigenvalues")
        axes[0, 1].axhline(0, color="k", lw=0.6)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()  # the bottom panel's long tick labels would run into the top panel
    return save(fig, out_base, "eigenvalues", fmt)


def _density_plot(items, out_base: Path, fmt: str) -> Path | None:
    items = [(lab, t) for lab, t in items if isinstance(t.get("density"), dict) and "values" in t["density"]]
    if not items:
        return None
    fig, ax = figure(figsize=(7, 4.2))
    floor = np.inf
    top = 0.0
    for (lab, t), c in zip(items, _colors(len(items))):
        d = t["density"]
        g, v = np.asarray(d["grid"]), np.asarray(d["values"])
        sig = float(np.asarray(d.get("sigma", np.nan)))
        ax.semilogy(g, np.maximum(v, 1e-300), color=c, lw=1.3, label=f"{lab} (sigma {sig:.2g})")
        top = max(top, float(v.max()))
        if "eigenvalues" in t:
            ev = np.asarray(t["eigenvalues"])
            ax.plot(ev, np.full(len(ev), 0), "|", color=c, ms=10, transform=ax.get_xaxis_transform(), clip_on=False)
    floor = top * 1e-7
    ax.set_ylim(floor, top * 3)
    ax.set(
        xlabel="eigenvalue",
        ylabel="density (log scale)",
        title="Hessian spectral density (SLQ, Gaussian-broadened); ticks: top eigenvalues",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save(fig, out_base, "density", fmt)


def _per_layer_plot(items, out_base: Path, fmt: str) -> Path | None:
    items = [(lab, t) for lab, t in items if isinstance(t.get("per_layer"), dict)]
    if not items:
        return None
    names: list = []
    for _, t in items:  # the union of tensor names, in order of first appearance
        names += [nm for nm in json.loads(t["per_layer"]["names"]) if nm not in names]
    n, m = len(names), len(items)
    fig, axes = figure(1, 2, figsize=(11, max(3.0, 0.32 * n * max(1, m) + 1.2)), sharey=True)
    h = 0.8 / m
    for j, ((lab, t), c) in enumerate(zip(items, _colors(m))):
        pl = t["per_layer"]
        these = json.loads(pl["names"])
        pos = {nm: i for i, nm in enumerate(these)}
        idx = [pos.get(nm) for nm in names]
        lam = np.array([pl["lambda_max"][i] if i is not None else np.nan for i in idx], dtype=float)
        tr = np.array([pl["trace"][i] if i is not None else np.nan for i in idx], dtype=float)
        se = np.array([pl["trace_stderr"][i] if i is not None else np.nan for i in idx], dtype=float)
        y = np.arange(n) + (j - (m - 1) / 2) * h
        axes[0].barh(y, lam, height=h, color=c, label=lab)
        axes[1].barh(y, tr, height=h, color=c, xerr=se, error_kw={"lw": 0.8, "capsize": 2}, label=lab)
    axes[0].set_yticks(np.arange(n), names, fontsize=8)
    axes[0].invert_yaxis()
    axes[0].set(xlabel="top eigenvalue of the block H[b, b]", title="Per-tensor sharpness")
    axes[1].set(xlabel="trace of the block (+- 1 s.e.)", title="Per-tensor trace")
    for ax in axes:
        ax.grid(alpha=0.3, axis="x")
        ax.axvline(0, color="k", lw=0.6)
    axes[1].legend(fontsize=8)
    return save(fig, out_base, "per_layer", fmt)


@register("hessian")
def plot(items, out_base, fmt) -> list:
    out = [
        _eigen_plot(items, out_base, fmt),
        _density_plot(items, out_base, fmt),
        _per_layer_plot(items, out_base, fmt),
    ]
    return [p for p in out if p is not None]
