"""Training methods (optimizers) for ``flatscope train``, one module each, discovered automatically.

A method is a class registered with :func:`register`. The training loop (``flatscope.training``)
builds it with ``(model, loss_fn, config)`` and calls ``step(stream)`` until the gradient budget is
spent; the method draws every minibatch it differentiates from ``stream``, which counts gradient
evaluations, so budgets are equal across methods by construction.
"""

from __future__ import annotations

import importlib
import pkgutil

_REGISTRY: dict[str, type] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def get(name: str) -> type:
    from ..errors import FlatscopeError

    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise FlatscopeError(f"unknown optimizer {name!r}; choose from {', '.join(sorted(_REGISTRY))}") from None


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)
