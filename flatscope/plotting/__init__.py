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
    try:
        fig.savefig(tmp, format=fmt, dpi=130, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path


def _label(path: str, tree: dict) -> str:
    ckpt = tree.get("checkpoint")
    return Path(ckpt).stem if isinstance(ckpt, str) and ckpt else Path(path).stem.replace(".flatscope", "")


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
    return fn([(_label(h5path, tree), tree)], out_base, fmt)


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
            out += fn(items, folder / f"overlay.{n.replace('/', '-')}", fmt)
    return out
