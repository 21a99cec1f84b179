"""HR: heat regularization by Robbins-Monro (García Trillos et al. 2019, Algorithms 2 and 5), tau scoped.

Source: García Trillos, Kaplan & Sanz-Alonso 2019, "Variational characterizations of local entropy and heat
regularization in deep learning", arXiv:1901.10082. Each outer iteration
moves x_k to the minimizer of x -> KL(phi_{x,tau} || q_{x_k,tau}) (Algorithm 2), whose
Euler-Lagrange equation is h(x) = x - x_k + tau E_{Y ~ N(x, tau I)} grad f(Y) = 0 (section 5.2): an
implicit (proximal) step of length tau on the heat-regularized loss F^H_tau. Its root is found by
Robbins-Monro (Algorithm 5), J iterations of M samples each::

    x^1 = x_k
    for j = 1..J:  x^{j+1} = x^j - a_j (x^j - x_k + tau/M sum_m grad f(z_m; Xi_m)),  z_m ~ N(x^j, tau I)
    x_{k+1} = x^{J+1}

with a_j = c j^(-p), p in (1/2, 1] (the paper prints ``c l^alpha``; the exponent must be negative for
Robbins-Monro, and the experiments use c = 0.1, p = 0.7). tau is the step length on the loss *and*
the smoothing variance (there is no learning rate; ``--lr``, ``--momentum`` do not apply), scoped as
tau(k) = tau0 / (1 + tau1)^k (section 6.5.1).

Budget: J*M gradient evaluations per outer update, each on a fresh minibatch, one per call of
:meth:`step`. BatchNorm: the evaluations are at perturbed points and leave the running statistics
alone; the result's statistics are recomputed exactly at x over the training inputs.
"""

from __future__ import annotations

import math

import torch

from . import register
from ._flat import FlatNet, Param, nonneg, positive, tau_at
from .base import Method


def rm_gain(c: float, p: float, j: int) -> float:
    """Robbins-Monro gain a_j = c j^(-p) (j = 1, 2, ...)."""
    return c * j ** (-p)


@register("hr")
class HeatRegularization(Method):
    summary = "heat regularization by Robbins-Monro (García Trillos et al. 2019, Algorithm 5); tau is the step"
    default_lr = None
    PARAMS = {
        "inner_steps": Param(
            5, int, "J, Robbins-Monro iterations per outer update", positive, "at least 1", source="paper: 30"
        ),
        "samples": Param(
            5, int, "M, perturbed gradients per Robbins-Monro iteration", positive, "at least 1", source="paper: 30"
        ),
        "tau": Param(
            1e-2, float, "tau0, the smoothing variance and step length", positive, "positive", source="the paper's"
        ),
        "tau_decay": Param(
            1e-3, float, "tau1 in tau(k) = tau0 / (1 + tau1)^k, k = outer updates", nonneg, "non-negative"
        ),
        "rm_c": Param(
            0.1, float, "c in the Robbins-Monro gain a_j = c j^(-p)", positive, "positive", source="the paper's"
        ),
        "rm_power": Param(
            0.7, float, "p in a_j = c j^(-p)", lambda v: 0.5 < v <= 1, "in (0.5, 1]", source="the paper's"
        ),
    }

    def __init__(self, model, loss_fn, config):
        super().__init__(model, loss_fn, config)
        self.net = FlatNet(model, loss_fn)
        self.xk = self.net.get()
        self.xj = self.xk.clone()
        self.gsum = torch.zeros_like(self.xk)
        self.j = 1  # current Robbins-Monro iteration (1-based)
        self.m = 0  # samples done in it
        self.k = 0  # outer updates done
        self.gen = torch.Generator().manual_seed(int(config.seed) + 0x4852)
        self.last_gain = float("nan")

    @property
    def tau(self) -> float:
        return tau_at(self.p["tau"], self.p["tau_decay"], self.k)

    def step(self, stream, lr: float) -> None:
        p, c = self.p, self.config
        tau = self.tau
        xb, yb = stream.next("inner")
        z = self.xj + math.sqrt(tau) * self.net.randn(self.gen)
        _, g = self.net.loss_and_grad(z, xb, yb, buffers=None)
        if c.weight_decay:
            g = g + c.weight_decay * z
        self.gsum += g
        self.m += 1
        if self.m == p["samples"]:
            a = rm_gain(p["rm_c"], p["rm_power"], self.j)
            self.xj = self.xj - a * (self.xj - self.xk + tau * self.gsum / self.m)
            self.gsum.zero_()
            self.m = 0
            self.j += 1
            self.last_gain = a
            if self.j > p["inner_steps"]:
                self.xk = self.xj.clone()
                self.j = 1
                self.k += 1

    def result_model(self):
        return self.net.materialize(self.xk, self.stream.X)

    def epoch_logs(self) -> dict[str, float]:
        return {"tau": self.tau, "outer_steps": self.k}

    def hparams(self) -> dict:
        return dict(super().hparams(), weight_decay=self.config.weight_decay)

    def state_dict(self) -> dict:
        return {
            "xk": self.xk,
            "xj": self.xj,
            "gsum": self.gsum,
            "j": self.j,
            "m": self.m,
            "k": self.k,
            "gen": self.gen.get_state(),
            "last_gain": self.last_gain,
        }

    def load_state_dict(self, s: dict) -> None:
        self.xk, self.xj, self.gsum = s["xk"].clone(), s["xj"].clone(), s["gsum"].clone()
        self.j, self.m, self.k = int(s["j"]), int(s["m"]), int(s["k"])
        self.gen.set_state(s["gen"])
        self.last_gain = float(s["last_gain"])
