"""Sharpness-Aware Minimization (Foret et al. 2021), and its adaptive variant ASAM (Kwon et al. 2021).

The modern peer of the entropic methods: on a minibatch, ascend to the worst point of a ball of
radius rho, then descend with the gradient taken there::

    g  = grad f(w; Xi)
    e  = rho g / |g|                       (SAM)
    e  = rho T^2 g / |T g|, T = |w| + 0.01 (ASAM, --adaptive: the ball is scaled elementwise by |w|)
    w <- SGD-with-momentum step along grad f(w + e; Xi) (+ wd w)

Budget: two gradient evaluations per step (the second, at the ascent point, is counted as
``extra``); both on the same minibatch, so the data advance by one batch per step.

BatchNorm: the first (unperturbed) pass updates the running statistics, the pass at the ascent
point does not (the usual SAM practice: the perturbed weights are not the model's).
"""

from __future__ import annotations

import torch

from . import register
from ._flat import FlatNet, Param, momentum_update, nonneg
from .base import Method

ASAM_ETA = 0.01


def sam_perturbation(w: torch.Tensor, g: torch.Tensor, rho: float, adaptive: bool) -> torch.Tensor:
    """The ascent step e of SAM (or ASAM with ``adaptive``) for weights ``w`` and gradient ``g``."""
    if adaptive:
        T = w.abs() + ASAM_ETA
        n = torch.linalg.vector_norm(T * g)
        return rho * T * T * g / n.clamp_min(1e-12)
    return rho * g / torch.linalg.vector_norm(g).clamp_min(1e-12)


@register("sam")
class SAM(Method):
    summary = "Sharpness-Aware Minimization (rho, --adaptive for ASAM), SGD-momentum base"
    evals_per_step = 2
    PARAMS = {
        "rho": Param(0.05, float, "rho, the radius of the ascent step", nonneg, "non-negative"),
        "adaptive": Param(False, bool, "ASAM: scale the ball elementwise by |w| + 0.01"),
    }

    def __init__(self, model, loss_fn, config):
        super().__init__(model, loss_fn, config)
        self.net = FlatNet(model, loss_fn)
        self.w = self.net.get()
        self.buf = torch.zeros_like(self.w)
        self.steps = 0

    def step(self, stream, lr: float) -> None:
        c = self.config
        xb, yb = stream.next("outer")
        _, g = self.net.loss_and_grad(self.w, xb, yb, buffers=self.net.buffers())
        e = sam_perturbation(self.w, g, self.p["rho"], self.p["adaptive"])
        stream.charge(1, "extra")
        _, g2 = self.net.loss_and_grad(self.w + e, xb, yb, buffers=None)
        if c.weight_decay:
            g2 = g2 + c.weight_decay * self.w
        self.w = self.w.add(momentum_update(self.buf, g2, c.momentum, c.nesterov), alpha=-lr)
        self.steps += 1

    def result_model(self):
        self.net.set(self.w)
        return self.model

    def hparams(self) -> dict:
        c = self.config
        return dict(super().hparams(), momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay)

    def state_dict(self) -> dict:
        return {"w": self.w, "buf": self.buf, "steps": self.steps}

    def load_state_dict(self, s: dict) -> None:
        self.w, self.buf, self.steps = s["w"].clone(), s["buf"].clone(), int(s["steps"])
