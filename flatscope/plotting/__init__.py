"""Plots, headless (matplotlib Agg), rendered from stored results only.

Each analysis registers one function per result ``kind`` with :func:`register`. A plot function
takes ``items``, a list of ``(label, tree)`` pairs (one per results file; several when
``flatscope plot a.h5 b.h5`` overlays checkpoints), ``out_base`` (a path without suffix) and
``fmt`` (png, svg or pdf), and returns the paths it wrote. Because plots read only the stored tree,
``flatscope plot`` re-renders everything without recomputation.

Plot modules live beside this file and are discovered automatically.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")

PlotFn = Callable[[list, Path, str], list]
_REGISTRY: dict[str, PlotFn] = {}
FORMATS = ("png", "svg", "pdf")
# What the figures being drawn are of ("mlp-sgd, train split"): set around each plot function by
# render_group/render_files, drawn by save() above every figure, so every plot names its checkpoint
# and split without each plot module having to.
_SUBJECT: dict[str, str | None] = {"text": None}


def register(kind: str):
    def deco(fn: PlotFn) -> PlotFn:
        _REGISTRY[kind] = fn
        return fn

    return deco


def _load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def plot_function(kind: str) -> PlotFn | None:
    _load_all()
    return _REGISTRY.get(kind)


def kinds() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def figure(*args, **kwargs):
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save(fig, out_base: Path, suffix: str, fmt: str) -> Path:
    """Save ``fig`` as ``<out_base>.<suffix>.<fmt>`` atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(f"{out_base}.{suffix}.{fmt}")
    tmp = path.with_name(f".tmp-{path.name}")
    if _SUBJECT["text"] and not getattr(fig, "_suptitle", None):
        fig.suptitle(_SUBJECT["text"], fontsize=10, y=1.0, va="bottom")
    try:
        fig.savefig(tmp, format=fmt, dpi=130, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path


def log_axis(ax, values) -> None:
    """A log x axis over ``values`` (σ, γ) with plain decimal labels that never overlap: at the values
    themselves when there are few and they are spread, else at 1-2-5 steps; no minor-tick labels
    (matplotlib's 2x10^-1 3x10^-1 4x10^-1 ran into one another)."""
    import numpy as np

    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    v = np.asarray(values, dtype=float).ravel()
    s = np.unique(v[np.isfinite(v) & (v > 0)])
    spaced = s.size >= 2 and np.all(np.diff(np.log10(s)) > 0.12)
    ax.xaxis.set_major_locator(
        FixedLocator(s.tolist()) if 0 < s.size <= 6 and spaced else LogLocator(subs=(1.0, 2.0, 5.0))
    )
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _label(path: str, tree: dict) -> str:
    ckpt = tree.get("checkpoint")
    return Path(ckpt).stem if isinstance(ckpt, str) and ckpt else Path(path).stem.replace(".flatscope", "")


def _split_of(tree: dict) -> str | None:
    import json

    try:
        split = json.loads(tree.get("options") or "{}").get("split")
    except (TypeError, ValueError, AttributeError):
        return None
    return {"both": "train and test splits"}.get(split, f"{split} split") if split else None


def subject(items: list) -> str:
    """'mlp-sgd, train split' (or 'mlp-sgd vs mlp-esgd, ...'): the checkpoints and split of a figure."""
    labels = list(dict.fromkeys(label for label, _ in items))
    splits = list(dict.fromkeys(s for s in (_split_of(t) for _, t in items) if s))
    who = " vs ".join(labels) if len(labels) <= 4 else f"{', '.join(labels[:3])} and {len(labels) - 3} more"
    return who + (f", {splits[0]}" if len(splits) == 1 else (", splits differ" if splits else ""))


def _draw(fn: PlotFn, items: list, out_base: Path, fmt: str) -> list:
    _SUBJECT["text"] = subject(items)
    try:
        return fn(items, out_base, fmt)
    finally:
        _SUBJECT["text"] = None


def render_group(h5path: str, name: str, fmt: str = "png") -> list[Path]:
    """Plot one analysis group of one results file, beside the file."""
    from ..results import open_results, read_tree

    with open_results(h5path) as f:
        group = f[name]
        kind = str(group.attrs["kind"])
        tree = read_tree(group)
    fn = plot_function(kind)
    if fn is None:
        return []
    base = Path(h5path)
    out_base = base.with_name(base.name[: -len(base.suffix)] if base.suffix else base.name)
    out_base = Path(f"{out_base}.{name.replace('/', '-')}")
    return _draw(fn, [(_label(h5path, tree), tree)], out_base, fmt)


def render_files(paths: list[str], fmt: str = "png", outdir: str | None = None) -> list[Path]:
    """Re-render every plot of every file; with several files, overlay groups of the same name."""
    from ..errors import FlatscopeError
    from ..results import find_analyses, open_results, read_tree

    if fmt not in FORMATS:
        raise FlatscopeError(f"unknown plot format {fmt!r}")
    if len(paths) == 1:
        with open_results(paths[0]) as f:
            names = [n for n, _ in find_analyses(f)]
        out: list[Path] = []
        for n in names:
            out += render_group(paths[0], n, fmt)
        return out
    groups: dict[str, list] = {}
    kinds_of: dict[str, str] = {}
    for p in paths:
        with open_results(p) as f:
            for n, g in find_analyses(f):
                tree = read_tree(g)
                groups.setdefault(n, []).append((_label(p, tree), tree))
                kinds_of[n] = str(g.attrs["kind"])
    folder = Path(outdir) if outdir else Path(paths[0]).parent
    if not folder.is_dir():
        raise FlatscopeError(f"plot folder {folder} does not exist")
    out = []
    for n, items in groups.items():
        fn = plot_function(kinds_of[n])
        if fn is not None:
            out += _draw(fn, items, folder / f"overlay.{n.replace('/', '-')}", fmt)
    return out
