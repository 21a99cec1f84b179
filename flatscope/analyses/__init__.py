"""Analyses: plain functions that take an :class:`flatscope.objective.Objective` (or several) and
options, and return a result object with ``to_tree()`` (for HDF5), ``summary()`` (headline
numbers) and ``to_json()``. The CLI only parses, calls, stores and plots."""


def curves_json(curves: dict) -> dict:
    """The JSON of per-split curves (objects with ``to_json()``): one split's keys at the top level with
    ``split`` naming it, or ``split`` = ``"both"`` (or the names) and one object per split."""
    if len(curves) == 1:
        ((name, c),) = curves.items()
        return {"split": name, **c.to_json()}
    out: dict = {"split": "both" if set(curves) == {"train", "test"} else ",".join(curves)}
    out.update({name: c.to_json() for name, c in curves.items()})
    return out
