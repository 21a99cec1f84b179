"""Replicated-SGD, as Algorithm 2 of Pittorino et al. 2021.

Source: Pittorino et al. 2021, "Entropic gradient descent algorithms and wide flat minima", arXiv:2006.07897,
Algorithm 2: y replicas w^a, center
w_bar = mean_a w^a; each round t every replica takes an SGD step on its own minibatch, and every K
rounds the coupling gradient K gamma (w^a - w_bar) is added (SGD on the replicated loss
sum_a L(w^a) + gamma sum_a d(w^a, w_bar)). gamma is scoped as gamma_t = gamma0 (1 + gamma1)^t.

The coupling that cannot diverge. The explicit coupling step w^a <- w^a - eta K gamma (w^a - w_bar)
multiplies each replica's distance to the center by (1 - eta K gamma): it overshoots the center for
eta K gamma > 1 and diverges for > 2, which scoping reaches on any long run. ``--coupling exact``
(the default) integrates the coupling flow dw^a/ds = -K gamma (w^a - w_bar) exactly over the step eta:
the distance is multiplied by exp(-eta K gamma), in (0, 1] for every gamma >= 0; the center is
invariant under it, so the center moves only by the replicas' mean SGD step, exactly as in the
explicit scheme, and the two agree to first order in eta K gamma. ``--coupling explicit`` is
Algorithm 2 as written (a warning is raised when it overshoots), ``--coupling clipped`` uses the
factor max(1 - eta K gamma, 0). The pull 1 - factor (the fraction of the distance removed) is
logged. Momentum (``--momentum``/``--nesterov``) filters the loss gradient only, never the coupling
(a coupling passed through momentum is amplified by 1/(1 - m) and overshoots much earlier).

Replicas. By default they start from independent initializations and see independent data
orders: replica 0 is the given model with the run's seed (so with gamma = 0 it *is* the SGD run of
that seed), replica a >= 1 uses seed s_a = seed + 1000003 a for both its initialization
(``reset_parameters()`` of every submodule under s_a, which for the built-in models equals building
the model with that seed) and its data order. ``--replica-init same`` starts all from the given
model.

Budget: one round is y gradient evaluations (one per replica), so a budget is used in multiples
of y. The result is the center; its BatchNorm buffers are the replicas' average (each replica's
running statistics are updated by its own evaluations only). The replicas are saved in the
checkpoint's training record (``train["replicas"]``, one state_dict each).

Execution: replicas as a Python loop over y gradient calls, or as stacked parameters under
``torch.func.vmap`` (one call for all). ``--replica-exec auto`` picks the loop below
``VMAP_FROM`` replicas and vmap from there on, the crossover measured on CPU in
``benchmarks/bench_rsgd_exec.py`` (see benchmarks/RESULTS.md).

Under torchrun (``torchrun --nproc-per-node 3 -m flatscope train --opt rsgd --replicas 3``) the
replicas are dealt to the ranks in contiguous blocks (one each when y = world size; y must be at
least the world size). Every rank keeps the whole state (all replicas, momenta, data streams) but
differentiates only its own replicas; each step one all-reduce of the (y, dim) gradient matrix,
zero outside a rank's own rows, and one of the replicas' BatchNorm buffers give every rank the same
exact values (a sum with zeros rounds nothing), so every rank computes the same center and the
same update, bit for bit equal to one process with y replicas (the loop execution; without
dropout, whose masks come from the process's global generator).
"""

from __future__ import annotations

import math

import torch
from torch.func import grad_and_value, vmap

from .. import distributed
from ..errors import FlatscopeError
from . import register
from ._flat import FlatNet, Param, gamma_at, momentum_update, nonneg, positive, reinitialized
from .base import Method

VMAP_FROM = 4
REPLICA_SEED_STRIDE = 1000003


def coupling_factor(mode: str, strength: float) -> float:
    """The factor multiplying each replica's distance to the center for coupling ``strength = eta K gamma``."""
    if mode == "exact":
        return math.exp(-strength)
    if mode == "explicit":
        return 1.0 - strength
    if mode == "clipped":
        return max(1.0 - strength, 0.0)
    raise ValueError(mode)


