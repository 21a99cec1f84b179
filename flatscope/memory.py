"""Memory: sizes, free memory, and the budget every analysis consults (issue 13).

The bound flatscope keeps: for ``n`` parameters and an analysis that keeps ``k`` parameter vectors
(a Lanczos basis, a Hutch++ sketch, a chunk of landscape points),

    peak  <=  one training step  +  (k + c) * n * bytes

where *one training step* is the model, the data and one batch's forward and backward pass, and
``c`` is a small constant (the few work vectors of an iteration). Every term is sized here:

- :func:`vector_bytes`: one parameter vector in a dtype;
- :func:`batch_cost`: the bytes autograd keeps for one batch (its activations; with
  ``create_graph`` the linearization a cached Hessian-vector product reuses), *measured* by
  counting the tensors it saves;
- :func:`available_bytes`: free memory of a device (CUDA: ``torch.cuda.mem_get_info``; CPU:
  ``MemAvailable`` of /proc/meminfo, capped by the cgroup's limit);
- :class:`MemoryBudget`: the bytes an analysis may add on top of what is resident when it starts
  (``--memory-budget``; default :data:`DEFAULT_FRACTION` of the free memory). It never changes a
  result, only how work is cut: whether linearizations are cached, how many vectors one product
  carries, how many points one call evaluates, where a Lanczos basis restarts.
"""

from __future__ import annotations

import math
import os
import re

import torch

from .errors import FlatscopeError

DEFAULT_FRACTION = 0.5  # of the free memory when the budget is made: other processes share a CPU's RAM
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str | int | float) -> int:
    """Bytes in ``text``: ``4GB`` (10^9), ``512MiB`` (2^20), ``2G`` (2^30, as ``ulimit`` and Docker read
    it), ``1.5GiB``, or a bare number of bytes."""
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise FlatscopeError(f"--memory-budget {text!r}: give a size such as 4GB, 512MiB or 2G")
        value, unit = float(m.group(1)), m.group(2).lower()
    out = value * _UNITS[unit]
    if not (math.isfinite(out) and out >= 1):
        raise FlatscopeError(f"--memory-budget {text!r} must be a positive size")
    return int(out)


def format_size(n: float) -> str:
    """``n`` bytes in binary units, three significant digits (``1.23 GiB``)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def vector_bytes(n: int, dtype: torch.dtype) -> int:
    """Bytes of one ``n``-entry vector of ``dtype``."""
    return int(n) * torch.empty((), dtype=dtype).element_size()


def _cgroup_free() -> int | None:
    """Bytes left under this cgroup's memory limit (v2 ``memory.max``, v1 ``limit_in_bytes``), or None."""
    for limit_f, usage_f in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_f) as f:
                limit = f.read().strip()
            with open(usage_f) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**60:
            return None
        return max(int(limit) - usage, 0)
    return None


def available_bytes(device: str | torch.device = "cpu") -> int | None:
    """Free memory of ``device`` in bytes (None if unknown): CUDA ``mem_get_info``; CPU the kernel's
    ``MemAvailable`` (free plus reclaimable page cache), capped by the cgroup's remaining limit."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    cg = _cgroup_free()
    return min(free, cg) if cg is not None else free


def peak_rss_bytes() -> int | None:
    """This process's resident-set high-water mark (``VmHWM``; Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def saved_storages(roots) -> dict[int, int]:
    """``{storage pointer: bytes}`` of every tensor the autograd graph below ``roots`` (tensors or
    nodes) keeps for its backward pass, each storage once: the ``_saved_*`` attributes of built-in
    nodes and the ``saved_tensors`` of custom Functions. Walking the graph, unlike
    ``saved_tensors_hooks``, adds no reference from a node to its own saved outputs (a cycle that
    outlives the graph)."""
    seen: dict[int, int] = {}
    stack = [r.grad_fn if isinstance(r, torch.Tensor) else r for r in roots]
    visited: set[int] = set()
    names: dict[type, list[str]] = {}
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        kind = type(node)
        if kind not in names:
            names[kind] = [a for a in dir(node) if a.startswith("_saved_")]
        tensors = []
        for a in names[kind]:
            try:
                tensors.append(getattr(node, a))
            except RuntimeError:  # freed, or not a tensor that can be unpacked
                continue
        if hasattr(node, "saved_tensors"):
            try:
                tensors.extend(node.saved_tensors)
            except RuntimeError:
                pass
        for t in tensors:
            for x in t if isinstance(t, (tuple, list)) else (t,):
                if isinstance(x, torch.Tensor):
                    st = x.untyped_storage()
                    seen[st.data_ptr()] = st.nbytes()
        stack.extend(nxt for nxt, _ in node.next_functions)
    return seen


