"""Flat parameter vectors and the layout that maps them back to named tensors.

Every analysis works on one flat vector ``w`` holding the model's trainable parameters in
``named_parameters()`` order. :class:`ParamLayout` records names and shapes so that a vector
(an eigenvector, a landscape direction) can be unflattened, stored with its layout and checked
against another checkpoint's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import FlatscopeError


@dataclass(frozen=True)
class ParamLayout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ParamLayout":
        items = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
        if not items:
            raise FlatscopeError("the model has no trainable parameters")
        return cls(tuple(n for n, _ in items), tuple(s for _, s in items))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.numels)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for n in self.numels:
            out.append(acc)
            acc += n
        return tuple(out)

    def slices(self) -> dict[str, slice]:
        return {name: slice(o, o + n) for name, o, n in zip(self.names, self.offsets, self.numels)}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``w`` (shape ``(..., size)``) as named tensors; works under torch.func transforms."""
        parts = torch.split(w, self.numels, dim=-1)
        lead = w.shape[:-1]
        return {n: p.reshape(tuple(lead) + tuple(s)) for n, p, s in zip(self.names, parts, self.shapes)}

    def mask(self, which: str = "all") -> torch.Tensor:
        """Boolean mask over the flat vector: ``all``, ``weights`` (tensors of 2+ dims) or a name regex."""
        if which == "all":
            keep = [True] * len(self.names)
        elif which == "weights":
            keep = [len(s) >= 2 for s in self.shapes]
        else:
            try:
                rx = re.compile(which)
            except re.error as exc:
                raise FlatscopeError(f"bad parameter regex {which!r}: {exc}") from None
            keep = [bool(rx.search(n)) for n in self.names]
        if not any(keep):
            raise FlatscopeError(f"no parameter matches {which!r}; names are {', '.join(self.names[:6])}...")
        return torch.cat([torch.full((n,), k, dtype=torch.bool) for n, k in zip(self.numels, keep)])

    def to_attrs(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_attrs(cls, d: dict) -> "ParamLayout":
        return cls(tuple(str(n) for n in d["names"]), tuple(tuple(int(x) for x in s) for s in d["shapes"]))

    def check_same(self, other: "ParamLayout", what: str = "directions") -> None:
        """Raise a clear error naming the first mismatch between two layouts."""
        for i, (a, b) in enumerate(zip(self.names, other.names)):
            if a != b:
                raise FlatscopeError(f"{what}: parameter {i} is {b!r} there but {a!r} here")
            if self.shapes[i] != other.shapes[i]:
                raise FlatscopeError(
                    f"{what}: parameter {a!r} has shape {list(other.shapes[i])} there but {list(self.shapes[i])} here"
                )
        if len(self.names) != len(other.names):
            raise FlatscopeError(f"{what}: {len(other.names)} parameter tensors there, {len(self.names)} here")
