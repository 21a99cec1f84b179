"""Curvature during training (``/track`` written by :class:`flatscope.monitor.CurvatureMonitor` and
``flatscope train --track``): the sharpness λ_max on a log axis against the stability line 2/η (and
the optimizer's own threshold when it differs: momentum, Adam's preconditioned sharpness), the loss
of the evaluation set (and the test loss) on the same step axis, and one panel per other tracked
measure with its error bar (standard error or Lanczos residual). Several files overlay one colour each."""

from __future__ import annotations

import math

import numpy as np

from . import figure, register, save

_SHARP = ("lambda_max", "pre_lambda_max")
_BOOK = {
    "step",
    "wall_time_s",
    "cost_s",
    "hvps",
    "lr",
    "two_over_lr",
    "threshold",
    "loss",
    "acc",
    "test_loss",
    "test_acc",
}
_SUFFIX = ("_residual", "_stderr", "_converged", "_hvps")


def _col(tree: dict, key: str) -> np.ndarray | None:
    v = tree.get(key)
    return None if v is None else np.asarray(v, dtype=np.float64)


def _err(tree: dict, key: str) -> np.ndarray | None:
    for suffix in ("_stderr", "_residual"):
        e = _col(tree, key + suffix)
        if e is not None:
            return e
    return None


@register("track")
def plot(items, out_base, fmt):
    paths = []
    fig, (ax, axl) = figure(2, 1, figsize=(7.5, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for i, (label, tree) in enumerate(items):
        step = _col(tree, "step")
        if step is None:
            continue
        c = f"C{i}"
        for key, ls, text in (("lambda_max", "-", "λ_max"), ("pre_lambda_max", "-.", "λ_max(P⁻¹H)")):
            v = _col(tree, key)
            if v is not None and np.isfinite(v).any():
                ax.plot(step, v, ls, color=c, marker="o", ms=2.5, lw=1.4, label=f"{label} {text}")
        two = _col(tree, "two_over_lr")
        if two is not None and np.isfinite(two).any():
            ax.plot(step, two, ":", color=c, lw=1.2, label=f"{label} 2/η")
        thr = _col(tree, "threshold")
        if thr is not None and two is not None and np.isfinite(thr).any() and not np.allclose(thr, two, equal_nan=True):
            ax.plot(
                step,
                thr,
                "--",
                color=c,
                lw=1.0,
                alpha=0.7,
                label=f"{label} threshold" + (" (Adam)" if "pre_lambda_max" in tree else " (momentum)"),
            )
        for key, ls, text in (("loss", "-", "loss (tracked subset)"), ("test_loss", "--", "test loss")):
            v = _col(tree, key)
            if v is not None and np.isfinite(v).any():
                axl.plot(step, v, ls, color=c, lw=1.2, label=f"{label} {text}")
    ax.set_yscale("log")
    ax.set_ylabel("sharpness (Hessian eigenvalue)")
    ax.set_title("curvature during training")
    ax.legend(fontsize=7)
    axl.set_yscale("log")
    axl.set_ylabel("loss")
    axl.set_xlabel("optimizer step")
    axl.legend(fontsize=7)
    for a in (ax, axl):
        a.grid(alpha=0.3, which="both")
    fig.tight_layout()
    paths.append(save(fig, out_base, "sharpness", fmt))

    extra = []
    for _, tree in items:
        for k in tree:
            if (
                k not in _BOOK
                and k not in _SHARP
                and not k.endswith(_SUFFIX)
                and k not in extra
                and isinstance(tree[k], np.ndarray)
                and tree[k].ndim == 1
            ):
                extra.append(k)
    if extra:
        cols = min(3, len(extra))
        rows = math.ceil(len(extra) / cols)
        fig, axes = figure(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
        for a, key in zip(axes.flat, extra):
            for i, (label, tree) in enumerate(items):
                v, step = _col(tree, key), _col(tree, "step")
                if v is None or step is None:
                    continue
                e = _err(tree, key)
                a.plot(step, v, color=f"C{i}", marker="o", ms=2.5, lw=1.2, label=label)
                if e is not None and np.isfinite(e).any():
                    a.fill_between(step, v - e, v + e, color=f"C{i}", alpha=0.2, lw=0)
            a.set_title(key, fontsize=9)
            a.set_xlabel("optimizer step")
            a.grid(alpha=0.3)
        for a in list(axes.flat)[len(extra) :]:
            a.set_visible(False)
        if len(items) > 1:
            axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(save(fig, out_base, "measures", fmt))
    return paths
