"""Rank correlations of a measure with the generalization gap across a family of models.

For n models with measure values x_i and gaps y_i (Jiang et al. 2019, "Fantastic Generalization
Measures and Where to Find Them", arXiv:1912.02178, section 2):

- Kendall's tau (the tau-b of ties): over the n(n-1)/2 pairs,
  tau = sum_{i<j} sign(x_i - x_j) sign(y_i - y_j) / sqrt((n0 - n_x)(n0 - n_y)), with n0 = n(n-1)/2 and
  n_x, n_y the pairs tied in x, in y. Without ties it is (concordant - discordant) / n0.
- Spearman's rho: the Pearson correlation of the (mid-)ranks of x and of y.
- The granulated Kendall coefficient (Jiang et al., eq. 4-5): for hyperparameter axis i, group the
  models that agree on every other hyperparameter; psi_i is the mean over those groups of Kendall's
  tau within the group (the measure's ranking when only axis i changes). Psi = (1/k) sum_i psi_i over
  the k axes. A group of fewer than two models, or one whose tau is undefined (all tied), is left out.
- Bootstrap confidence intervals: the percentile interval of the statistic over ``resamples``
  resamples of the n models drawn with replacement (Efron & Tibshirani 1993), from a seeded generator.

A positive coefficient means a larger measure goes with a larger gap. Plain numpy; scipy only ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata

from .errors import FlatscopeError


def _pair_signs(v: np.ndarray) -> np.ndarray:
    """sign(v_i - v_j) for every pair, along the last axis: (..., n) -> (..., n, n)."""
    return np.sign(v[..., :, None] - v[..., None, :])


def kendall_tau(x, y) -> float:
    """Kendall's tau-b of ``x`` and ``y`` (NaN when either is constant or n < 2)."""
    return float(_kendall_rows(np.asarray(x, float)[None], np.asarray(y, float)[None])[0])


def _kendall_rows(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """tau-b of each row pair of X and Y (shape (B, n))."""
    n = X.shape[-1]
    if n < 2:
        return np.full(X.shape[0], math.nan)
    sx, sy = _pair_signs(X), _pair_signs(Y)
    iu = np.triu_indices(n, 1)
    sx, sy = sx[:, iu[0], iu[1]], sy[:, iu[0], iu[1]]
    num = (sx * sy).sum(axis=1)
    den = np.sqrt(np.abs(sx).sum(axis=1) * np.abs(sy).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), math.nan)


def spearman_rho(x, y) -> float:
    """Spearman's rho: the Pearson correlation of the mid-ranks (NaN when either is constant)."""
    return float(_spearman_rows(np.asarray(x, float)[None], np.asarray(y, float)[None])[0])


def _spearman_rows(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    rx, ry = rankdata(X, axis=1), rankdata(Y, axis=1)
    rx = rx - rx.mean(axis=1, keepdims=True)
    ry = ry - ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(axis=1) / np.where(den > 0, den, 1), math.nan)


STATISTICS = {"kendall": _kendall_rows, "spearman": _spearman_rows}