@register("rsgd")
class ReplicatedSGD(Method):
    summary = "Replicated-SGD (Pittorino et al. 2021, Algorithm 2): y coupled replicas, result = center"
    PARAMS = {
        "replicas": Param(3, int, "y, the number of replicas", positive, "at least 1"),
        "couple_every": Param(1, int, "K: couple every K rounds with strength K gamma", positive, "at least 1"),
        "gamma": Param(1.0, float, "gamma0, the initial coupling", nonneg, "non-negative"),
        "gamma_growth": Param(
            1e-3, float, "gamma1 in gamma_t = gamma0 (1 + gamma1)^t, t = rounds", nonneg, "non-negative"
        ),
        "coupling": Param(
            "exact",
            str,
            "exact (exp(-eta K gamma) contraction), explicit (Algorithm 2 as written) or clipped",
            choices=("exact", "explicit", "clipped"),
        ),
        "replica_init": Param(
            "independent", str, "independent (seeded re-initialization) or same", choices=("independent", "same")
        ),
        "replica_exec": Param(
            "auto", str, f"loop, vmap, or auto (vmap from {VMAP_FROM} replicas)", choices=("auto", "loop", "vmap")
        ),
    }

    def __init__(self, model, loss_fn, config):
        super().__init__(model, loss_fn, config)
        p = self.p
        self.y = p["replicas"]
        self.evals_per_step = self.y
        self.net = FlatNet(model, loss_fn)
        self.seeds = [int(config.seed) + REPLICA_SEED_STRIDE * a for a in range(self.y)]
        inits = [model] + [
            reinitialized(model, s) if p["replica_init"] == "independent" else model for s in self.seeds[1:]
        ]
        self.W = torch.stack(
            [torch.cat([q.detach().reshape(-1) for q in m.parameters() if q.requires_grad]) for m in inits]
        ).clone()
        self.bufs = [{n: b.detach().clone() for n, b in m.named_buffers()} for m in inits]
        self.mom = torch.zeros_like(self.W)
        self.t = 0  # rounds done
        self.world = distributed.world_size()
        if self.world > 1 and self.y < self.world:
            raise FlatscopeError(
                f"--replicas {self.y} is fewer than the {self.world} ranks: under torchrun every rank "
                f"takes at least one replica (use --replicas {self.world} or more)"
            )
        self.own = range(*distributed.shard_range(self.y, distributed.rank(), self.world))  # replicas of this rank
        n_own = len(self.own)
        self.exec = p["replica_exec"] if p["replica_exec"] != "auto" else ("vmap" if n_own >= VMAP_FROM else "loop")
        self.streams = []
        self.last = {"pull": 0.0, "coupling_strength": 0.0}

    def setup(self, stream) -> None:
        super().setup(stream)
        from ..training import BatchStream

        self.streams = [stream] + [
            BatchStream(stream.source, None, stream.batch_size, s, dtype=stream.dtype, device=stream.device)
            for s in self.seeds[1:]
        ]

    @property
    def gamma(self) -> float:
        return gamma_at(self.p["gamma"], self.p["gamma_growth"], self.t)

    def _batches(self, stream):
        """Every replica's minibatch (None for replicas of other ranks, whose streams only advance)."""

        def draw(a: int, s, kind: str = "outer"):
            if a in self.own:
                return s.next(kind)
            s.next_indices(kind)  # same stream position as the owner's, no copy of the batch
            return None

        out = [draw(0, stream)]
        for a, s in enumerate(self.streams[1:], 1):
            out.append(draw(a, s))
            stream.charge(1, "outer")
        return out

    def _grads(self, batches) -> torch.Tensor:
        own = list(self.own)
        if self.exec == "loop":
            G = [self.net.loss_and_grad(self.W[a], *batches[a], buffers=self.bufs[a])[1] for a in own]
        else:
            XB = torch.stack([batches[a][0] for a in own])
            YB = torch.stack([batches[a][1] for a in own])
            B = {n: torch.stack([self.bufs[a][n] for a in own]) for n in self.bufs[0]}
            G, _ = vmap(grad_and_value(self.net._loss))(self.W[own[0] : own[-1] + 1], B, XB, YB)
            for i, a in enumerate(own):
                for n in self.bufs[a]:
                    self.bufs[a][n].copy_(B[n][i])
        if self.world == 1:
            return torch.stack(G) if isinstance(G, list) else G
        full = torch.zeros_like(self.W)
        full[own[0] : own[-1] + 1] = torch.stack(G) if isinstance(G, list) else G
        self._share_buffers()
        return distributed.all_reduce_sum(full)

    def _share_buffers(self) -> None:
        """Every replica's buffers on every rank: each rank contributes its own replicas' (zeros elsewhere)."""
        names = list(self.bufs[0])
        if not names:
            return
        # one float64 row per replica (exact for float32/64 statistics and int64 counters below 2^53)
        rows = torch.stack([torch.cat([bf[n].reshape(-1).to(torch.float64) for n in names]) for bf in self.bufs])
        mine = torch.zeros(self.y, 1, dtype=torch.bool)
        mine[self.own.start : self.own.stop] = True
        rows = distributed.all_reduce_sum(torch.where(mine, rows, 0.0))
        for a, bf in enumerate(self.bufs):
            for n, part in zip(names, torch.split(rows[a], [bf[n].numel() for n in names])):
                bf[n].copy_(part.reshape(bf[n].shape))

    def step(self, stream, lr: float) -> None:
        p, c = self.p, self.config
        self.t += 1  # Algorithm 2 counts rounds t = 1, 2, ...
        gamma = gamma_at(p["gamma"], p["gamma_growth"], self.t - 1)
        center = self.W.mean(0)
        G = self._grads(self._batches(stream))
        if c.weight_decay:
            G = G + c.weight_decay * self.W
        upd = momentum_update(self.mom, G, c.momentum, c.nesterov)
        if self.t % p["couple_every"] == 0:
            strength = lr * p["couple_every"] * gamma
            f = coupling_factor(p["coupling"], strength)
            if p["coupling"] != "exact" and strength > 1:
                what = (
                    "clipped to full contraction"
                    if p["coupling"] == "clipped"
                    else ("overshoots the center" + (" and diverges" if strength > 2 else ""))
                )
                self.warn(
                    f"rsgd-{p['coupling']}",
                    f"coupling eta*K*gamma = {strength:.3g} > 1 at round {self.t}: "
                    f"the {p['coupling']} coupling {what} (use --coupling exact)",
                )
            # f = 1 (gamma = 0) leaves exactly SGD's update; add(alpha=) rounds as torch.optim.SGD does
            self.W = (self.W - (1.0 - f) * (self.W - center)).add(upd, alpha=-lr)
            self.last = {"pull": 1.0 - f, "coupling_strength": strength}
        else:
            self.W = self.W.add(upd, alpha=-lr)

    def center_buffers(self) -> dict[str, torch.Tensor]:
        out = {}
        for n in self.bufs[0]:
            vals = torch.stack([bf[n] for bf in self.bufs])
            out[n] = vals.mean(0) if torch.is_floating_point(vals) else vals[0].clone()
        return out

    def result_model(self):
        self.net.set(self.W.mean(0))
        if self.bufs[0]:
            self.net.load_buffers(self.center_buffers())
        return self.model

    def epoch_logs(self) -> dict[str, float]:
        d = torch.linalg.vector_norm(self.W - self.W.mean(0), dim=1)
        out = {
            "gamma": self.gamma,
            "pull": self.last["pull"],
            "coupling_strength": self.last["coupling_strength"],
            "replica_dist_mean": float(d.mean()),
            "replica_dist_max": float(d.max()),
            "rounds": self.t,
        }
        for a in range(self.y):
            out[f"replica_dist_{a}"] = float(d[a])
        return out

    def hparams(self) -> dict:
        c = self.config
        return dict(
            super().hparams(),
            momentum=c.momentum,
            nesterov=c.nesterov,
            weight_decay=c.weight_decay,
            exec=self.exec,
            replica_seeds=self.seeds,
        )

    def replica_state_dicts(self) -> list[dict]:
        out = []
        for a in range(self.y):
            sd = dict(self.net.layout.unflatten(self.W[a]))
            sd.update(self.bufs[a])
            out.append(sd)
        return out

    def extra_record(self) -> dict:
        return {"replicas": self.replica_state_dicts()}

    def state_dict(self) -> dict:
        return {
            "W": self.W,
            "mom": self.mom,
            "bufs": self.bufs,
            "t": self.t,
            "last": dict(self.last),
            "streams": [s.state_dict() for s in self.streams[1:]],
        }

    def load_state_dict(self, s: dict) -> None:
        if s["W"].shape != self.W.shape:
            from ..errors import FlatscopeError

            raise FlatscopeError(f"the checkpoint holds {s['W'].shape[0]} replicas, not {self.y}")
        self.W, self.mom = s["W"].clone(), s["mom"].clone()
        self.bufs = [{n: b.clone() for n, b in bf.items()} for bf in s["bufs"]]
        self.t = int(s["t"])
        self.last = {k: float(v) for k, v in s["last"].items()}
        for st, sd in zip(self.streams[1:], s["streams"]):
            st.load_state_dict(sd)
