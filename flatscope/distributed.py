"""Running under ``torchrun`` (torch.distributed), the engine PyTorch users already operate.

When flatscope is started by ``torchrun`` (the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables are
set), :func:`init_from_env` joins the process group (NCCL on CUDA, gloo on CPU) with a timeout, so
a rank that dies brings the job down with an error instead of a hang. Then

- every rank uses the same seeds, hence the same random directions, probes and noise;
- :meth:`flatscope.objective.Objective.shard` gives each rank a contiguous shard of the split and
  all-reduces loss, accuracy counts, gradients and HVPs, normalized by the global sample count, so
  every analysis built on the objective is data-parallel without change;
- only rank 0 prints, writes HDF5 and plots.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .errors import FlatscopeError

DEFAULT_TIMEOUT_S = 300


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
    try:
        dist.init_process_group(backend=backend, timeout=timeout)
    except Exception as exc:
        raise FlatscopeError(f"cannot join the torchrun process group ({backend}): {str(exc).splitlines()[0]}") from None


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


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
