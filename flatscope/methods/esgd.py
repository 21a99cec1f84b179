"""Entropy-SGD, as Algorithm 1 of Chaudhari et al. 2017.

Source: Chaudhari et al. 2017, "Entropy-SGD: Biasing Gradient Descent Into Wide Valleys", arXiv:1611.01838,
Algorithm 1 (restated by Chaudhari et al. 2018, arXiv:1704.04932)::

    x', mu <- x
    for l <= L:  Xi_l <- fresh minibatch
                 dx' <- grad f(x'; Xi_l) - gamma (x - x')
                 x'  <- x' - eta' dx' + sqrt(eta') eps N(0, I)
                 mu  <- (1 - alpha) mu + alpha x'
    x <- x - eta gamma (x - mu)

Conventions, and why:

- **mu update**: ``mu <- (1 - alpha) mu + alpha x'`` (weight alpha on the *new* iterate), as written
  in Algorithm 1 of Chaudhari et al. 2017 and demanded by issue 7. Pittorino et al. 2021
  (arXiv:2006.07897, Algorithm 1 line 7) write ``mu <- alpha mu + (1 - alpha) w'``
  (weight alpha on the *old* average), which is what the authors' code does with alpha = 0.75; that
  variant is this one with ``--alpha 0.25``.
- **signs**: the Langevin drift is ``grad f(x') + gamma (x' - x)`` (both papers agree), i.e. the
  gradient of ``f(x') + gamma/2 |x - x'|^2``, the exponent of the local-entropy Gibbs measure; the
  noise is ``sqrt(eta') eps N(0, I)`` as in Algorithm 1 (the authors' code uses ``eps sqrt(2 eta')``).
- **outer step**: ``x <- x - eta gamma (x - mu)``, with the factor gamma as in Chaudhari et al. 2017:
  ``gamma (x - <x'>)`` is the gradient of the local entropy (Lemma 4 of Chaudhari et al. 2018;
  eq. 3.5 of García Trillos et al. 2019, arXiv:1901.10082, with tau = 1/gamma), so this is gradient descent on the local
  entropy with step eta, and ``eta gamma`` is the *effective* outer step (the fraction of the way
  to mu). It is logged, and a warning is raised when it exceeds 1 (the update overshoots mu). Pittorino
  et al. 2021 absorb gamma into eta (``w <- w - eta (w - mu)``).
- **scoping**: gamma_t = gamma0 (1 + gamma1)^t with t the number of outer updates done; t really
  advances (the authors' PyTorch code never increments its counter, so its gamma stays gamma0).
- **momentum** (``--momentum``, ``--nesterov``) acts on the outer step only, as the authors used in
  practice; the inner loop is plain SGLD as in Algorithm 1. ``--weight-decay`` adds ``wd x'`` to the
  inner gradient. The learning-rate schedule scales eta.
- **budget**: each Langevin step is one gradient evaluation on a fresh minibatch (the outer step
  needs none), so one outer update costs L evaluations. One call of :meth:`step` is one Langevin
  step, which makes budgets exact and resumption possible in the middle of an inner loop.
- **BatchNorm**: the Langevin evaluations use batch statistics and leave the running statistics
  alone; since x itself is never evaluated during training, the result's running statistics are
  recomputed exactly at x over the training inputs whenever x is evaluated or saved (the authors'
  code likewise re-estimates them by a pass over the training set before validation).
- **data-parallel** (under torchrun): every rank draws the same minibatch (the streams are seeded
  alike), differentiates its contiguous slice of it and the slices' gradients are summed by
  all-reduce with weights n_rank / n_batch, which is the minibatch gradient up to the order of
  float summation (and, with dropout, up to the masks, which each rank draws for its slice); the noise comes from the same seeded generator on every rank, so every rank
  holds the same iterates. Models with BatchNorm are refused: in train mode a slice's batch
  statistics are not the minibatch's, so the gradient would not be the one-process gradient.
"""

from __future__ import annotations

import math

import torch

from .. import distributed
from ..errors import FlatscopeError
from . import register
from ._flat import FlatNet, Param, gamma_at, momentum_update, nonneg, positive, unit_interval
from .base import Method


def esgd_outer_update(
    x: torch.Tensor,
    mu: torch.Tensor,
    gamma: float,
    lr: float,
    buf: torch.Tensor | None = None,
    momentum: float = 0.0,
    nesterov: bool = False,
) -> torch.Tensor:
    """The outer step x - lr * (momentum-filtered) gamma (x - mu); updates ``buf`` in place."""
    g = gamma * (x - mu)
    if buf is not None:
        g = momentum_update(buf, g, momentum, nesterov)
    return x.add(g, alpha=-lr)