def batch_cost(obj, create_graph: bool = True) -> int:
    """Bytes autograd keeps for the objective's first batch at ``obj.w0``, measured.

    ``True``: the linearization a cached Hessian-vector product keeps
    (:class:`flatscope.objective.Linearization`, built the way the products build it): the storages
    its graph saves, leaving out those already resident (the weights, the inputs, the buffers).
    ``False``: one training step's saved activations plus its gradient.
    """
    from .objective import Linearization, second_order_kernels

    x, y, _ = next(iter(obj.batches()))
    resident = [obj.w0, *obj.buffers.values()]
    leaves = x.values() if isinstance(x, dict) else (x if isinstance(x, (tuple, list)) else [x])
    resident += [t for t in leaves if isinstance(t, torch.Tensor)]
    with second_order_kernels():
        if create_graph:  # it keeps its graph, not the gradient
            seen = saved_storages([e.node for e in Linearization(obj, obj.w0, x, y).edges])
            held = []
        else:
            params, loss = obj._leaf_loss(obj.w0, x, y)
            seen = saved_storages([loss])
            held = [g for g in torch.autograd.grad(loss, params, allow_unused=True) if g is not None]
    for t in resident:
        seen.pop(t.untyped_storage().data_ptr(), None)
    for g in held:
        seen[g.untyped_storage().data_ptr()] = g.untyped_storage().nbytes()
    return sum(seen.values())


