"""Shared machinery of the methods that work on flat parameter vectors.

:class:`FlatNet` evaluates the training loss and its gradient at any flat vector ``w`` on a
minibatch (torch.func ``functional_call``), with an explicit choice of the BatchNorm buffers the
forward pass may update. Every training evaluation runs the model in train mode (BatchNorm uses
the minibatch's statistics, dropout is on), so all methods optimize the same train-mode loss; the
*running* statistics only matter for evaluation, and each method states which evaluations update
them (see ``BN policy`` in the README's ``flatscope train`` section).

Also here: scoping schedules, the heavy-ball/Nesterov momentum update used by every flat method
(torch.optim.SGD's convention, dampening 0), parameter re-initialization and the exact BatchNorm
statistics at a point.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from ..sources import Source, to_device, tree_len, tree_map

from ..errors import FlatscopeError
from ..objective import call_model, run_module
from ..params import ParamLayout


# ---------------------------------------------------------------------------- hyperparameters
@dataclass(frozen=True)
class Param:
    """A method hyperparameter: default, type, validity check and help text (for ``--help``)."""

    default: Any
    type: type
    help: str
    check: Callable[[Any], bool] | None = None
    rule: str = ""  # what ``check`` demands, for the error message
    choices: tuple = ()
    source: str = ""  # where the default comes from, e.g. "the papers'" or "paper: 30"

    def describe(self) -> str:
        if self.type is bool:
            return self.help
        src = f", {self.source}" if self.source else ""
        return f"{self.help} (default {self.default}{src})"


def positive(v) -> bool:
    return v > 0


def nonneg(v) -> bool:
    return v >= 0


def unit_interval(v) -> bool:
    return 0 < v <= 1


def resolve_params(method: str, spec: dict[str, Param], given: dict) -> dict:
    """Method hyperparameters from ``given`` (TrainConfig.extra) over defaults, validated."""
    unknown = sorted(set(given) - set(spec))
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise FlatscopeError(f"{flags} does not apply to --opt {method}")
    out = {}
    for name, p in spec.items():
        v = given.get(name, p.default)
        flag = "--" + name.replace("_", "-")
        if p.type is bool:
            v = bool(v)
        else:
            try:
                v = p.type(v)
            except (TypeError, ValueError):
                raise FlatscopeError(f"{flag} must be a {p.type.__name__}, got {v!r}") from None
        if p.choices and v not in p.choices:
            raise FlatscopeError(f"{flag} must be one of {', '.join(p.choices)}, got {v!r}")
        if p.type is float and not math.isfinite(v):
            raise FlatscopeError(f"{flag} must be finite, got {v}")
        if p.check is not None and not p.check(v):
            raise FlatscopeError(f"{flag} must be {p.rule}, got {v}")
        out[name] = v
    return out


# ---------------------------------------------------------------------------- schedules
def gamma_at(gamma0: float, gamma1: float, t: int) -> float:
    """Scoping of the coupling: gamma_t = gamma0 (1 + gamma1)^t (Chaudhari et al. 2017, arXiv:1611.01838; t = outer updates)."""
    return gamma0 * (1.0 + gamma1) ** t


def tau_at(tau0: float, tau1: float, k: int) -> float:
    """Scoping of the variance: tau(k) = tau0 / (1 + tau1)^k (García Trillos et al. 2019, arXiv:1901.10082, section 6.5.1)."""
    return tau0 / (1.0 + tau1) ** k


def momentum_update(buf: torch.Tensor, g: torch.Tensor, momentum: float, nesterov: bool) -> torch.Tensor:
    """torch.optim.SGD's momentum (dampening 0): buf <- m buf + g; returns the step direction.

    ``buf`` starts at zero, which gives torch's first step ``buf = g`` exactly.
    """
    if momentum == 0:
        return g
    buf.mul_(momentum).add_(g)
    return g.add(buf, alpha=momentum) if nesterov else buf


# ---------------------------------------------------------------------------- the network
class FlatNet:
    """Loss and gradient of ``model`` at flat parameter vectors, on minibatches, in train mode."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable):
        self.model = model
        self.loss_fn = loss_fn
        self.layout = ParamLayout.of(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        named = dict(model.named_parameters())
        if [named[n] for n in self.layout.names] != self.params:
            raise FlatscopeError("the model's parameters() and named_parameters() orders differ")
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.bn_modules = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    @property
    def dim(self) -> int:
        return self.layout.size

    def get(self) -> torch.Tensor:
        """The model's current parameters as a new flat vector."""
        return torch.cat([p.detach().reshape(-1) for p in self.params]).clone()

    @torch.no_grad()
    def set(self, w: torch.Tensor) -> None:
        """Write the flat vector ``w`` into the model's parameters."""
        for p, part in zip(self.params, torch.split(w, self.layout.numels)):
            p.copy_(part.reshape(p.shape))

    def buffers(self) -> dict[str, torch.Tensor]:
        """The model's own buffers (live: a forward in train mode updates them)."""
        return dict(self.model.named_buffers())

    def buffer_copy(self) -> dict[str, torch.Tensor]:
        return {n: b.detach().clone() for n, b in self.model.named_buffers()}

    def randn(self, gen: torch.Generator, shape=None) -> torch.Tensor:
        """Standard normal draws from the CPU generator ``gen`` (device independent, resumable)."""
        shape = (self.dim,) if shape is None else shape
        return torch.randn(shape, generator=gen, dtype=self.dtype).to(self.device)

    def _loss(self, w, buffers, xb, yb):
        params = self.layout.unflatten(w)
        return self.loss_fn(lambda x: call_model(self.model, (params, buffers), x), xb, yb)

    def loss_and_grad(self, w: torch.Tensor, xb, yb, buffers: dict | None) -> tuple[float, torch.Tensor]:
        """Minibatch loss and gradient at ``w``.

        ``buffers`` is the buffer dict the forward pass uses and (BatchNorm in train mode) updates:
        pass :meth:`buffers` to update the model's running statistics, a copy to leave them alone.
        """
        bufs = self.buffer_copy() if buffers is None else buffers
        with torch.enable_grad():
            w = w.detach().requires_grad_(True)
            loss = self._loss(w, bufs, xb, yb)
            (g,) = torch.autograd.grad(loss, w)
        return float(loss.detach()), g

    @torch.no_grad()
    def loss_at(self, w: torch.Tensor, xb, yb) -> float:
        """Minibatch loss at ``w`` (train mode, running statistics untouched): a forward evaluation."""
        return float(self._loss(w, self.buffer_copy(), xb, yb))

    @torch.no_grad()
    def exact_bn_buffers(self, w: torch.Tensor, X: torch.Tensor, chunk: int = 4096) -> dict[str, torch.Tensor]:
        """Buffers whose BatchNorm statistics are those of the training inputs ``X`` at ``w``.

        Running statistics are reset and re-estimated as torch's cumulative average
        (``momentum=None``) over chunks of ``chunk`` rows (one chunk, i.e. the exact mean and unbiased
        variance, when ``X`` has at most ``chunk`` rows), with only the BatchNorm layers in train
        mode (dropout off). Deterministic, and it never touches the training state or any RNG.
        """
        m = copy.deepcopy(self.model)
        for p, part in zip([p for p in m.parameters() if p.requires_grad], torch.split(w, self.layout.numels)):
            p.copy_(part.reshape(p.shape))
        m.eval()
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.reset_running_stats()
                mod.momentum = None
                mod.train()
        if isinstance(X, Source):
            for xb, _ in X.batches(chunk):
                run_module(m, to_device(xb, self.device, self.dtype))
        else:
            for start in range(0, tree_len(X), chunk):
                run_module(m, tree_map(lambda t: t[start : start + chunk], X))
        return {n: b.detach().clone() for n, b in m.named_buffers()}

    @torch.no_grad()
    def materialize(self, w: torch.Tensor, X: torch.Tensor) -> torch.nn.Module:
        """The model with weights ``w`` and, if it has BatchNorm, statistics recomputed exactly at ``w``
        over the training inputs ``X`` (the result of the single-point methods)."""
        self.set(w)
        if self.bn_modules:
            self.load_buffers(self.exact_bn_buffers(w, X))
        return self.model

    def load_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        for n, b in self.model.named_buffers():
            b.copy_(buffers[n])


def reinitialized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``model`` whose submodules' ``reset_parameters()`` ran, in order, under ``seed``.

    For the built-in models this draws exactly what building the model after
    ``torch.manual_seed(seed)`` draws (modules are registered in construction order). The global
    RNG is left as it was.
    """
    m = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for mod in m.modules():
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
    return m
