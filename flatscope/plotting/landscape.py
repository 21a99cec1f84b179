"""Plots of ``landscape`` results: 1-D curves, 2-D contours and surfaces, and a ParaView ``.vtp`` export.

- 1-D (``<base>.curve``): loss (left) and accuracy (right) against the coordinate, train solid and test
  dashed, one colour per overlaid checkpoint; the checkpoint (x = 0) and, for an interpolation, the
  other checkpoints are marked.
- 2-D (``<base>.contour``): per item and split, contour lines of the loss, the filled loss contour and
  (for classification) the filled accuracy contour; the checkpoint is a star, interpolation corners are
  labelled, and a PCA slice shows the projected training path with the explained variance on the axes.
- 2-D (``<base>.surface``): the loss as a 3-D surface.
- 2-D (``<base>.vtp``): the loss surface as VTK XML PolyData (ASCII) for ParaView: points
  ``(x, y, loss)``, one quad per grid cell whose four corners are computed and finite, point arrays
  for every split's loss and accuracy, ``log10_loss`` and ``done``.

The loss uses a logarithmic colour scale when it is positive and spans more than two decades.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import figure, register, save

SPLIT_STYLE = {"train": "-", "test": "--"}


def _splits(tree: dict) -> list[str]:
    return [s for s in ("train", "test") if isinstance(tree.get(s), dict) and "loss" in tree[s]]


def _masked(tree: dict, split: str, key: str) -> np.ndarray:
    v = np.array(tree[split][key], dtype=np.float64)
    done = np.asarray(tree.get("done", np.ones(v.shape, bool)), dtype=bool)
    v[~done] = np.nan
    return v


def _has_accuracy(tree: dict) -> bool:
    return any(np.isfinite(_masked(tree, s, "accuracy")).any() for s in _splits(tree))


def _anchors(tree: dict) -> tuple[list[str], np.ndarray] | None:
    a = tree.get("anchors")
    if not isinstance(a, dict) or "coords" not in a:
        return None
    return json.loads(a["labels"]), np.asarray(a["coords"], dtype=np.float64)


def _direction_label(tree: dict, axis: int) -> str:
    d = tree.get("directions", {})
    kind = d.get("method", "") if isinstance(d, dict) else ""
    name = "xy"[axis]
    if kind == "pca" and "explained_variance_ratio" in d:
        ev = np.atleast_1d(d["explained_variance_ratio"])
        if axis < ev.size:
            return f"PC{axis + 1} ({ev[axis]:.1%} of the path's variance)"
    if kind == "hessian":
        ev = np.atleast_1d(d.get("eigenvalues", []))
        return f"eigenvector {axis + 1}" + (f" (λ={ev[axis]:.4g})" if axis < ev.size else "")
    if kind == "interp":
        return f"{name}: interpolation coordinate"
    return f"{name} (direction {axis + 1})"


def _log_scale(values: np.ndarray) -> bool:
    v = values[np.isfinite(values)]
    return v.size > 0 and v.min() > 0 and v.max() / v.min() > 100


# --------------------------------------------------------------------------------------- 1-D
def _plot_1d(items: list, out_base: Path, fmt: str) -> list[Path]:
    acc = any(_has_accuracy(t) for _, t in items)
    fig, axes = figure(1, 2 if acc else 1, figsize=(11 if acc else 6, 4.2), squeeze=False)
    ax_l, ax_a = axes[0][0], (axes[0][1] if acc else None)
    log = all(_log_scale(_masked(t, s, "loss")) for _, t in items for s in _splits(t))
    for c, (label, tree) in enumerate(items):
        color = f"C{c}"
        x = np.asarray(tree["x"], dtype=np.float64)
        for s in _splits(tree):
            lab = f"{label} {s}" if len(items) > 1 else s
            ax_l.plot(x, _masked(tree, s, "loss"), SPLIT_STYLE[s], color=color, label=lab)
            if ax_a is not None:
                ax_a.plot(x, _masked(tree, s, "accuracy"), SPLIT_STYLE[s], color=color, label=lab)
        anchors = _anchors(tree)
        if anchors:
            labels, coords = anchors
            for lab, xc in zip(labels, coords[:, 0]):
                for ax in (a for a in (ax_l, ax_a) if a is not None):
                    ax.axvline(xc, color="0.6", lw=0.8, zorder=0)
                ax_l.annotate(
                    lab,
                    (xc, 1.0),
                    xycoords=("data", "axes fraction"),
                    xytext=(2, -12),
                    textcoords="offset points",
                    fontsize=8,
                    color="0.3",
                )
        else:
            for ax in (a for a in (ax_l, ax_a) if a is not None):
                ax.axvline(0.0, color="0.6", lw=0.8, zorder=0)
    if log:
        ax_l.set_yscale("log")
    ax_l.set_xlabel(_direction_label(items[0][1], 0))
    ax_l.set_ylabel("loss")
    kind = items[0][1].get("directions", {}).get("method", "")
    ax_l.set_title(
        {
            "interp": "loss along the interpolation",
            "pca": "loss along the first principal direction",
            "hessian": "loss along the top Hessian eigenvector",
        }.get(kind, "loss along the direction")
    )
    ax_l.legend(fontsize=8)
    ax_l.grid(alpha=0.3)
    if ax_a is not None:
        ax_a.set_xlabel(_direction_label(items[0][1], 0))
        ax_a.set_ylabel("accuracy")
        ax_a.set_title("accuracy")
        ax_a.legend(fontsize=8)
        ax_a.grid(alpha=0.3)
    fig.tight_layout()
    return [save(fig, out_base, "curve", fmt)]


# --------------------------------------------------------------------------------------- 2-D
def _levels(Z: np.ndarray, n: int = 25):
    from matplotlib.colors import LogNorm, Normalize

    v = Z[np.isfinite(Z)]
    if v.size == 0:
        return None, None
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 1e-6
    if _log_scale(Z):
        return np.geomspace(lo, hi, n), LogNorm(lo, hi)
    return np.linspace(lo, hi, n), Normalize(lo, hi)


def _decorate(ax, tree: dict) -> None:
    anchors = _anchors(tree)
    if anchors:
        labels, coords = anchors
        ax.plot(coords[:, 0], coords[:, 1], "o", color="white", mec="black", ms=6, zorder=5)
        for lab, (xc, yc) in zip(labels, coords):
            ax.annotate(
                lab,
                (xc, yc),
                xytext=(4, 4),
                textcoords="offset points",
                fontsize=8,
                color="black",
                zorder=6,
                bbox=dict(boxstyle="round,pad=0.15", fc="white", alpha=0.7, lw=0),
            )
    else:
        ax.plot([0], [0], "*", color="white", mec="black", ms=11, zorder=5)
    path = tree.get("path")
    if isinstance(path, dict) and "y" in path:
        px, py = np.asarray(path["x"]), np.asarray(path["y"])
        ax.plot(px, py, "-o", color="crimson", ms=3, lw=1.2, zorder=4, label="training path")
        ax.annotate("start", (px[0], py[0]), xytext=(4, -10), textcoords="offset points", fontsize=8, color="crimson")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_xlabel(_direction_label(tree, 0), fontsize=8)
    ax.set_ylabel(_direction_label(tree, 1), fontsize=8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(5))


def _cbar_axes(ax):
    """A colorbar axes as tall as ``ax`` itself (which may be drawn with equal aspect)."""
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    return make_axes_locatable(ax).append_axes("right", size="4%", pad=0.08)


def _plot_2d(items: list, out_base: Path, fmt: str) -> list[Path]:
    rows = [(label, tree, s) for label, tree in items for s in _splits(tree)]
    acc = any(_has_accuracy(t) for _, t in items)
    ncol = 3 if acc else 2
    x0, y0 = np.asarray(rows[0][1]["x"]), np.asarray(rows[0][1]["y"])
    ratio = (float(np.ptp(y0)) or 1.0) / (float(np.ptp(x0)) or 1.0)
    height = 4.3 * min(max(ratio, 0.2), 1.0) + 1.0 if 0.2 <= ratio <= 5 else 4.3  # panels drawn to scale
    fig, axes = figure(len(rows), ncol, figsize=(5.2 * ncol, height * len(rows)), squeeze=False)
    for r, (label, tree, s) in enumerate(rows):
        x, y = np.asarray(tree["x"]), np.asarray(tree["y"])
        Z = _masked(tree, s, "loss")
        title = f"{label}: {s}" if len(items) > 1 else s
        levels, norm = _levels(Z)
        ax = axes[r][0]
        if levels is not None:
            cs = ax.contour(x, y, np.ma.masked_invalid(Z), levels=levels, norm=norm, cmap="viridis", linewidths=0.8)
            ax.clabel(cs, cs.levels[::4], fontsize=6, fmt="%.3g")
        ax.set_title(f"{title} loss, contours", fontsize=9)
        _decorate(ax, tree)
        ax = axes[r][1]
        if levels is not None:
            cf = ax.contourf(x, y, np.ma.masked_invalid(Z), levels=levels, norm=norm, cmap="viridis")
            fig.colorbar(cf, cax=_cbar_axes(ax), label="loss", format="%.3g")
        ax.set_title(f"{title} loss", fontsize=9)
        _decorate(ax, tree)
        if acc:
            ax = axes[r][2]
            A = _masked(tree, s, "accuracy")
            if np.isfinite(A).any():
                lo, hi = float(np.nanmin(A)), float(np.nanmax(A))
                cf = ax.contourf(
                    x, y, np.ma.masked_invalid(A), levels=np.linspace(lo, max(hi, lo + 1e-9), 21), cmap="magma"
                )
                fig.colorbar(cf, cax=_cbar_axes(ax), label="accuracy", format="%.3g")
            ax.set_title(f"{title} accuracy", fontsize=9)
            _decorate(ax, tree)
        # one unit of x is one unit of y (the directions are on one scale), unless that would squash a
        # panel beyond 5:1
        spans = (float(np.ptp(x)) or 1.0, float(np.ptp(y)) or 1.0)
        for ax in axes[r]:
            ax.set_aspect("equal" if max(spans) / min(spans) <= 5 else "auto", adjustable="box")
    fig.tight_layout()
    out = [save(fig, out_base, "contour", fmt)]

    fig = figure(1, len(items), figsize=(6 * len(items), 5), subplot_kw={"projection": "3d"}, squeeze=False)[0]
    for c, (label, tree) in enumerate(items):
        ax = fig.axes[c]
        s = _splits(tree)[0]
        x, y = np.asarray(tree["x"]), np.asarray(tree["y"])
        Z = _masked(tree, s, "loss")
        X, Y = np.meshgrid(x, y)
        log = _log_scale(Z)
        ax.plot_surface(
            X, Y, np.log10(Z) if log else Z, cmap="viridis", linewidth=0, antialiased=True, rstride=1, cstride=1
        )
        from matplotlib.ticker import MaxNLocator

        ax.set_xlabel(_direction_label(tree, 0), fontsize=8, labelpad=8)
        ax.set_ylabel(_direction_label(tree, 1), fontsize=8, labelpad=8)
        ax.set_zlabel(f"log10 {s} loss" if log else f"{s} loss", fontsize=8)
        for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
            axis.set_major_locator(MaxNLocator(5))
        ax.tick_params(labelsize=7)
        xs, ys = float(np.ptp(x)) or 1.0, float(np.ptp(y)) or 1.0
        ax.set_box_aspect((1.0, min(max(ys / xs, 0.2), 1.0), 0.7))  # the plane's proportions, within reason
        ax.set_title(label if len(items) > 1 else f"{s} loss surface", fontsize=9)
    fig.tight_layout()
    out.append(save(fig, out_base, "surface", fmt))
    for label, tree in items:
        suffix = f".{label}" if len(items) > 1 else ""
        out.append(write_vtp(tree, Path(f"{out_base}{suffix}.vtp")))
    return out


# --------------------------------------------------------------------------------------- VTP
def _ascii(values: np.ndarray, fmt: str = "%.9g") -> str:
    flat = np.asarray(values).ravel()
    lines = []
    for start in range(0, flat.size, 9):
        lines.append(" ".join(fmt % v for v in flat[start : start + 9]))
    return "\n".join(lines)


def write_vtp(tree: dict, path: Path) -> Path:
    """The 2-D loss surface as VTK XML PolyData (ASCII), written atomically."""
    import os

    x, y = np.asarray(tree["x"], dtype=np.float64), np.asarray(tree["y"], dtype=np.float64)
    splits = _splits(tree)
    ny, nx = len(y), len(x)
    Z = _masked(tree, splits[0], "loss")
    valid = np.isfinite(Z)
    X, Y = np.meshgrid(x, y)
    pts = np.stack([X.ravel(), Y.ravel(), np.where(valid, Z, 0.0).ravel()], axis=1)
    j, i = np.meshgrid(np.arange(ny - 1), np.arange(nx - 1), indexing="ij")
    p00 = (j * nx + i).ravel()
    quads = np.stack([p00, p00 + 1, p00 + nx + 1, p00 + nx], axis=1)
    keep = valid.ravel()[quads].all(axis=1)
    quads = quads[keep]
    offsets = 4 * np.arange(1, len(quads) + 1)
    arrays = []
    for s in splits:
        for key in ("loss", "accuracy"):
            v = _masked(tree, s, key).ravel()
            arrays.append((f"{s}_{key}", np.where(np.isfinite(v), v, 0.0)))
    with np.errstate(divide="ignore", invalid="ignore"):
        logz = np.where(valid & (Z > 0), np.log10(np.where(Z > 0, Z, 1.0)), 0.0).ravel()
    arrays.append(("log10_loss", logz))
    arrays.append(("done", valid.ravel().astype(np.float64)))
    parts = [
        '<?xml version="1.0"?>',
        '<VTKFile type="PolyData" version="0.1" byte_order="LittleEndian">',
        "  <PolyData>",
        f'    <Piece NumberOfPoints="{len(pts)}" NumberOfVerts="0" NumberOfLines="0" '
        f'NumberOfStrips="0" NumberOfPolys="{len(quads)}">',
        f'      <PointData Scalars="{splits[0]}_loss">',
    ]
    for name, v in arrays:
        parts += [f'        <DataArray type="Float64" Name="{name}" format="ascii">', _ascii(v), "        </DataArray>"]
    parts += [
        "      </PointData>",
        "      <Points>",
        '        <DataArray type="Float64" NumberOfComponents="3" format="ascii">',
        _ascii(pts),
        "        </DataArray>",
        "      </Points>",
        "      <Polys>",
        '        <DataArray type="Int64" Name="connectivity" format="ascii">',
        _ascii(quads, "%d"),
        "        </DataArray>",
        '        <DataArray type="Int64" Name="offsets" format="ascii">',
        _ascii(offsets, "%d"),
        "        </DataArray>",
        "      </Polys>",
        "    </Piece>",
        "  </PolyData>",
        "</VTKFile>",
        "",
    ]
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        tmp.write_text("\n".join(parts))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


@register("landscape")
def plot(items: list, out_base: Path, fmt: str) -> list[Path]:
    twod = [(label, tree) for label, tree in items if "y" in tree]
    oned = [(label, tree) for label, tree in items if "y" not in tree]
    out: list[Path] = []
    if oned:
        out += _plot_1d(oned, out_base, fmt)
    if twod:
        out += _plot_2d(twod, out_base, fmt)
    return out