class MemoryBudget:
    """The bytes an analysis may add on top of what is resident when it starts.

    ``limit`` bytes (``--memory-budget``) or, when None, :data:`DEFAULT_FRACTION` of the device's free
    memory at construction (unbounded if that is unknown). The analyses ask it three things:

    - :meth:`require`: refuse, with one line that says what is needed, work whose smallest unit does
      not fit (one batch's pass, one vector per product, a basis of ``k + 2`` vectors);
    - :meth:`count`: how many items of ``each`` bytes fit beside ``reserved`` ones (at least 1);
    - :meth:`fits`: whether ``nbytes`` fit beside ``reserved``.
    """

    def __init__(self, limit: int | str | None = None, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.explicit = limit is not None
        if limit is not None:
            self.limit: float = float(parse_size(limit))
        else:
            free = available_bytes(self.device)
            self.limit = DEFAULT_FRACTION * free if free is not None else math.inf

    def describe(self) -> str:
        if self.explicit:
            return f"--memory-budget {format_size(self.limit)}"
        return f"the default memory budget ({DEFAULT_FRACTION:g} of the free memory: {format_size(self.limit)})"

    def fits(self, nbytes: float, reserved: float = 0.0) -> bool:
        return reserved + nbytes <= self.limit

    def count(self, each: float, reserved: float = 0.0, most: int | None = None) -> int:
        """How many items of ``each`` bytes fit beside ``reserved`` bytes: at least 1, at most ``most``."""
        if self.limit == math.inf or each <= 0:
            k = most if most is not None else 2**62
        else:
            k = int((self.limit - reserved) // each)
        k = max(k, 1)
        return min(k, most) if most is not None else k

    def require(self, nbytes: float, what: str, hint: str = "") -> None:
        """Raise :class:`FlatscopeError` when ``nbytes`` (the least ``what`` can run with) exceed the budget."""
        if nbytes > self.limit:
            raise FlatscopeError(
                f"{what} needs {format_size(nbytes)}, more than {self.describe()}" + (f"; {hint}" if hint else "")
            )


def unbounded() -> MemoryBudget:
    """A budget with no limit (library calls that pass none keep their old behaviour)."""
    b = MemoryBudget(limit=None)
    b.limit, b.explicit = math.inf, False
    return b


WORK_VECTORS = 8  # work vectors per block row of an iteration (products, their float64 copies, projections)


def basis_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of Lanczos, SLQ and trace vectors: float64 for a float64 model, float32 otherwise.

    A float32 basis has unit roundoff 6e-8, far below the default residual tolerance 1e-5 and below the
    error of a float32 Hessian-vector product itself, provided its inner products are accumulated in
    float64 (:class:`flatscope.linalg.VectorSpace` does: summed in float32, a length-n inner product is
    off by ~eps sqrt(n), 1e-4 at n = 10^6, which spoilt orthogonality and biased Ritz values by 5e-4);
    the small projected eigenproblems and the true residuals stay float64 (``tests/test_memory.py`` checks the residuals and eigenvalues against a
    float64 basis)."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def lanczos_bytes(m: int, k: int, b: int, vec: int) -> int:
    """Bytes of :func:`flatscope.linalg.lanczos` with a basis of ``m`` vectors of ``vec`` bytes: the
    buffer (``m + b`` rows), the ``k`` returned vectors and the work vectors of a block."""
    return (m + b + k + WORK_VECTORS * b) * vec


def lanczos_default_basis(k: int, dim: int, max_iter: int | None) -> int:
    """:func:`flatscope.linalg.lanczos`'s own default ``max_basis``."""
    mi = max_iter if max_iter is not None else max(300, 30 * k)
    return max(3 * k + 30, min(mi, 2**26 // max(dim, 1)))


def plan_lanczos(
    budget: MemoryBudget,
    dim: int,
    k: int,
    b: int,
    vec: int,
    reserved: float,
    max_iter: int | None,
    what: str,
    beside: str = "",
) -> int:
    """The ``max_basis`` of a Lanczos run for ``k`` eigenpairs in blocks of ``b``: its default, lowered to
    what fits the budget beside ``reserved`` bytes; refused if not even ``k + 2 b`` vectors fit."""
    default = min(dim, lanczos_default_basis(k, dim, max_iter))
    least = min(dim, k + 2 * b)
    budget.require(
        reserved + lanczos_bytes(least, k, b, vec),
        f"{what} (a Lanczos basis of at least {least} vectors of {format_size(vec)}{beside})",
        hint="raise --memory-budget, ask for fewer eigenvalues or lower --batch-size",
    )
    fit = budget.count(vec, reserved + lanczos_bytes(0, k, b, vec), most=default)
    return max(least, fit)


def points_per_call(obj, requested: int, point_bytes: int, vectorized: bool, reserved: float = 0.0) -> int:
    """How many points (perturbed weight vectors) one call may evaluate: at most ``requested``, as many
    as fit ``obj.memory`` beside ``reserved`` bytes. A point costs ``point_bytes`` (its vectors) and, when
    the call is ``vectorized`` (vmap), one batch's activations (bounded by the measured training
    step, :meth:`Objective.batch_bytes`). Refused if not even one point fits. The values do not depend
    on the count (up to rounding in a vmapped call)."""
    budget = obj.memory
    if budget.limit == math.inf:
        return int(requested)
    act = obj.batch_bytes(linearization=False)
    each = point_bytes + (act if vectorized else 0)
    budget.require(
        reserved + each + (0 if vectorized else act),
        f"one point ({format_size(point_bytes)} of vectors and {format_size(act)} for one batch of "
        f"{min(obj.batch_size, obj.n)} samples, measured)",
        hint="lower --batch-size or raise --memory-budget",
    )
    return budget.count(each, reserved + (0 if vectorized else act), most=int(requested))
