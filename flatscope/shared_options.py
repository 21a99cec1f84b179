"""The names of the options every command shares, in one place for the CLI and the audit.

No click here: :mod:`flatscope.cli.common` declares these options for every command, and
:mod:`flatscope.audit` passes them to each step and keys its cache on the ones that change results.
"""

from __future__ import annotations

COMMON_KEYS = ("device", "seed", "dtype", "threads", "as_json", "quiet", "verbose")
ANALYSIS_KEYS = (
    "checkpoint",
    "model",
    "model_kwargs",
    "data",
    "data_kwargs",
    "loss",
    "split",
    "batch_size",
    "max_samples",
    "out",
    "plot",
    "plot_format",
    "allow_nonfinite",
    "allow_mixed",
    "label_smoothing",
    "metric",
    "output",
    "hvp",
    "workers",
    "memory_budget",  # how work is cut, never a result: not in RESULT_DEFAULTS (nor the audit's cache key)
    "basis_device",
    "estimate",
    "shard_params",
)


# shared options a stored result depends on beyond data, loss and dtype, with their defaults;
# run attributes: label_smoothing, metric_name, output_key, hvp_mode
RESULT_DEFAULTS = {"label_smoothing": 0.0, "metric": None, "output": None, "hvp": "auto"}
_ATTR = {"label_smoothing": "label_smoothing", "metric": "metric_name", "output": "output_key", "hvp": "hvp_mode"}


def result_options(run, *, with_hvp: bool = True) -> dict:
    """The options of :data:`RESULT_DEFAULTS` that ``run`` sets to something else than the default (so
    that results written before an option existed keep matching). ``label_smoothing``, ``metric`` and
    ``output`` change the numbers; the HVP mode changes them only up to rounding (``with_hvp=False``:
    the audit's cache ignores it)."""
    keys = [k for k in RESULT_DEFAULTS if with_hvp or k != "hvp"]
    return {k: getattr(run, _ATTR[k]) for k in keys if getattr(run, _ATTR[k]) != RESULT_DEFAULTS[k]}
