"""IS: gradient-free local-entropy training by importance sampling (García Trillos et al. 2019, Algorithm 4).

Source: García Trillos, Kaplan & Sanz-Alonso 2019, "Variational characterizations of local entropy and heat
regularization in deep learning", arXiv:1901.10082. Local entropy is
minimized by x_{k+1} = E_{X ~ q_{x_k,tau}}[X] (Algorithm 1; by eq. 3.5 this is gradient descent on
the local entropy F_tau with step tau), with
q_{x,tau}(x') proportional to exp(-beta f(x') - |x - x'|^2 / (2 tau)). The mean is estimated by
self-normalized importance sampling with the Gaussian phi_{x,tau} as proposal (Algorithm 4)::

    x^j ~ N(x_k, tau I), j = 1..J;   w^j = exp(-beta f(x^j; Xi_k));   x_{k+1} = sum_j w^j x^j / sum_j w^j

No gradient is ever taken. All J samples of one outer update are weighed on the *same* minibatch
Xi_k (weights computed on different minibatches would not be comparable). beta = 1 is the paper's
definition (f the mean loss); ``--beta`` sharpens the weights. tau is scoped as
tau(k) = tau0 / (1 + tau1)^k. Expect a random walk on networks with thousands of parameters unless
tau J beta^2 is large: the curse of dimension the paper points out (section 5.1.2).

Budget: each sample costs one forward evaluation of one minibatch, and is charged as one
evaluation of the budget (kind ``forward``): J per outer update, one per call of :meth:`step`. A
forward pass costs about a third of a forward+backward, so this overcharges `is` by about 3x in
arithmetic; it keeps the budget an integer count of minibatch passes, and ``grad_evals_by_kind``
records the forward evaluations separately.

BatchNorm: the samples use batch statistics and leave the running statistics alone; the result's
statistics are recomputed exactly at x over the training inputs.
"""

from __future__ import annotations

import math

import torch

from . import register
from ._flat import FlatNet, Param, nonneg, positive, tau_at
from .base import Method


class WeightedMean:
    """Running self-normalized importance-sampling mean sum w x / sum w with w = exp(logw), overflow-safe."""

    def __init__(self, like: torch.Tensor):
        self.vec = torch.zeros_like(like, dtype=torch.float64)
        self.s = 0.0  # sum of exp(logw - mx)
        self.s2 = 0.0  # sum of exp(2 (logw - mx))
        self.mx = -math.inf

    def add(self, x: torch.Tensor, logw: float) -> None:
        if not math.isfinite(logw):
            return  # a sample with infinite loss has weight 0
        if logw > self.mx:
            r = math.exp(self.mx - logw) if math.isfinite(self.mx) else 0.0
            self.vec.mul_(r)
            self.s *= r
            self.s2 *= r * r
            self.mx = logw
        w = math.exp(logw - self.mx)
        self.vec.add_(x.to(torch.float64), alpha=w)
        self.s += w
        self.s2 += w * w

    def mean(self) -> torch.Tensor:
        return self.vec / self.s

    @property
    def ess(self) -> float:
        """Kish's effective sample size (sum w)^2 / sum w^2."""
        return self.s * self.s / self.s2 if self.s2 > 0 else 0.0

    def state_dict(self) -> dict:
        return {"vec": self.vec, "s": self.s, "s2": self.s2, "mx": self.mx}

    def load_state_dict(self, s: dict) -> None:
        self.vec = s["vec"].clone()
        self.s, self.s2, self.mx = float(s["s"]), float(s["s2"]), float(s["mx"])


@register("is")
class ImportanceSampling(Method):
    summary = "gradient-free local entropy by importance sampling (García Trillos et al. 2019, Algorithm 4)"
    default_lr = None
    PARAMS = {
        "inner_steps": Param(
            100, int, "J, importance samples per outer update", positive, "at least 1", source="paper: 1000"
        ),
        "tau": Param(1e-4, float, "tau0, the proposal variance and local-entropy scale", positive, "positive"),
        "tau_decay": Param(
            1e-3, float, "tau1 in tau(k) = tau0 / (1 + tau1)^k, k = outer updates", nonneg, "non-negative"
        ),
        "beta": Param(
            1.0,
            float,
            "beta, inverse temperature of the weights exp(-beta f)",
            positive,
            "positive",
            source="the paper's",
        ),
    }

    def __init__(self, model, loss_fn, config):
        super().__init__(model, loss_fn, config)
        self.net = FlatNet(model, loss_fn)
        self.x = self.net.get()
        self.acc = WeightedMean(self.x)
        self.j = 0
        self.k = 0
        self.idx = None
        self.gen = torch.Generator().manual_seed(int(config.seed) + 0x1515)
        self.last_ess = float("nan")

    @property
    def tau(self) -> float:
        return tau_at(self.p["tau"], self.p["tau_decay"], self.k)

    def step(self, stream, lr: float) -> None:
        p = self.p
        if self.j == 0:
            self.idx = stream.next_indices("forward")
        else:
            stream.charge(1, "forward")
        xs = self.x + math.sqrt(self.tau) * self.net.randn(self.gen)
        f = self.net.loss_at(xs, *stream.take(self.idx))
        self.acc.add(xs, -p["beta"] * f)
        self.j += 1
        if self.j == p["inner_steps"]:
            if self.acc.s > 0:
                self.x = self.acc.mean().to(self.x.dtype)
            self.last_ess = self.acc.ess
            self.acc = WeightedMean(self.x)
            self.j = 0
            self.k += 1

    def result_model(self):
        return self.net.materialize(self.x, self.stream.X)

    def epoch_logs(self) -> dict[str, float]:
        return {"tau": self.tau, "ess": self.last_ess, "outer_steps": self.k}

    def state_dict(self) -> dict:
        return {
            "x": self.x,
            "acc": self.acc.state_dict(),
            "j": self.j,
            "k": self.k,
            "idx": self.idx if self.idx is not None else torch.zeros(0, dtype=torch.long),
            "gen": self.gen.get_state(),
            "last_ess": self.last_ess,
        }

    def load_state_dict(self, s: dict) -> None:
        self.x = s["x"].clone()
        self.acc.load_state_dict(s["acc"])
        self.j, self.k = int(s["j"]), int(s["k"])
        self.idx = s["idx"].clone() if self.j > 0 else None
        self.gen.set_state(s["gen"])
        self.last_ess = float(s["last_ess"])
