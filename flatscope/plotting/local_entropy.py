"""Plots of ``flatscope local-entropy`` results (kind ``local_entropy``).

- ``<base>.entropy``: F(gamma) and <L>_q against gamma (log x) with error bands, L(w) as a line and
  the importance-sampling estimates of F as markers (crosses where its ESS is below 100; those do not
  set the axis limits: one outside the range of the other values is drawn as a triangle at the edge of
  the panel and labelled with its value and ESS, so that an ESS = 1 estimate cannot squash the curves); beside it
  the gaps F - L(w) and <L>_q - L(w) on a log scale (symlog if a gap is not positive); the error
  bands include the estimated minibatch bias, and gammas where that bias exceeds the standard error
  are ringed in red ("minibatch bias > s.e.");
- ``<base>.distance``: <|w'-w|^2>_q against gamma (log-log) beside the prior's n/(beta gamma) (a wide
  grey band under the data, so that data equal to the prior stay visible as such), their ratio (1 where
  the loss does not constrain q), and |grad F| = gamma |w - <w'>_q| with its Monte Carlo noise floor
  (the norm that chain noise alone would give, a grey band); a |grad F| that is not above the floor by
  more than twice its standard error (:func:`at_noise_floor`) is drawn hollow and named "at noise
  floor" in the legend and the title;
- ``<base>.traces``: the stored (thinned) chain traces of L(w') at up to four couplings, one row per
  results file.

Several items (``flatscope plot a.h5 b.h5``) overlay in the first two figures.
"""

from __future__ import annotations

import numpy as np

from . import figure, log_axis, register, save

_COLORS = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7"]
ESS_RELIABLE = 100  # importance-sampling estimates with a smaller ESS are drawn as crosses, off the limits
FLOOR_Z = 2.0  # |grad F| within FLOOR_Z standard errors of its noise floor is "at noise floor"


def at_noise_floor(grad_norm, grad_norm_err, floor, z: float = FLOOR_Z) -> np.ndarray:
    """Where |grad F| is at its Monte Carlo noise floor: ``grad_norm - floor < z * grad_norm_err``.

    ``floor`` is the norm that the chains' noise alone would give (the norm of the per-coordinate
    standard errors of gamma (w - <w'>_q)); a gradient no more than ``z`` of its own standard errors
    above it is not distinguished from zero. False where the floor or the error is unknown (NaN).
    """
    g, e, f = (np.asarray(a, dtype=float) for a in (grad_norm, grad_norm_err, floor))
    known = np.isfinite(g) & np.isfinite(e) & np.isfinite(f)
    out = np.zeros(g.shape, dtype=bool)
    out[known] = g[known] - f[known] < z * e[known]
    return out


def robust_limits(core, extra, log: bool = False, margin: float = 0.08) -> tuple[float, float]:
    """Axis limits that hold every finite value of ``core`` (the estimates to read) and those of ``extra``
    (unreliable ones, such as importance sampling at ESS 1) only where they fall within the core range
    widened by 3x (linear: 3 core spans beyond it; log: 3 decades' fraction of its decades); a margin of
    ``margin`` of the span is added on both sides (in log10 on a log axis)."""
    c = np.asarray(core, dtype=float).ravel()
    x = np.asarray(extra, dtype=float).ravel()
    if log:
        c, x = c[c > 0], x[x > 0]
        c, x = np.log10(c), np.log10(x)
    c, x = c[np.isfinite(c)], x[np.isfinite(x)]
    if c.size == 0:
        c = x
    if c.size == 0:
        return (0.1, 10.0) if log else (0.0, 1.0)
    lo, hi = float(c.min()), float(c.max())
    span = hi - lo if hi > lo else max(abs(hi), 1.0) * 0.1
    ok = x[(x >= lo - 3 * span) & (x <= hi + 3 * span)]
    if ok.size:
        lo, hi = min(lo, float(ok.min())), max(hi, float(ok.max()))
        span = hi - lo if hi > lo else span
    lo, hi = lo - margin * span, hi + margin * span
    return (10.0**lo, 10.0**hi) if log else (lo, hi)


