"""Training curves (``/train`` written by ``flatscope train --log``): loss, accuracy and the method's
scalars (gamma, tau, distances) against effective epochs; several files overlay one curve each."""

from __future__ import annotations

import numpy as np

from . import figure, register, save

_SKIP = {"epoch", "grad_evals", "wall_time_s", "train_loss", "train_acc", "test_loss", "test_acc", "lr"}


@register("train")
def plot(items, out_base, fmt):
    paths = []
    fig, axes = figure(1, 2, figsize=(10, 3.8))
    for label, tree in items:
        h = tree.get("history", {})
        ep = np.asarray(h.get("epoch", []))
        name = f"{label} ({tree.get('optimizer', '?')})"
        for key, ls in (("train", "-"), ("test", "--")):
            if f"{key}_loss" in h:
                axes[0].plot(ep, h[f"{key}_loss"], ls, label=f"{name} {key}")
            if f"{key}_acc" in h and np.isfinite(h[f"{key}_acc"]).any():
                axes[1].plot(ep, h[f"{key}_acc"], ls, label=f"{name} {key}")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("loss")
    axes[1].set_ylabel("accuracy")
    for ax in axes:
        ax.set_xlabel("effective epochs (gradient evaluations / batches per epoch)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    paths.append(save(fig, out_base, "curves", fmt))

    extra = sorted({k for _, t in items for k in t.get("history", {}) if k not in _SKIP
                    and not k.startswith("replica_dist_")})
    if extra:
        fig, axes = figure(1, len(extra), figsize=(3.4 * len(extra), 3.2), squeeze=False)
        for ax, key in zip(axes[0], extra):
            for label, tree in items:
                h = tree.get("history", {})
                if key in h:
                    ax.plot(h["epoch"], h[key], label=label)
            ax.set_title(key)
            ax.set_xlabel("effective epochs")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(save(fig, out_base, "method", fmt))
    return paths
