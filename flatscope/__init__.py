"""flatscope: measure how flat a neural network's minimum is, and train toward flat minima."""

__version__ = "0.1.0"

from .errors import FlatscopeError  # noqa: E402,F401
