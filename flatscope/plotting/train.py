"""Training curves (``/train`` written by ``flatscope train --log``): loss and accuracy (train solid,
test dashed, one colour per run) and the method's scalars (gamma, tau, effective step, distances)
against effective epochs; several files overlay one curve each."""

from __future__ import annotations

import math
import re

import numpy as np

from . import figure, register, save

_SKIP = {
    "epoch",
    "grad_evals",
    "wall_time_s",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "lr",
    "rounds",
    "outer_steps",
}


@register("train")
def plot(items, out_base, fmt):
    paths = []
    fig, axes = figure(1, 2, figsize=(10, 3.8))
    for i, (label, tree) in enumerate(items):
        h = tree.get("history", {})
        ep = np.asarray(h.get("epoch", []))
        name = f"{label} ({tree.get('optimizer', '?')})"
        for key, ls in (("train", "-"), ("test", "--")):
            if f"{key}_loss" in h:
                axes[0].plot(ep, h[f"{key}_loss"], ls, color=f"C{i}", label=f"{name} {key}")
            if f"{key}_acc" in h and np.isfinite(h[f"{key}_acc"]).any():
                axes[1].plot(ep, h[f"{key}_acc"], ls, color=f"C{i}", label=f"{name} {key}")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("loss")
    axes[1].set_ylabel("accuracy")
    for ax in axes:
        ax.set_xlabel("effective epochs (gradient evaluations / batches per epoch)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    paths.append(save(fig, out_base, "curves", fmt))

    extra = sorted(
        {
            k
            for _, t in items
            for k in t.get("history", {})
            if k not in _SKIP and not re.fullmatch(r"replica_dist_\d+", k)
        }
    )
    if extra:
        cols = min(4, len(extra))
        rows = math.ceil(len(extra) / cols)
        fig, axes = figure(rows, cols, figsize=(3.4 * cols, 2.9 * rows), squeeze=False)
        for ax, key in zip(axes.flat, extra):
            for i, (label, tree) in enumerate(items):
                h = tree.get("history", {})
                if key in h:
                    ax.plot(h["epoch"], h[key], color=f"C{i}", label=label)
            ax.set_title(key)
            ax.set_xlabel("effective epochs")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(extra) :]:
            ax.set_visible(False)
        seen = {}
        for ax in axes.flat:
            for hd, lb in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(lb, hd)
        fig.tight_layout()
        fig.legend(list(seen.values()), list(seen), fontsize=7, loc="lower right")
        paths.append(save(fig, out_base, "method", fmt))
    return paths