def _off_scale(ax, g, v, ess, ylim, color) -> bool:
    """Draw the values of ``v`` outside ``ylim`` as triangles at the panel's edge, each labelled with its
    value and ESS. Returns whether any was off scale."""
    lo, hi = ylim
    off = False
    for gi, vi, ei in zip(g, v, ess):
        if not np.isfinite(vi) or lo <= vi <= hi:
            continue
        off = True
        top = vi > hi
        y = hi if top else lo
        ax.plot([gi], [y], "^" if top else "v", color=color, ms=7, mfc="none", clip_on=False, zorder=5)
        ax.annotate(
            f"{vi:.3g} (ESS {ei:.0f})",
            (gi, y),
            xytext=(4, -10 if top else 4),
            textcoords="offset points",
            fontsize=6.5,
            color=color,
            annotation_clip=False,
        )
    return off


def _arr(tree, key):
    v = tree.get(key)
    return None if v is None else np.asarray(v, dtype=float)


@register("local_entropy")
def plot(items, out_base, fmt):
    paths = []
    multi = len(items) > 1

    # ---------------------------------------------------------------- F and <L> vs gamma
    fig, (ax, axg) = figure(1, 2, figsize=(11.5, 4.3))
    any_neg = False
    core: list = []
    core_gap: list = []
    shaky: list = []  # (axis-free) unreliable importance-sampling points: (color, g, F_is, ess, L0)
    for i, (label, t) in enumerate(items):
        c = _COLORS[i % len(_COLORS)]
        g = _arr(t, "gamma")
        L0 = float(t["center_loss"])
        F, Fe = _arr(t, "local_entropy"), np.nan_to_num(_arr(t, "local_entropy_err"))
        mL = _arr(t, "mean_loss")
        mLe = np.nan_to_num(_arr(t, "mean_loss_err") if "mean_loss_err" in t else _arr(t, "mean_loss_sem"))
        pre = f"{label}: " if multi else ""
        ax.plot(g, F, "-o", color=c, ms=4, label=f"{pre}F(γ) (TI)")
        ax.fill_between(g, F - Fe, F + Fe, color=c, alpha=0.2, lw=0)
        ax.plot(g, mL, "--s", color=c, ms=3, alpha=0.8, label=f"{pre}⟨L⟩_q")
        ax.fill_between(g, mL - mLe, mL + mLe, color=c, alpha=0.12, lw=0)
        ax.axhline(L0, color=c, lw=0.8, ls=":", label="L(w)" if i == 0 else None)
        axg.errorbar(g, F - L0, yerr=Fe, fmt="-o", color=c, ms=4, capsize=2, label=f"{pre}F(γ) − L(w)")
        axg.errorbar(g, mL - L0, yerr=mLe, fmt="--s", color=c, ms=3, capsize=2, alpha=0.8, label=f"{pre}⟨L⟩_q − L(w)")
        any_neg |= bool(np.any(F - L0 <= 0) or np.any(mL - L0 <= 0))
        core += [F - Fe, F + Fe, mL - mLe, mL + mLe, [L0]]
        core_gap += [F - L0, mL - L0, F - L0 + Fe, mL - L0 + mLe]
        biased = np.asarray(t.get("minibatch_biased", np.zeros(len(g), bool)), dtype=bool)
        if biased.any():
            for a, off in ((ax, 0.0), (axg, L0)):
                a.plot(
                    g[biased],
                    F[biased] - off,
                    "o",
                    ms=11,
                    mfc="none",
                    mec="red",
                    mew=1.5,
                    label="minibatch bias > s.e." if a is ax and i == 0 else None,
                )
        imp = t.get("importance")
        if isinstance(imp, dict) and "local_entropy" in imp:
            Fi, Fie, ess = (np.asarray(imp[k], dtype=float) for k in ("local_entropy", "local_entropy_err", "ess"))
            ok = ess >= ESS_RELIABLE
            core += [Fi[ok] - Fie[ok], Fi[ok] + Fie[ok]]
            core_gap += [Fi[ok] - L0]
            if (~ok).any():
                shaky.append((c, g[~ok], Fi[~ok], ess[~ok], L0))
            for a, off in ((ax, 0.0), (axg, L0)):
                if ok.any():
                    a.errorbar(
                        g[ok],
                        Fi[ok] - off,
                        yerr=Fie[ok],
                        fmt="D",
                        color=c,
                        ms=5,
                        capsize=2,
                        mfc="white",
                        label="F by importance sampling (ESS ≥ 100)" if a is ax and i == 0 else None,
                    )
                if (~ok).any():
                    a.plot(
                        g[~ok],
                        Fi[~ok] - off,
                        "x",
                        color=c,
                        ms=6,
                        label="F by importance sampling (ESS < 100: unreliable)" if a is ax and i == 0 else None,
                    )
    t0 = items[0][1]
    for a in (ax, axg):
        a.set_xscale("log")
        log_axis(a, np.concatenate([np.asarray(t["gamma"], dtype=float) for _, t in items]))
        a.set_xlabel("coupling γ (scope 1/γ)")
        a.grid(True, which="both", alpha=0.3)
    ax.set_ylabel("loss")
    axg.set_ylabel("gap to L(w)")
    if any_neg:
        axg.set_yscale(
            "symlog",
            linthresh=max(1e-8, float(np.nanmin(np.abs(_arr(t0, "local_entropy") - float(t0["center_loss"])))) or 1e-8),
        )
    else:
        axg.set_yscale("log")
    extra = [v for *_, v_is, _, _ in shaky for v in [v_is]]
    ylim = robust_limits(np.concatenate(core), np.concatenate(extra) if extra else [])
    ax.set_ylim(*ylim)
    if not any_neg:
        extra_gap = [v_is - L0 for *_, v_is, _, L0 in shaky]
        ylim_gap = robust_limits(np.concatenate(core_gap), np.concatenate(extra_gap) if extra_gap else [], log=True)
        axg.set_ylim(*ylim_gap)
    for c, g_s, v_s, e_s, L0 in shaky:
        _off_scale(ax, g_s, v_s, e_s, ax.get_ylim(), c)
        if not any_neg:
            _off_scale(axg, g_s, v_s - L0, e_s, axg.get_ylim(), c)
    ax.set_title(f"local entropy, β={float(t0['beta']):.3g}, {t0.get('sampler', '')}")
    axg.set_title("gaps (log scale): F − L(w) and ⟨L⟩_q − L(w)")
    ax.legend(fontsize=7)
    axg.legend(fontsize=7)
    paths.append(save(fig, out_base, "entropy", fmt))

    # ---------------------------------------------------------------- <|d|^2> and |grad F| vs gamma
    fig, (a1, a3, a2) = figure(1, 3, figsize=(15.0, 4.0))
    n_floor = n_points = 0
    for i, (label, t) in enumerate(items):
        c = _COLORS[i % len(_COLORS)]
        g = _arr(t, "gamma")
        pre = f"{label}: " if multi else ""
        sq = _arr(t, "mean_sq_dist")
        sqe = _arr(t, "mean_sq_dist_err") if "mean_sq_dist_err" in t else _arr(t, "mean_sq_dist_sem")
        n, beta = float(t["n_params"]), float(t["beta"])
        gg = np.geomspace(g.min(), g.max(), 50)
        # the prior under the data as a wide translucent band: data equal to it stay visible on top of it
        a1.plot(
            gg,
            n / (beta * gg),
            "-",
            color="gray" if not multi else c,
            lw=7,
            alpha=0.25,
            solid_capstyle="butt",
            zorder=1,
            label=f"{pre}prior n/(βγ)",
        )
        a1.errorbar(g, sq, yerr=sqe, fmt="-o", color=c, ms=4, lw=1, capsize=2, zorder=3, label=f"{pre}⟨‖w'−w‖²⟩_q")
        prior = n / (beta * g)
        a3.errorbar(g, sq / prior, yerr=sqe / prior, fmt="-o", color=c, ms=4, capsize=2, zorder=3, label=f"{pre}ratio")
        gn, gne, floor = _arr(t, "grad_norm"), _arr(t, "grad_norm_err"), _arr(t, "grad_noise_floor")
        if floor is not None and np.any(np.isfinite(floor)):
            a2.plot(
                g,
                floor,
                "-",
                color="gray" if not multi else c,
                lw=7,
                alpha=0.25,
                solid_capstyle="butt",
                zorder=1,
                label=f"{pre}Monte Carlo noise floor",
            )
        flat = at_noise_floor(gn, gne, floor) if floor is not None and gne is not None else np.zeros(len(g), bool)
        n_floor += int(flat.sum())
        n_points += len(g)
        a2.errorbar(g, gn, yerr=gne, fmt="-", color=c, lw=1, capsize=2, zorder=3, label=f"{pre}|∇F| = γ|w−⟨w'⟩|")
        if (~flat).any():
            a2.plot(g[~flat], gn[~flat], "o", color=c, ms=4, zorder=4)
        if flat.any():
            a2.plot(
                g[flat],
                gn[flat],
                "o",
                ms=6,
                mfc="white",
                mec=c,
                mew=1.3,
                zorder=4,
                label=f"{pre}at noise floor (< {FLOOR_Z:g} s.e. above it)",
            )
    a3.axhline(1.0, color="gray", lw=7, alpha=0.25, zorder=1, label="1: the prior")
    for a in (a1, a2, a3):
        a.set_xscale("log")
        log_axis(a, np.concatenate([np.asarray(t["gamma"], dtype=float) for _, t in items]))
        a.set_xlabel("coupling γ")
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=7)
    a1.set_yscale("log")
    a2.set_yscale("log")
    a1.set_ylabel("squared distance")
    a3.set_ylabel("⟨‖w'−w‖²⟩_q / (n/(βγ))")
    a2.set_ylabel("gradient norm")
    a1.set_title("spread of q_γ around w")
    a3.set_title("spread relative to the prior (1 = unconstrained)")
    if n_floor == n_points and n_points:
        a2.set_title("local-entropy gradient: at noise floor at every γ")
    elif n_floor:
        a2.set_title(f"local-entropy gradient: at noise floor at {n_floor} of {n_points} γ")
    else:
        a2.set_title("local-entropy gradient (above its noise floor)")
    fig.tight_layout()
    paths.append(save(fig, out_base, "distance", fmt))

    # ---------------------------------------------------------------- chain traces
    rows = len(items)
    ncol = min(4, max(len(_arr(t, "gamma")) for _, t in items))
    fig, axes = figure(rows, ncol, figsize=(3.3 * ncol, 2.8 * rows), squeeze=False)
    for r, (label, t) in enumerate(items):
        tr = t.get("traces") or {}
        loss = np.asarray(tr["loss"]) if "loss" in tr else None
        steps = np.asarray(tr["step"]) if "step" in tr else None
        g = _arr(t, "gamma")
        pick = np.unique(np.linspace(0, len(g) - 1, min(ncol, len(g))).round().astype(int))
        for j in range(ncol):
            ax = axes[r][j]
            if loss is None or j >= len(pick):
                ax.set_visible(False)
                continue
            k = pick[j]
            for ch in range(loss.shape[1]):
                ax.plot(steps, loss[k, ch], lw=0.7, alpha=0.8)
            ax.axhline(float(t["mean_loss"][k]), color="k", lw=0.8, ls="--")
            ax.set_title(f"{label + ': ' if multi else ''}γ={g[k]:.3g}  R̂={float(t['rhat'][k]):.3f}", fontsize=8)
            ax.set_xlabel("step", fontsize=8)
            if j == 0:
                ax.set_ylabel("L(w') per chain", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    paths.append(save(fig, out_base, "traces", fmt))
    return paths