@register("esgd")
class EntropySGD(Method):
    summary = "Entropy-SGD (Chaudhari et al. 2017, Algorithm 1): L SGLD steps, then x <- x - eta gamma (x - mu)"
    default_lr = 10.0
    PARAMS = {
        "inner_steps": Param(
            20, int, "L, Langevin steps per outer update", positive, "at least 1", source="the papers'"
        ),
        "inner_lr": Param(0.1, float, "eta', the Langevin step size", positive, "positive", source="the papers'"),
        "noise": Param(
            1e-4,
            float,
            "eps, the Langevin noise scale: sqrt(eta') eps N(0,I)",
            nonneg,
            "non-negative",
            source="the papers'",
        ),
        "alpha": Param(
            0.75,
            float,
            "alpha, the weight of the new iterate in mu <- (1-alpha) mu + alpha x'",
            unit_interval,
            "in (0, 1]",
            source="the papers'",
        ),
        "gamma": Param(
            0.03,
            float,
            "gamma0, the initial scope (coupling of x' to x)",
            positive,
            "positive",
            source="eta*gamma0 = 0.3 with the default --lr",
        ),
        "gamma_growth": Param(
            1e-3, float, "gamma1 in gamma_t = gamma0 (1 + gamma1)^t, t = outer updates", nonneg, "non-negative"
        ),
    }

    def __init__(self, model, loss_fn, config):
        super().__init__(model, loss_fn, config)
        self.net = FlatNet(model, loss_fn)
        self.world = distributed.world_size()
        if self.world > 1 and self.net.bn_modules:
            raise FlatscopeError(
                "data-parallel esgd under torchrun needs a model without BatchNorm: each rank's "
                "slice of a minibatch would have its own batch statistics; run it in one process"
            )
        self.x = self.net.get()
        self.xp = self.x.clone()
        self.mu = self.x.clone()
        self.buf = torch.zeros_like(self.x)
        self.ell = 0  # Langevin steps done in the current inner loop
        self.t = 0  # outer updates done (the scoping counter)
        self.gen = torch.Generator().manual_seed(int(config.seed) + 0x5E6D)
        self.last = {"dist_x_mu": float("nan"), "eff_outer_step": float("nan")}

    @property
    def gamma(self) -> float:
        return gamma_at(self.p["gamma"], self.p["gamma_growth"], self.t)

    def step(self, stream, lr: float) -> None:
        p, c = self.p, self.config
        if self.ell == 0:
            self.xp.copy_(self.x)
            self.mu.copy_(self.x)
        gamma = self.gamma
        xb, yb = stream.next("inner")
        g = self._grad(xb, yb)
        if c.weight_decay:
            g = g + c.weight_decay * self.xp
        dx = g - gamma * (self.x - self.xp)
        self.xp = self.xp - p["inner_lr"] * dx
        if p["noise"]:
            self.xp = self.xp + math.sqrt(p["inner_lr"]) * p["noise"] * self.net.randn(self.gen)
        self.mu = (1 - p["alpha"]) * self.mu + p["alpha"] * self.xp
        self.ell += 1
        if self.ell == p["inner_steps"]:
            eff = lr * gamma
            if eff > 1:
                self.warn(
                    "esgd-overshoot",
                    f"effective outer step eta*gamma = {eff:.3g} > 1 at outer update {self.t}: "
                    "x overshoots mu (lower --lr or --gamma/--gamma-growth)",
                )
            self.last = {"dist_x_mu": float(torch.linalg.vector_norm(self.x - self.mu)), "eff_outer_step": eff}
            self.x = esgd_outer_update(self.x, self.mu, gamma, lr, self.buf, c.momentum, c.nesterov)
            self.t += 1
            self.ell = 0

    def _grad(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """The minibatch gradient at x'; under torchrun summed from the ranks' slices of the minibatch."""
        if self.world == 1:
            return self.net.loss_and_grad(self.xp, xb, yb, buffers=None)[1]
        lo, hi = distributed.shard_range(xb.shape[0], distributed.rank(), self.world)
        g = torch.zeros_like(self.xp)
        if hi > lo:  # the loss is a mean over the slice: weight it by the slice's share of the batch
            g = self.net.loss_and_grad(self.xp, xb[lo:hi], yb[lo:hi], buffers=None)[1] * ((hi - lo) / xb.shape[0])
        return distributed.all_reduce_sum(g)

    def result_model(self):
        return self.net.materialize(self.x, self.stream.X)

    def epoch_logs(self) -> dict[str, float]:
        return {
            "gamma": self.gamma,
            "eff_outer_step": self.last["eff_outer_step"],
            "dist_x_mu": self.last["dist_x_mu"],
            "outer_steps": self.t,
        }

    def hparams(self) -> dict:
        c = self.config
        return dict(super().hparams(), momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay)

    def state_dict(self) -> dict:
        return {
            "x": self.x,
            "xp": self.xp,
            "mu": self.mu,
            "buf": self.buf,
            "ell": self.ell,
            "t": self.t,
            "gen": self.gen.get_state(),
            "last": dict(self.last),
        }

    def load_state_dict(self, s: dict) -> None:
        self.x, self.xp, self.mu, self.buf = (s[k].clone() for k in ("x", "xp", "mu", "buf"))
        self.ell, self.t = int(s["ell"]), int(s["t"])
        self.gen.set_state(s["gen"])
        self.last = {k: float(v) for k, v in s["last"].items()}
