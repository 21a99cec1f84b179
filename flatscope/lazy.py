"""A module imported on first attribute access (so that ``--help`` and usage errors need no torch)."""

from __future__ import annotations

import importlib
from types import ModuleType


class _LazyModule:
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<module {self._name!r}, imported on first use>"


def lazy_module(name: str) -> ModuleType:
    """``name`` as a module object whose import waits for the first attribute access."""
    return _LazyModule(name)  # type: ignore[return-value]
