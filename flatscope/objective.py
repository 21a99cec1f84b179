"""The loss of a model over a data split as a function of its flat parameter vector.

:class:`Objective` is the one abstraction every analysis shares. For a flat vector ``w`` of the
model's trainable parameters it gives

- ``loss(w)`` and ``evaluate(w) -> (loss, accuracy)``: exact over the whole split, the mean over
  the loss's terms (samples; counted tokens for ``lm``), each batch weighted by its count;
- ``loss_and_grad(w)``: value and gradient (torch.func.grad);
- ``hvp(v, w)``: Hessian-vector products; ``v`` may hold several vectors as rows.
  ``hvp_mode="exact"`` is reverse-over-reverse (a backward pass through the gradient's graph,
  :class:`Linearization`), run with PyTorch's math
  attention kernel so that ``scaled_dot_product_attention`` has a second derivative;
  ``"fd"`` is the central difference of two gradients, which works wherever a gradient works
  (fused kernels, sharded models); ``"auto"`` takes the exact mode and falls back to ``fd`` with a
  note when a layer has no double backward. ``hvp_operator(w)`` reuses the linearization across
  many products at one point;
- ``evaluate_many(W)``: loss and accuracy at several points (rows of ``W``) in one vmapped call;
- ``minibatch(idx)``, ``batch_loss(w, inputs, targets)``, ``subset(idx)``: for samplers and trainers.

The data is a :class:`flatscope.sources.Source`: tensors in memory (kept on ``device``), or a
map-style ``Dataset``/HDF5 file streamed batch by batch. Inputs keep their shape and dtype (image
batches stay ``N x C x H x W``, token ids stay integer; dict inputs are passed as keyword
arguments). The model's output may be a tensor, a tuple, a dict or a Hugging Face ``ModelOutput``
(``.logits``, or ``output=KEY``). Only parameters with ``requires_grad`` are in ``w`` (frozen ones
stay fixed); tied parameters appear once.

It is deterministic: the model runs in eval mode (BatchNorm uses its running statistics,
dropout is off) unless ``train_mode=True`` is asked for. It owns device and dtype: the model's
floating parameters and buffers and the floating inputs live on ``device`` in ``dtype``.

Data-parallel use only adds a reduction: every per-split sum goes through ``self._reduce`` and the
normalizer is the global count (see ``shard``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Callable

import torch
from torch.autograd.graph import get_gradient_edge
from torch.func import functional_call, grad, grad_and_value, vmap

from .errors import FlatscopeError
from .linear_rule import linear_rule
from .memory import MemoryBudget, batch_cost
from .losses import BUILTIN_LOSSES, Loss, Metric, extract_output, make_loss
from .params import ParamLayout
from .sources import Source, TensorSource, as_source, describe, to_device

LOSSES = BUILTIN_LOSSES
LOW_PRECISION = (torch.bfloat16, torch.float16)
HVP_MODES = ("auto", "exact", "fd")


def loss_value(out: torch.Tensor, y: torch.Tensor, loss) -> torch.Tensor:
    """The mean loss of outputs ``out`` against targets ``y`` (``loss``: a name or a :class:`Loss`)."""
    return make_loss(loss).mean(out, y)


def call_model(model: torch.nn.Module, params_and_buffers, inputs, output: str | None = None) -> torch.Tensor:
    """``model(inputs)`` with the given parameters: a tensor is the one positional argument, a tuple
    or list are positional arguments, a dict are keyword arguments; the output is read by
    :func:`flatscope.losses.extract_output`."""
    if isinstance(inputs, dict):
        out = functional_call(model, params_and_buffers, (), inputs)
    elif isinstance(inputs, (tuple, list)):
        out = functional_call(model, params_and_buffers, tuple(inputs))
    else:
        out = functional_call(model, params_and_buffers, (inputs,))
    return extract_output(out, output)


def run_module(module: torch.nn.Module, inputs, output: str | None = None) -> torch.Tensor:
    """``module(inputs)`` called directly, with the calling convention of :func:`call_model`."""
    if isinstance(inputs, dict):
        out = module(**inputs)
    elif isinstance(inputs, (tuple, list)):
        out = module(*inputs)
    else:
        out = module(inputs)
    return extract_output(out, output)


def second_order_kernels():
    """A context in which attention runs PyTorch's math kernel, which has a double backward
    (the fused flash/memory-efficient kernels do not)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def fd_step(w: torch.Tensor, v: torch.Tensor, space=None) -> float:
    """The central-difference step for ``H v``: ``eps^(1/2) * max(1, |w|_rms) / |v|_rms``, a relative
    perturbation of ``w`` of about ``sqrt(eps)`` of the (widened, see ``Objective._fd_objective``)
    dtype. For a smooth loss ``eps^(1/3)`` would balance the O(h^2) truncation and O(eps/h) rounding
    errors, but ReLU-type activations add an O(h) error from the kinks the segment crosses: on the
    trained digits MLP the error of one product along the top eigenvector fell from 0.33 to 4.5e-6 with
    the smaller step (float64 differences). ``space`` (a sharded :class:`flatscope.linalg.VectorSpace`):
    ``w`` and ``v`` are this rank's coordinates and the norms are all-reduced."""
    eps = torch.finfo(w.dtype).eps
    if space is not None and space.sharded:
        sq = space.reduce(torch.stack([w.double().square().sum(), v.double().square().sum()]))
        wn, vn = math.sqrt(float(sq[0]) / space.dim), math.sqrt(float(sq[1]) / space.dim)
    else:
        wn = float(w.double().norm()) / math.sqrt(w.numel())
        vn = float(v.double().norm()) / math.sqrt(v.numel())
    if vn == 0:
        return 0.0
    return eps**0.5 * max(1.0, wn) / vn