def bootstrap_ci(
    x, y, statistic: str = "kendall", *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, np.ndarray]:
    """Percentile bootstrap interval (lo, hi) of the statistic, and the resampled values (NaNs dropped)."""
    if statistic not in STATISTICS:
        raise FlatscopeError(f"unknown statistic {statistic!r}; choose {', '.join(STATISTICS)}")
    if not 0 < level < 1:
        raise FlatscopeError(f"confidence level must be in (0, 1), got {level:g}")
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    vals = []
    fn = STATISTICS[statistic]
    chunk = max(1, 4_000_000 // max(n * n, 1))
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        vals.append(fn(x[idx], y[idx]))
    v = np.concatenate(vals) if vals else np.zeros(0)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, v
    a = (1 - level) / 2
    return float(np.quantile(v, a)), float(np.quantile(v, 1 - a)), v


def granulated_kendall(x, y, axes: dict[str, list], fixed: dict[str, list] | None = None) -> dict:
    """Jiang et al.'s psi_i for each axis and their mean Psi.

    ``axes`` maps each hyperparameter axis name to the n models' values on it (any JSON values).
    Models are grouped by their values on every *other* axis and on each ``fixed`` column (a variable
    that is no axis but must be equal within a group, e.g. the seed); returns ``{"psi": {axis: psi_i},
    "groups": {axis: groups used}, "Psi": mean psi_i over axes with at least one group}``.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    names = list(axes)
    cols = {a: [_key(v) for v in vals] for a, vals in {**(fixed or {}), **axes}.items()}
    psi, used = {}, {}
    for a in names:
        others = [b for b in cols if b != a]
        groups: dict[tuple, list[int]] = {}
        for i in range(len(x)):
            groups.setdefault(tuple(cols[b][i] for b in others), []).append(i)
        taus = []
        for members in groups.values():
            if len({cols[a][i] for i in members}) < 2:
                continue
            t = kendall_tau(x[members], y[members])
            if math.isfinite(t):
                taus.append(t)
        psi[a] = float(np.mean(taus)) if taus else math.nan
        used[a] = len(taus)
    finite = [v for v in psi.values() if math.isfinite(v)]
    return {"psi": psi, "groups": used, "Psi": float(np.mean(finite)) if finite else math.nan}


def _key(v):
    if isinstance(v, float):
        return round(v, 12)
    if isinstance(v, (list, tuple)):
        return tuple(_key(u) for u in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _key(u)) for k, u in v.items()))
    return v


@dataclass
class MeasureCorrelation:
    """The rank correlations of one measure with the gap over the models where both are finite."""

    measure: str
    n: int
    kendall: float
    kendall_ci: tuple
    spearman: float
    spearman_ci: tuple
    psi: dict = field(default_factory=dict)
    psi_groups: dict = field(default_factory=dict)
    Psi: float = math.nan
    flatter: str | None = None

    def to_json(self) -> dict:
        return {
            "measure": self.measure,
            "n": self.n,
            "kendall": self.kendall,
            "kendall_ci": list(self.kendall_ci),
            "spearman": self.spearman,
            "spearman_ci": list(self.spearman_ci),
            "psi": self.psi,
            "psi_groups": self.psi_groups,
            "Psi": self.Psi,
            "flatter": self.flatter,
        }

    @property
    def significant(self) -> bool:
        """Whether the Kendall interval excludes 0."""
        lo, hi = self.kendall_ci
        return bool(math.isfinite(lo) and (lo > 0 or hi < 0))


def correlate_measure(
    name: str,
    values,
    gap,
    axes: dict[str, list],
    *,
    fixed: dict[str, list] | None = None,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    flatter: str | None = None,
) -> MeasureCorrelation:
    """Kendall, Spearman (with bootstrap CIs) and the granulated Kendall of one measure with the gap."""
    v, g = np.asarray(values, float), np.asarray(gap, float)
    ok = np.isfinite(v) & np.isfinite(g)
    v, g = v[ok], g[ok]
    keep = np.flatnonzero(ok)
    ax = {a: [vals[i] for i in keep] for a, vals in axes.items()}
    fx = {a: [vals[i] for i in keep] for a, vals in (fixed or {}).items()}
    kt, sp = kendall_tau(v, g), spearman_rho(v, g)
    klo, khi, _ = bootstrap_ci(v, g, "kendall", resamples=resamples, level=level, seed=seed)
    slo, shi, _ = bootstrap_ci(v, g, "spearman", resamples=resamples, level=level, seed=seed)
    gk = granulated_kendall(v, g, ax, fx) if ax else {"psi": {}, "groups": {}, "Psi": math.nan}
    psi: dict = gk["psi"]  # type: ignore[assignment]
    groups: dict = gk["groups"]  # type: ignore[assignment]
    Psi = float(gk["Psi"])  # type: ignore[arg-type]
    return MeasureCorrelation(name, int(ok.sum()), kt, (klo, khi), sp, (slo, shi), psi, groups, Psi, flatter)


# ------------------------------------------------------------------------------------------- the gap
QUANTITIES = tuple(f"{s}_{q}" for s in ("train", "test") for q in ("error", "loss", "acc"))


def parse_gap(text: str) -> list[tuple[int, str]]:
    """``"test_error-train_error"`` -> [(+1, "test_error"), (-1, "train_error")]; one quantity or a difference."""
    t = str(text).replace(" ", "")
    parts = t.split("-")
    if not t or len(parts) > 2 or not all(parts):
        raise FlatscopeError(
            f"--gap {text!r}: expected QUANTITY or QUANTITY-QUANTITY, e.g. test_error-train_error "
            f"(quantities: {', '.join(QUANTITIES)})"
        )
    for p in parts:
        if p not in QUANTITIES:
            raise FlatscopeError(f"--gap {text!r}: unknown quantity {p!r} (quantities: {', '.join(QUANTITIES)})")
    return [(1, parts[0])] + ([(-1, parts[1])] if len(parts) == 2 else [])


def gap_value(terms: list[tuple[int, str]], q: dict) -> float:
    """The gap from the quantities ``q`` (``{"train_loss": ..., "train_error": ..., ...}``)."""
    return float(sum(sign * q[name] for sign, name in terms))


# ------------------------------------------------------------------------------------------- the axes
AXIS_ORDER = ("optimizer", "lr", "batch_size", "width", "seed")


def axes_of(train: dict, model_spec: dict | None) -> dict:
    """A checkpoint's hyperparameters, from its training record (``flatscope train``'s): the record's
    ``axes`` dict when it has one (``benchmarks/make_family.py`` writes it), else optimizer, lr,
    batch_size and seed from the record plus ``model.<kwarg>`` for each model keyword argument."""
    train = train or {}
    if isinstance(train.get("axes"), dict):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in train["axes"].items()}
    out: dict = {}
    if train.get("optimizer") is not None:
        out["optimizer"] = train["optimizer"]
    lr = (train.get("hparams") or {}).get("lr", (train.get("config") or {}).get("lr"))
    if lr is not None:
        out["lr"] = lr
    for k in ("batch_size", "seed"):
        if train.get(k) is not None:
            out[k] = train[k]
    for k, v in ((model_spec or {}).get("kwargs") or {}).items():
        if k not in ("in_features", "out_features"):
            out[f"model.{k}"] = v
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def varying_axes(per_model: list[dict]) -> list[str]:
    """The axes on which the models differ (seed last), known for every model. An axis that splits the
    models exactly as an earlier one does (``model.channels`` beside ``width``) is the same axis under
    another name and is left out (the seed is always kept)."""
    names = [k for k in dict.fromkeys(k for m in per_model for k in m) if all(k in m for m in per_model)]
    vary = [k for k in names if len({repr(_key(m[k])) for m in per_model}) > 1]
    order = {k: i for i, k in enumerate(AXIS_ORDER)}
    vary.sort(key=lambda k: (k == "seed", order.get(k, len(order)), k))
    out, seen = [], set()
    for k in vary:
        codes: dict = {}
        part = tuple(codes.setdefault(repr(_key(m[k])), len(codes)) for m in per_model)
        if k == "seed" or part not in seen:
            seen.add(part)
            out.append(k)
    return out
