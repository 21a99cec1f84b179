"""Running under ``torchrun`` (torch.distributed), the engine PyTorch users already operate.

When flatscope is started by ``torchrun`` (the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables are
set), :func:`init_from_env` joins the process group (NCCL on CUDA, gloo on CPU) with a timeout, so
a rank that dies brings the job down with an error instead of a hang. Then

- every rank uses the same seeds, hence the same random directions, probes and noise;
- :meth:`flatscope.objective.Objective.shard` gives each rank a contiguous shard of the split and
  all-reduces loss, accuracy counts, gradients and HVPs, normalized by the global sample count, so
  every analysis built on the objective is data-parallel without change;
- only rank 0 prints, writes HDF5 and plots;
- ``landscape`` and ``local-energy`` can instead deal their points to the ranks
  (``--parallel points``, :func:`map_rounds`, :func:`all_gather_objects`), every rank with the
  whole data; ``train --opt rsgd`` puts replicas on ranks and ``--opt esgd`` splits minibatches
  (see :mod:`flatscope.methods.rsgd` and :mod:`flatscope.methods.esgd`).

Whatever a rank decides from its own shard (a batching mode from its shard's size) must be
rank 0's decision broadcast to all (:func:`broadcast_object`, :func:`on_main`): ranks that take
different code paths issue different collectives and fail.
"""

from __future__ import annotations

import datetime
import os
from typing import Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from .errors import FlatscopeError

DEFAULT_TIMEOUT_S = 300
_OWNED = False  # whether flatscope created the process group (then it also tears it down)
T = TypeVar("T")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> None:
    """Join the torchrun process group if launched by torchrun (idempotent)."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return
    if not dist.is_available():
        raise FlatscopeError("this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=float(os.environ.get("FLATSCOPE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    global _OWNED
    try:
        dist.init_process_group(backend=backend, timeout=timeout)
        _OWNED = True
    except Exception as exc:
        raise FlatscopeError(
            f"cannot join the torchrun process group ({backend}): {str(exc).splitlines()[0]}"
        ) from None


def local_device(device: torch.device) -> torch.device:
    """Under torchrun on CUDA each rank takes the GPU of its LOCAL_RANK."""
    if active() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if not active():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shard_range(n: int, r: int, world: int) -> tuple[int, int]:
    """Contiguous shard ``[start, stop)`` of ``n`` samples for rank ``r`` (sizes differ by at most 1)."""
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def broadcast_object(obj, src: int = 0):
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list | None:
    """Every rank's ``obj`` on rank 0 (``None`` elsewhere)."""
    if not active():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` on every rank, in rank order."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 only, its value broadcast to every rank.

    A :class:`FlatscopeError` raised by ``fn`` on rank 0 is raised on every rank, so that bad
    input found by rank 0 (say, a missing results file to resume) stops all ranks with the same
    one-line error instead of leaving them waiting in the next collective.
    """
    if not active():
        return fn()
    box = None
    if is_main():
        try:
            box = ("ok", fn())
        except FlatscopeError as exc:
            box = ("error", str(exc))
    kind, value = broadcast_object(box)
    if kind == "error":
        raise FlatscopeError(value)
    return value


def map_rounds(items: Sequence, fn: Callable) -> Iterator[tuple[int, object]]:
    """Split ``items`` round-robin across ranks and bring the values of ``fn`` to rank 0.

    In round ``r`` rank ``k`` computes ``fn(items[r * world + k])`` (nothing in the last round when
    the items run out); the values are gathered to rank 0 once per round. Rank 0 gets ``(i, value)``
    for every ``i`` in order, one round at a time, so it can save results as they arrive; the
    other ranks get ``(i, value)`` for their own items only. In one process this is
    ``((i, fn(item)) for i, item in enumerate(items))``.
    """
    world, me = world_size(), rank()
    for first in range(0, len(items), world):
        i = first + me
        value = fn(items[i]) if i < len(items) else None
        if world == 1:
            yield i, value
            continue
        gathered = gather_objects((i, value))
        if gathered is None:
            if i < len(items):
                yield i, value
            continue
        for j, v in gathered:
            if j < len(items):
                yield j, v


def barrier() -> None:
    if active():
        dist.barrier()


def finish() -> None:
    """End a successful run: wait for every rank, then tear the process group down.

    Leaving it to interpreter exit lets one rank destroy its communicator threads while another is
    still using them, which aborts the process (seen as SIGABRT, exit -6, under torchrun).
    """
    global _OWNED
    if active() and _OWNED:
        dist.barrier()
        dist.destroy_process_group()
        _OWNED = False


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