class Objective:
    def __init__(
        self,
        model: torch.nn.Module,
        X=None,
        y=None,
        *,
        data: Source | None = None,
        loss="ce",
        metric: Metric | None = None,
        output: str | None = None,
        batch_size: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        train_mode: bool = False,
        n_total: int | None = None,
        hvp_mode: str = "auto",
        workers: int = 0,
        memory_budget=None,
        basis_device: str | torch.device | None = None,
    ):
        self.loss_fn: Loss = make_loss(loss)
        self.loss_name = self.loss_fn.name
        self.metric = metric
        self.output = output
        if hvp_mode not in HVP_MODES:
            raise FlatscopeError(f"unknown HVP mode {hvp_mode!r}; choose {', '.join(HVP_MODES)}")
        self.hvp_mode = hvp_mode
        self.hvp_info: dict = {"requested": hvp_mode}
        self.notes: list[str] = []
        if batch_size is not None and batch_size < 1:
            raise FlatscopeError(f"--batch-size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.dtype = dtype
        # bfloat16/float16: forward and backward in the low precision, every sum over batches in float32
        self.acc_dtype = torch.float32 if dtype in LOW_PRECISION else dtype
        # A private copy: the user's model is never touched.
        self.model = copy.deepcopy(model).to(device=self.device, dtype=dtype)
        self.model.train(train_mode)
        self.layout = ParamLayout.of(self.model)
        self.buffers = {n: b for n, b in self.model.named_buffers()}
        self.w0 = self.layout.flatten(  # a new tensor (torch.cat)
            {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        )
        # Every evaluation passes its parameters explicitly (functional_call); the private copy's own
        # trainable parameters become views of w0, so that the objective holds one parameter vector, not two.
        views = self.layout.unflatten(self.w0)
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                param.data = views[name]
        source = data if data is not None else as_source(X, y, workers=workers)
        if isinstance(source, TensorSource):
            source = source.to(self.device, dtype)
        self.source = source
        self.n = len(source)
        if self.n == 0:
            raise FlatscopeError("the data split is empty")
        self.batch_size = int(batch_size) if batch_size else max(self.n, 1)
        if not source.in_memory and not batch_size:
            self.batch_size = 256
        self._reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
        self._counts: list[int] | None = None
        self._count_total: float | None = None
        self._n_total = int(n_total) if n_total is not None else None
        self._memory_budget = memory_budget
        self._memory: MemoryBudget | None = memory_budget if isinstance(memory_budget, MemoryBudget) else None
        self.basis_device = torch.device(basis_device) if basis_device is not None else self.device
        self._batch_bytes: dict[bool, int] = {}
        self._probe()

    # ------------------------------------------------------------------ data
    @property
    def n_total(self) -> int:
        """Samples in the whole split (all ranks)."""
        return self._n_total if self._n_total is not None else self.n

    @property
    def X(self):
        """The split's inputs (in-memory data only)."""
        if not isinstance(self.source, TensorSource):
            raise FlatscopeError("this analysis needs the data in memory; the split is streamed")
        return self.source.inputs

    @property
    def y(self):
        if not isinstance(self.source, TensorSource):
            raise FlatscopeError("this analysis needs the data in memory; the split is streamed")
        return self.source.targets

    @property
    def classification(self) -> bool:
        return self.loss_fn.name in ("ce", "lm") or (
            self.loss_fn.name == "mse"
            and isinstance(self.source, TensorSource)
            and not torch.is_floating_point(self.source.targets)
        )

    def _on_device(self, x, y):
        return to_device(x, self.device, self.dtype), to_device(
            y, self.device, self.dtype if torch.is_floating_point(y) else None
        )

    def _raw_batches(self):
        for i, (x, y) in enumerate(self.source.batches(self.batch_size)):
            yield i, *self._on_device(x, y)

    def _count(self, y) -> int:
        return self.loss_fn.count(None, y)

    def _batch_counts(self) -> list[int]:
        if self._counts is None:
            if isinstance(self.source, TensorSource) or self.loss_fn.name not in ("ce", "lm"):
                if isinstance(self.source, TensorSource):
                    self._counts = [self._count(y) for _, y in self.source.batches(self.batch_size)]
                else:
                    self._counts = [min(self.batch_size, self.n - s) for s in range(0, self.n, self.batch_size)]
            else:  # token counts of a streamed split: one pass over its targets
                self._counts = [self._count(y) for _, y in self.source.batches(self.batch_size)]
        return self._counts

    @property
    def count_total(self) -> float:
        """The normalizer of the split mean: samples, or counted tokens (all ranks)."""
        if self._count_total is None:
            local = torch.tensor(float(sum(self._batch_counts())), dtype=torch.float64, device=self.device)
            self._count_total = float(self._reduce(local))
            if self._count_total == 0:
                raise FlatscopeError("the split has no counted targets (every target is ignore_index -100)")
        return self._count_total

    def batches(self):
        """(inputs_b, targets_b, weight_b) over the split on the objective's device; weight_b is the
        batch's share of the split mean (count_b / count_total)."""
        total = self.count_total
        for (_, x, y), c in zip(self._raw_batches(), self._batch_counts()):
            if c:
                yield x, y, c / total

    def minibatch(self, idx: torch.Tensor):
        """``(inputs, targets)`` of the samples ``idx`` of this split (any leading index shape for data in memory)."""
        if isinstance(self.source, TensorSource):
            return self.source.take(idx)
        return self._on_device(*self.source.take(idx.cpu() if isinstance(idx, torch.Tensor) else idx))

    def subset(self, idx) -> "Objective":
        """An objective over the samples ``idx`` of this split only (same model, loss and batching)."""
        idx = torch.as_tensor(idx, dtype=torch.long).cpu()
        return Objective(
            self.model,
            data=self.source.subset(idx),
            loss=self.loss_fn,
            metric=self.metric,
            output=self.output,
            batch_size=self.batch_size,
            device=self.device,
            dtype=self.dtype,
            train_mode=self.model.training,
            hvp_mode=self.hvp_mode,
            memory_budget=self._memory_budget if self._memory is None else self._memory,
            basis_device=self.basis_device,
        )

    @contextlib.contextmanager
    def _guard(self, i: int, x, derivatives: bool = False):
        """Errors of one batch become one clear line that names the batch and its shapes (with
        ``derivatives``, a missing double backward stays a RuntimeError for the ``auto`` fallback)."""
        try:
            yield
        except FlatscopeError:
            raise
        except NotImplementedError:
            raise
        except (RuntimeError, IndexError, ValueError, TypeError) as exc:
            if derivatives and isinstance(exc, RuntimeError) and ("derivative" in str(exc) or "backward" in str(exc)):
                raise
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FlatscopeError(f"the model failed on batch {i} (inputs {describe(x)}): {msg}") from None

    def _probe(self) -> None:
        """Run the model on the first samples: outputs and targets must fit the loss."""
        x, y = self.source.first(2)
        x, y = self._on_device(x, y)
        with torch.no_grad(), self._guard(0, x):
            out = self._forward(self.layout.unflatten(self.w0), x, self.buffers)
        if not torch.is_floating_point(out):
            raise FlatscopeError(f"the model returns {out.dtype} outputs; a loss needs floating outputs")
        self.loss_fn.check(out, y)
        self.out_shape = tuple(out.shape[1:])
        if (
            isinstance(self.source, TensorSource)
            and self.loss_fn.name in ("ce", "lm", "mse")
            and not torch.is_floating_point(self.source.targets)
        ):
            t = self.source.targets
            valid = t[t != -100]
            if valid.numel() and (int(valid.max()) >= out.shape[-1] or int(valid.min()) < 0):
                raise FlatscopeError(
                    f"labels go up to {int(valid.max())} but the model has {out.shape[-1]} outputs"
                    if int(valid.min()) >= 0
                    else f"negative class label {int(valid.min())}"
                )
        if self.metric is not None:
            self.metric(out, y)

    # ------------------------------------------------------------------ basics
    @property
    def dim(self) -> int:
        return self.layout.size

    def _forward(self, params: dict, x, buffers: dict | None = None) -> torch.Tensor:
        return call_model(self.model, (params, self.buffers if buffers is None else buffers), x, self.output)

    def _batch_loss(self, w: torch.Tensor, x, y, buffers=None) -> torch.Tensor:
        return self.loss_fn.mean(self._forward(self.layout.unflatten(w), x, buffers), y)

    def batch_loss(self, w: torch.Tensor, inputs, targets) -> torch.Tensor:
        """Mean loss of one batch at flat ``w`` (functional: works under ``grad``/``vmap``)."""
        return self._batch_loss(w, inputs, targets)

    def module_loss(self, module: torch.nn.Module, inputs, targets) -> torch.Tensor:
        """Mean loss of one batch through ``module`` called directly (a copy of ``self.model``)."""
        return self.loss_fn.mean(run_module(module, inputs, self.output), targets)

    def _check_w(self, w: torch.Tensor) -> torch.Tensor:
        if w.shape[-1] != self.dim:
            raise FlatscopeError(f"parameter vector has {w.shape[-1]} entries, the model {self.dim}")
        return w.to(device=self.device, dtype=self.dtype)

    def _score(self, out, y) -> torch.Tensor:
        """The accuracy numerator of a batch: correct predictions, or count x metric."""
        if self.metric is not None:
            return self.metric(out, y) * self._count(y)
        return self.loss_fn.correct(out, y)

    # ------------------------------------------------------------------ values
    @torch.no_grad()
    def evaluate(self, w: torch.Tensor | None = None, buffers: dict | None = None) -> tuple[float, float]:
        """(mean loss, accuracy or metric) over the whole split; accuracy is NaN for regression targets."""
        w = self.w0 if w is None else self._check_w(w)
        params = self.layout.unflatten(w)
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        total = self.count_total
        for (i, xb, yb), c in zip(self._raw_batches(), self._batch_counts()):
            if not c:
                continue
            with self._guard(i, xb):
                out = self._forward(params, xb, buffers)
                loss += (c / total) * self.loss_fn.mean(out, yb).to(torch.float64)
                correct += self._score(out, yb)
        loss, correct = self._reduce(loss), self._reduce(correct)
        return float(loss), float(correct) / total

    def loss(self, w: torch.Tensor | None = None) -> float:
        return self.evaluate(w)[0]

    @torch.no_grad()
    def evaluate_many(self, W: torch.Tensor, buffers: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and accuracy at each row of ``W`` (shape ``(m, dim)``), one vmapped call per batch."""
        W = self._check_w(W)
        bufs = self.buffers if buffers is None else buffers

        def one(w, xb, yb):
            out = call_model(self.model, (self.layout.unflatten(w), bufs), xb, self.output)
            return self.loss_fn.mean(out, yb).to(torch.float64), self.loss_fn.correct(out, yb)

        losses = torch.zeros(W.shape[0], dtype=torch.float64, device=self.device)
        correct = torch.zeros(W.shape[0], dtype=torch.float64, device=self.device)
        use_vmap = self.metric is None
        for xb, yb, wt in self.batches():
            if use_vmap:
                try:
                    lb, cb = vmap(one, in_dims=(0, None, None))(W, xb, yb)
                except (RuntimeError, NotImplementedError):  # a layer vmap cannot batch: one point at a time
                    use_vmap = False
            if not use_vmap:
                rows = [self._point(W[r], xb, yb, bufs) for r in range(W.shape[0])]
                lb = torch.stack([r[0] for r in rows])
                cb = torch.stack([r[1] for r in rows])
            losses += wt * lb
            correct += cb
        return self._reduce(losses), self._reduce(correct) / self.count_total

    def _point(self, w, xb, yb, bufs):
        out = call_model(self.model, (self.layout.unflatten(w), bufs), xb, self.output)
        return self.loss_fn.mean(out, yb).to(torch.float64), self._score(out, yb)

    # ------------------------------------------------------------------ derivatives
    def loss_and_grad(self, w: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        w = self.w0 if w is None else self._check_w(w)
        g = torch.zeros(w.shape, dtype=self.acc_dtype, device=self.device)
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        gv = grad_and_value(self._batch_loss)
        total = self.count_total
        for (i, xb, yb), c in zip(self._raw_batches(), self._batch_counts()):
            if not c:
                continue
            with self._guard(i, xb):
                gb, lb = gv(w, xb, yb)
            g += (c / total) * gb
            loss += (c / total) * lb.detach().to(torch.float64)
        return float(self._reduce(loss)), self._reduce(g)

    def grad(self, w: torch.Tensor | None = None) -> torch.Tensor:
        return self.loss_and_grad(w)[1]

    def _leaf_loss(self, w: torch.Tensor, x, y) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One batch's loss as a function of per-tensor leaves that are views of ``w`` (no copy):
        plain autograd, so that the graph a second-order product keeps holds views of ``w`` and the
        activations, nothing parameter-sized besides the gradient (``torch.func``'s ``vjp`` of
        ``grad`` held 1.7 more parameter vectors on a 10^7-parameter MLP)."""
        parts = self.layout.unflatten(w.detach())
        leaves = {name: p.detach().requires_grad_(True) for name, p in parts.items()}
        return list(leaves.values()), self.loss_fn.mean(self._forward(leaves, x), y)

    def _exact_hvp(self, v: torch.Tensor, w: torch.Tensor, reserved: float = 0.0) -> torch.Tensor:
        out = torch.zeros(v.shape, dtype=self.acc_dtype, device=self.device)
        rows = self.rows_per_product(v, reserved + (self.batch_bytes() if v.dim() > 1 else 0))
        with second_order_kernels():
            for i, (xb, yb, wt) in enumerate(self.batches()):
                with self._guard(i, xb, derivatives=True):
                    self._pull_block(Linearization(self, w, xb, yb), v, wt, out, rows)
        return self._reduce(out)

    def _pull_block(self, lin: "Linearization", v: torch.Tensor, wt: float, out: torch.Tensor, rows: int) -> None:
        """``out += wt * H_batch v`` through ``lin``; a block of rows goes as vmapped groups or one row at
        a time, whichever the first block of this objective measured faster (``hvp_info["rows"]``):
        vmap over the backward pass costs 0.30-0.90x a loop per vector on the small CNN, the LSTM and the
        Transformer but 1.1-1.8x on the MLP, CNN and ResNet (benchmarks/RESULTS.md). The measure costs
        no product: of the first block's first ``2h`` rows, ``h`` go row by row and ``h`` vmapped (blocks of
        fewer than 4 rows, or of 1-row groups, go vmapped without a measure, and a single row never
        through vmap: :meth:`Linearization.pull`). Both ways give the same products up to rounding."""
        k = 1 if v.dim() == 1 else v.shape[0]
        h = min(rows, k // 2)
        if "rows" in self.hvp_info or h < 2:
            lin.pull(v, wt, out, rows, vmapped=self.hvp_info.get("rows", "vmap") == "vmap")
            return
        t0 = time.perf_counter()
        lin.pull(v[:h], wt, out[:h], h, vmapped=False)
        t1 = time.perf_counter()
        lin.pull(v[h : 2 * h], wt, out[h : 2 * h], h, vmapped=True)
        t2 = time.perf_counter()
        self.hvp_info["rows"] = "vmap" if t2 - t1 < t1 - t0 else "loop"
        lin.pull(v[2 * h :], wt, out[2 * h :], rows, vmapped=self.hvp_info["rows"] == "vmap")

    def _fd_objective(self) -> "Objective":
        """The objective whose gradients the central difference takes: near a minimum the difference of
        two float32 gradients is dominated by rounding (digits MLP: 0.3 relative error on a probe and a
        lambda_max 18x too large, against 3e-8 in float64), so a float32 objective differences in
        float64, and bfloat16/float16 ones in float32. Same data source, model copy, loss and reduction."""
        wide = {torch.float32: torch.float64, torch.bfloat16: torch.float32, torch.float16: torch.float32}.get(
            self.dtype
        )
        if wide is None:
            return self
        if getattr(self, "_fd_wide", None) is None:
            o = Objective(
                self.model,
                data=self.source,
                loss=self.loss_fn,
                metric=None,
                output=self.output,
                batch_size=self.batch_size,
                device=self.device,
                dtype=wide,
                train_mode=self.model.training,
                hvp_mode="fd",
            )
            o._reduce, o._n_total = self._reduce, self._n_total
            self._fd_wide = o
        return self._fd_wide

    def _fd_hvp(self, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Central difference ``(g(w + h v) - g(w - h v)) / 2h`` of the split gradient, row by row, in the
        wider precision of :meth:`_fd_objective` (the step is chosen for that precision)."""
        o = self._fd_objective()
        w = w.to(o.dtype)
        rows = v.reshape(-1, v.shape[-1]).to(o.dtype)
        out = torch.zeros(rows.shape, dtype=self.acc_dtype, device=self.device)
        for r in range(rows.shape[0]):
            h = fd_step(w, rows[r])
            if h == 0:
                continue
            out[r] = ((o.grad(w + h * rows[r]) - o.grad(w - h * rows[r])) / (2 * h)).to(self.acc_dtype)
        return out.reshape(v.shape)

    def resolve_hvp_mode(self) -> str:
        """``exact`` or ``fd``: for ``auto``, try an exact product on two samples first; a layer with no
        double backward switches to ``fd`` with a note (``hvp_info``).

        The rule of ``auto`` (``--hvp auto``), from ``benchmarks/bench_hvp_modes.py`` (MLP, CNN,
        ResNet+BN, SDPA Transformer, LSTM+GRU, small CNN; CPU, benchmarks/RESULTS.md): exact
        reverse-over-reverse (a backward pass through the gradient's graph), with each batch's
        linearization cached when they all fit the memory budget
        (:class:`flatscope.analyses.hessian.HessianOperator`), rebuilt per product otherwise; a block of
        vectors (SLQ's probes, the trace's batches) vmapped or row by row, whichever its first block
        measured faster (:meth:`_pull_block`). Measured: the cached product was the fastest single-vector
        product on every model (0.75-1.96x a gradient; rebuilt 1.33-2.76x, forward-over-reverse
        2.3-3.4x and failing on the LSTM); a vmapped block cost 0.30-0.90x a loop per vector on three
        models and 1.1-1.8x on the other three; ``torch.compile`` of the product was slower than the
        cached product (or equal, on the small CNN) on every model but the MLP, where it won (0.75x) after
        138 s of compilation (about 3,500 products), so it is not used. None of these choices
        changes a product beyond rounding. ``fd`` only where no exact product exists."""
        if self.hvp_mode != "auto":
            self.hvp_info.setdefault("mode", self.hvp_mode)
            return self.hvp_mode
        try:
            small = self.subset(torch.arange(min(2, self.n)))
            small.hvp_mode = "exact"
            small._exact_hvp(torch.ones_like(self.w0), self.w0)
            mode = "exact"
        except (RuntimeError, NotImplementedError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            mode = "fd"
            note = (
                f"exact Hessian-vector products are not available for this model ({first[:160]}); "
                "using --hvp fd (central differences of gradients)"
            )
            self.notes.append(note)
            self.hvp_info["fallback_reason"] = first[:300]
        self.hvp_mode = mode
        self.hvp_info["mode"] = mode
        return mode

    def hvp(self, v: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """H(w) v for ``v`` of shape ``(dim,)`` or ``(k, dim)`` (k products in one vmapped call).

        Reverse-over-reverse (:class:`Linearization`; H is symmetric) in the exact mode: measured faster
        than forward-over-reverse on CPU (benchmarks/RESULTS.md) and, unlike it, it works on every
        layer; central differences of gradients in the ``fd`` mode.
        """
        w = self.w0 if w is None else self._check_w(w)
        v = self._check_w(v)
        if self.resolve_hvp_mode() == "fd":
            return self._fd_hvp(v, w)
        return self._exact_hvp(v, w)

    def fd_accuracy(self, w: torch.Tensor | None = None, samples: int = 64, seed: int = 0) -> float | None:
        """The relative difference ``|H v - H_fd v| / |H v|`` on one random probe ``v`` over the first
        ``samples`` samples, where an exact product is possible (else None); stored in ``hvp_info``."""
        w = self.w0 if w is None else self._check_w(w)
        small = self.subset(torch.arange(min(samples, self.n)))
        v = torch.randn(self.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        v = (v / v.norm()).to(self.device, self.dtype)
        try:
            exact = small._exact_hvp(v, w)
        except (RuntimeError, NotImplementedError):
            self.hvp_info["fd_rel_error"] = None
            return None
        approx = small._fd_hvp(v, w)
        rel = float((exact - approx).double().norm() / exact.double().norm().clamp_min(1e-300))
        self.hvp_info["fd_rel_error"] = rel
        self.hvp_info["fd_probe_samples"] = small.n
        return rel

    def hvp_operator(self, w: torch.Tensor | None = None, reserved: float = 0.0, cache: bool | None = None) -> Callable:
        """``matvec(v) = H(w) v`` for repeated use at one point (Lanczos, Hutchinson).

        The per-batch linearizations are built once and reused, so that each product costs one
        backward pass instead of a gradient plus a backward pass, when they fit the memory budget
        beside the caller's ``reserved`` bytes (:meth:`cache_fits`: the measured bytes of the first
        batch's linearization times the number of batches); otherwise each product rebuilds them one
        batch at a time (:meth:`hvp`). ``cache`` True or False forces either. A block of vectors is
        multiplied in vmapped groups of :meth:`rows_per_product` rows. In the ``fd`` mode every
        product is two split gradients.
        """
        w = self.w0 if w is None else self._check_w(w)
        if self.resolve_hvp_mode() == "fd":
            return lambda v: self.hvp(v, w)
        self.require_batch()
        if cache is None:
            cache = self.cache_fits(reserved)
        self.hvp_info["cached"] = bool(cache)
        if not cache:
            return lambda v: self._exact_hvp(self._check_w(v), w, reserved)
        lins = []
        with second_order_kernels():
            for i, (xb, yb, wt) in enumerate(self.batches()):
                with self._guard(i, xb, derivatives=True):
                    lins.append((wt, Linearization(self, w, xb, yb)))
        held = reserved + self.batch_bytes() * len(lins)

        def matvec(v: torch.Tensor) -> torch.Tensor:
            v = self._check_w(v)
            out = torch.zeros(v.shape, dtype=self.acc_dtype, device=self.device)
            rows = self.rows_per_product(v, held)
            with second_order_kernels():
                for wt, lin in lins:
                    self._pull_block(lin, v, wt, out, rows)
            return self._reduce(out)

        return matvec

    # ------------------------------------------------------------------ memory
    @property
    def memory(self) -> MemoryBudget:
        """The :class:`~flatscope.memory.MemoryBudget` every analysis of this objective consults
        (``memory_budget``: bytes, a size such as ``"4GB"``, or a budget; default a fraction of the
        device's free memory, taken at first use). It decides how work is cut, never a result."""
        if self._memory is None:
            self._memory = MemoryBudget(self._memory_budget, self.device)
        return self._memory

    def memory_on(self, device: str | torch.device) -> MemoryBudget:
        """The budget for vectors kept on ``device``: :attr:`memory` on the objective's own device, else
        a budget of that device (the same ``memory_budget``, or its free memory's default share)."""
        device = torch.device(device)
        if device == self.device:
            return self.memory
        if getattr(self, "_memory_other", None) is None or self._memory_other.device != device:
            self._memory_other = MemoryBudget(self.memory.limit if self.memory.explicit else None, device)
        return self._memory_other

    def batch_bytes(self, linearization: bool = True) -> int:
        """Measured bytes of one batch (:func:`flatscope.memory.batch_cost`, once per objective): the
        linearization a cached Hessian-vector product keeps, or (``False``) one training step's
        activations and gradient. Without a double backward: twice the training step."""
        if linearization not in self._batch_bytes:
            try:
                self._batch_bytes[linearization] = batch_cost(self, create_graph=linearization)
            except (RuntimeError, NotImplementedError):
                self._batch_bytes[linearization] = 2 * batch_cost(self, create_graph=False)
        return self._batch_bytes[linearization]

    def require_batch(self) -> int:
        """One batch's linearization (bytes), refused with one line if it alone exceeds the budget."""
        if self.memory.limit == math.inf:
            return 0
        one = self.batch_bytes()
        self.memory.require(
            one,
            f"one batch of {min(self.batch_size, self.n)} samples (its Hessian-vector product's linearization, measured)",
            hint="lower --batch-size or raise --memory-budget",
        )
        return one

    def cache_fits(self, reserved: float = 0.0) -> bool:
        """Whether every batch's linearization, plus one batch for the product itself, fits the budget
        beside ``reserved`` bytes (never a batch count)."""
        if self.memory.limit == math.inf:
            return True
        n_batches = sum(1 for c in self._batch_counts() if c)
        return self.memory.fits(self.batch_bytes() * (n_batches + 1), reserved)

    def rows_per_product(self, v: torch.Tensor, reserved: float = 0.0) -> int:
        """How many rows of ``v`` one vmapped product may carry beside ``reserved`` bytes: each row
        costs four vectors (its result row, a weight's two terms, and their sum, which autograd forms
        out of place under vmap) plus one training step's activations. Measured
        (benchmarks/bench_hvp_memory.py): 4.1 vectors per vmapped row on a 10^7-parameter MLP and
        Transformer (3.2 row by row on the MLP, see :mod:`flatscope.linear_rule`)."""
        k = 1 if v.dim() == 1 else v.shape[0]
        if k == 1 or self.memory.limit == math.inf:
            return k
        each = self.batch_bytes(linearization=False) + 4 * v.shape[-1] * v.element_size()
        return self.memory.count(each, reserved, most=k)

    def minibatch_loss_and_grad(self, w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and gradient on the samples ``idx`` of this split (no reduction across ranks)."""
        w = self._check_w(w)
        g, loss = grad_and_value(self._batch_loss)(w, *self.minibatch(idx))
        return loss.detach(), g

    # ------------------------------------------------------------------ data parallel
    def shard(self, rank: int | None = None, world: int | None = None) -> "Objective":
        """Keep only this rank's contiguous shard of the split; all-reduce every sum.

        Losses, accuracy counts, gradients and HVPs are summed over ranks with weights
        ``count_batch / count_total`` (the global count), so the result equals the single-process
        value up to floating-point summation order. Under torchrun, ``Run.objective`` calls this.
        """
        from . import distributed

        rank = distributed.rank() if rank is None else rank
        world = distributed.world_size() if world is None else world
        start, stop = distributed.shard_range(self.n, rank, world)
        self._n_total = self.n
        self.source = self.source.shard(start, stop)
        self.n = stop - start
        self._counts, self._count_total = None, None
        if world > 1:
            self._reduce = distributed.all_reduce_sum
        return self

    # ------------------------------------------------------------------ BatchNorm
    def has_batchnorm(self) -> bool:
        return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules())

    @torch.no_grad()
    def recompute_bn(self, w: torch.Tensor, X=None) -> dict:
        """Buffers with BatchNorm statistics recomputed at ``w`` over the inputs ``X`` (a tensor or tree
        of inputs, an :class:`Objective` or a :class:`~flatscope.sources.Source`; default: this split).

        Running mean and variance are reset and re-estimated with ``momentum=None`` (torch's
        cumulative average over batches) in train mode; other buffers are kept.
        """
        m = copy.deepcopy(self.model)
        torch.nn.utils.vector_to_parameters(self._check_w(w), [p for p in m.parameters() if p.requires_grad])
        bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        m.train()
        if X is None:
            X = self
        if isinstance(X, Objective):
            for xb, _, _ in X.batches():
                run_module(m, xb, self.output)
        elif isinstance(X, Source):
            for xb, _ in X.batches(self.batch_size):
                run_module(m, to_device(xb, self.device, self.dtype), self.output)
        else:
            from .sources import tree_len, tree_map

            X = to_device(X, self.device, self.dtype)
            n = tree_len(X)
            for start in range(0, n, self.batch_size):
                run_module(m, tree_map(lambda t: t[start : start + self.batch_size], X), self.output)
        return {n: b.detach().clone() for n, b in m.named_buffers()}


class PointEvaluator:
    """:meth:`Objective.evaluate` at one point after another, with less fixed cost per point.

    The weights of each point are put into a private copy of the objective's module as views
    (``param.data = w[slice].view(shape)``, no copy) and the module is called directly, instead of
    unflattening ``w`` and going through ``functional_call`` at every point. Batches, weights,
    float64 accumulation and (under torchrun) the reduction are those of :meth:`Objective.evaluate`,
    and the values agree with it bit for bit (tested); in one process the sums are kept in Python
    floats (the same IEEE float64 operations, fewer tiny tensor ops). Neither the objective nor the
    user's model is touched. Landscape grids and local-energy draws evaluate points through it.
    """

    def __init__(self, obj: "Objective"):
        self.obj = obj
        self.model = copy.deepcopy(obj.model)
        named = dict(self.model.named_parameters())
        self.params = [
            (named[n], o, k, shape)
            for n, o, k, shape in zip(obj.layout.names, obj.layout.offsets, obj.layout.numels, obj.layout.shapes)
        ]
        for p, *_ in self.params:
            p.requires_grad_(False)
        self.buffers = dict(self.model.named_buffers())
        self._own_buffers = True

    def _set_buffers(self, buffers: dict | None) -> None:
        if buffers is None and self._own_buffers:
            return
        src = self.obj.buffers if buffers is None else buffers
        for name, b in self.buffers.items():
            b.copy_(src[name])
        self._own_buffers = buffers is None

    @torch.no_grad()
    def __call__(self, w: torch.Tensor, buffers: dict | None = None) -> tuple[float, float]:
        """(mean loss, accuracy) at ``w`` (flat, on the objective's device and dtype)."""
        obj = self.obj
        for p, o, k, shape in self.params:
            p.data = w[o : o + k].view(shape)
        self._set_buffers(buffers)
        if obj.n_total != obj.n:  # a data-parallel shard: tensor sums, reduced across ranks
            loss = torch.zeros((), dtype=torch.float64, device=obj.device)
            correct = torch.zeros((), dtype=torch.float64, device=obj.device)
            for xb, yb, wt in obj.batches():
                out = run_module(self.model, xb, obj.output)
                loss += wt * obj.loss_fn.mean(out, yb).to(torch.float64)
                correct += obj._score(out, yb)
            return float(obj._reduce(loss)), float(obj._reduce(correct)) / obj.count_total
        loss, correct = 0.0, 0.0
        for xb, yb, wt in obj.batches():
            out = run_module(self.model, xb, obj.output)
            loss += wt * float(obj.loss_fn.mean(out, yb))
            correct += float(obj._score(out, yb))
        return loss, correct / obj.count_total


class Linearization:
    """One batch's gradient at ``w`` with its graph kept (``create_graph``), so that each
    Hessian-vector product is one backward pass through it: ``pull(v, wt, out)`` adds
    ``wt * H_batch v`` to ``out`` for ``v`` of shape ``(dim,)`` or ``(k, dim)`` (rows in groups of
    ``rows``, each group one backward pass under ``torch.func.vmap``, or with ``vmapped=False`` one
    row at a time; :meth:`Objective._pull_block` chooses). The leaves are views of
    ``w``; results are added into ``out`` tensor by tensor, so no flat copy of them is made. The
    gradient itself is not kept: the products start from its graph's edges (``GradientEdge``), which
    frees one parameter vector per cached batch (benchmarks/bench_hvp_memory.py)."""

    def __init__(self, obj: Objective, w: torch.Tensor, x, y):
        with linear_rule():  # one weight-sized temporary less per product (flatscope.linear_rule)
            self.leaves, loss = obj._leaf_loss(w, x, y)
        grads = torch.autograd.grad(loss, self.leaves, create_graph=True, allow_unused=True)
        # a gradient that is None or constant has a zero derivative: nothing to pull back through it
        self.which = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self.edges = [get_gradient_edge(grads[i]) for i in self.which]
        del grads
        self.numels = obj.layout.numels
        self.offsets = obj.layout.offsets
        self.shapes = obj.layout.shapes

    def pull(
        self, v: torch.Tensor, wt: float, out: torch.Tensor, rows: int | None = None, vmapped: bool = True
    ) -> None:
        if not self.edges or v.numel() == 0:
            return
        if v.dim() == 1:
            self._pull(v, wt, out)
        elif not vmapped or v.shape[0] == 1:  # one row needs no vmap (whose buffers sum out of place)
            for r in range(v.shape[0]):
                self._pull(v[r], wt, out[r])
        else:
            rows = rows or v.shape[0]
            for s in range(0, v.shape[0], rows):
                self._pull(v[s : s + rows], wt, out[s : s + rows])

    def _backward(self, *cot: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(self.edges, self.leaves, cot, retain_graph=True, materialize_grads=True)

    def _pull(self, v: torch.Tensor, wt: float, out: torch.Tensor) -> None:
        lead = tuple(v.shape[:-1])
        parts = torch.split(v, self.numels, dim=-1)
        cot = [parts[i].reshape(lead + tuple(self.shapes[i])) for i in self.which]
        if lead:  # torch.func's vmap over the backward pass: measured faster than is_grads_batched
            res = vmap(self._backward)(*cot)
        else:
            res = self._backward(*cot)
        for r, o, m, shape in zip(res, self.offsets, self.numels, self.shapes):
            # r may be a transposed view: add it through a view of out, never a copy
            out[..., o : o + m].view(lead + shape).add_(r, alpha=wt)


def exact_hessian(obj: Objective, w: torch.Tensor | None = None) -> torch.Tensor:
    """Dense Hessian of the split loss, reverse-over-reverse (``jacrev`` of ``grad``; small models only,
    for tests). ``torch.func.hessian`` (forward-over-reverse) is not used: through
    ``scaled_dot_product_attention`` it returns an asymmetric matrix on torch 2.13."""
    from torch.func import jacrev

    w = obj.w0 if w is None else obj._check_w(w)
    H = torch.zeros(obj.dim, obj.dim, dtype=w.dtype, device=w.device)
    with second_order_kernels():
        for xb, yb, wt in obj.batches():
            H += wt * jacrev(grad(obj._batch_loss))(w, xb, yb)
    return H
