"""Which direction of each flatness measure means *flatter*.

A measure is a metric name ``<analysis group>.<summary key>`` (as in ``flatscope audit``). The table
below says, per summary key, whether a lower or a higher value means a flatter minimum; keys that are
not flatness measures (counts, diagnostics, signed curvature) have no direction. A pattern is matched
against the whole metric name with :func:`fnmatch.fnmatchcase`, first match wins, so an analysis added
later (``sharpness.*``) needs one line here.

- ``hessian.lambda_max``, ``lambda_k``, ``trace``: curvature; lower is flatter.
- ``local_energy.<split>_delta_loss_at_sigma_max`` / ``_delta_err_at_sigma_max``: the rise of the loss /
  error under multiplicative weight noise (Pittorino et al. 2021, "Entropic gradient descent algorithms
  and wide flat minima", arXiv:2006.07897); lower is flatter. ``<split>_target_sigma``: the noise level at
  which the error rises by epsilon; higher is flatter.
- ``landscape.<name>.<split>_loss_max``: the highest loss on the slice; lower is flatter.
  ``<split>_accuracy_min``: higher is flatter.
- ``local_entropy.entropy_gap`` (F - L(w)), ``local_entropy``, ``mean_loss``: lower is flatter;
  ``mean_sq_dist`` (the spread of the local Gibbs measure): higher is flatter.
- ``sharpness.*``: worst-case or average loss rise in a ball (Keskar et al. 2017; Foret et al. 2021);
  lower is flatter.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

FLATTER: list[tuple[str, str | None]] = [
    ("hessian.lambda_max", "lower"),
    ("hessian.lambda_k", "lower"),
    ("hessian.trace", "lower"),
    ("local_energy.*_delta_loss_at_sigma_max", "lower"),
    ("local_energy.*_delta_err_at_sigma_max", "lower"),
    ("local_energy.*_target_sigma", "higher"),
    ("landscape.*_loss_max", "lower"),
    ("landscape.*_accuracy_min", "higher"),
    ("local_entropy.entropy_gap", "lower"),
    ("local_entropy.local_entropy", "lower"),
    ("local_entropy.mean_loss", "lower"),
    ("local_entropy.mean_sq_dist", "higher"),
    ("sharpness.*_err*", None),
    ("sharpness.*stderr*", None),
    ("sharpness.*", "lower"),
]


def flatter(metric: str) -> str | None:
    """``"lower"`` or ``"higher"``: which values of ``metric`` mean flatter; None if it is no flatness measure."""
    for pattern, direction in FLATTER:
        if fnmatchcase(metric, pattern):
            return direction
    return None


def flatter_label(metric: str) -> str:
    """A short label for plots and tables: ``"lower = flatter"``, ``"higher = flatter"`` or ``""``."""
    d = flatter(metric)
    return f"{d} = flatter" if d else ""
