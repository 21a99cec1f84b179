"""HEAT: gradient descent on the heat-regularized loss, with tau scoping.

The heat regularization of the loss (García Trillos, Kaplan & Sanz-Alonso 2019, "Variational characterizations of local entropy and heat
regularization in deep learning", arXiv:1901.10082,
section 2.2) is the loss
smoothed by the heat kernel, F^H_tau(x) = (f * phi_{0,tau})(x) = E_{z ~ N(0, tau I)} f(x + z), the
solution at time tau of the heat equation started from f (the "HEAT" of Chaudhari, Oberman, Osher, Soatto & Carlier 2018, "Deep relaxation: partial differential equations
for optimizing deep neural networks", arXiv:1704.04932,
Table 1). Its gradient is the average of the loss gradient over
Gaussian perturbations of x, estimated by the average over an inner loop of L iterates
x + sqrt(tau) xi_l, each on a fresh minibatch::

    for l = 1..L:  g_l = grad f(x + sqrt(tau_k) xi_l; Xi_l)
    x <- x - eta (mean_l g_l + wd x)        (with --momentum/--nesterov)

and the variance is scoped as tau(k) = tau0 / (1 + tau1)^k, k = outer updates (García Trillos et al.
2019, section 6.5.1: broad smoothing early, the original loss late).

Budget: L gradient evaluations per outer update, one per call of :meth:`step`.
BatchNorm: the evaluations are at perturbed points and leave the running statistics alone; the
result's statistics are recomputed exactly at x over the training inputs (as for Entropy-SGD).
"""

from __future__ import annotations

import math

import torch

from . import register
from ._flat import FlatNet, Param, momentum_update, nonneg, positive, tau_at
from .base import Method


@register("heat")
class Heat(Method):
    summary = "heat-equation smoothing: x <- x - eta mean_l grad f(x + sqrt(tau) xi_l), tau scoped"
    PARAMS = {
        "inner_steps": Param(5, int, "L, perturbed gradients averaged per outer update", positive, "at least 1"),
        "tau": Param(1e-4, float, "tau0, the initial smoothing variance (sigma = sqrt(tau))", nonneg, "non-negative"),
        "tau_decay": Param(
            1e-3, float, "tau1 in tau(k) = tau0 / (1 + tau1)^k, k = outer updates", nonneg, "non-negative"
        ),
    }

    def __init__(self, model, loss_fn, config):
        super().__init__(model, loss_fn, config)
        self.net = FlatNet(model, loss_fn)
        self.x = self.net.get()
        self.gsum = torch.zeros_like(self.x)
        self.buf = torch.zeros_like(self.x)
        self.ell = 0
        self.k = 0
        self.gen = torch.Generator().manual_seed(int(config.seed) + 0x4EA7)

    @property
    def tau(self) -> float:
        return tau_at(self.p["tau"], self.p["tau_decay"], self.k)

    def step(self, stream, lr: float) -> None:
        c = self.config
        xb, yb = stream.next("inner")
        z = self.x + math.sqrt(self.tau) * self.net.randn(self.gen)
        _, g = self.net.loss_and_grad(z, xb, yb, buffers=None)
        self.gsum += g
        self.ell += 1
        if self.ell == self.p["inner_steps"]:
            G = self.gsum / self.ell
            if c.weight_decay:
                G = G + c.weight_decay * self.x
            self.x = self.x.add(momentum_update(self.buf, G, c.momentum, c.nesterov), alpha=-lr)
            self.gsum.zero_()
            self.ell = 0
            self.k += 1

    def result_model(self):
        return self.net.materialize(self.x, self.stream.X)

    def epoch_logs(self) -> dict[str, float]:
        return {"tau": self.tau, "outer_steps": self.k}

    def hparams(self) -> dict:
        c = self.config
        return dict(super().hparams(), momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay)

    def state_dict(self) -> dict:
        return {
            "x": self.x,
            "gsum": self.gsum,
            "buf": self.buf,
            "ell": self.ell,
            "k": self.k,
            "gen": self.gen.get_state(),
        }

    def load_state_dict(self, s: dict) -> None:
        self.x, self.gsum, self.buf = s["x"].clone(), s["gsum"].clone(), s["buf"].clone()
        self.ell, self.k = int(s["ell"]), int(s["k"])
        self.gen.set_state(s["gen"])
