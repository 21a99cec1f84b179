"""The default number of torch CPU threads: never much worse than the best choice on a shared CPU.

torch's own default is one thread per physical core. On a machine whose cores are busy with other
processes, its OpenMP threads wait for one another at every parallel region while the scheduler
hands their cores to others, and a run can become many times slower than with one thread
(benchmarks/RESULTS.md, "Threads"). flatscope's default therefore takes only the cores that are
idle:

    threads = max(1, min(torch's default, usable cores, round(usable cores - load)))

with ``load`` the 1-minute load average (``os.getloadavg``) and the usable cores those of this
process's CPU affinity. On an idle machine it is torch's default; on a machine as busy as it has
cores it is 1. An explicit ``--threads N`` or an ``OMP_NUM_THREADS`` in the environment (torchrun
sets it to 1 for several processes per node) is always obeyed instead.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except OSError:
            pass
    return max(1, os.cpu_count() or 1)


def default_threads(torch_default: int, *, cores: int | None = None, load: float | None = None) -> int:
    """The thread count flatscope uses when neither --threads nor OMP_NUM_THREADS is given."""
    cores = usable_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):  # no load average on this OS: torch's choice
            return max(1, min(torch_default, cores))
    idle = int(cores - load + 0.5)
    return max(1, min(torch_default, cores, idle))


def choose_threads(requested: int | None, torch_default: int) -> int | None:
    """The thread count to set: ``requested``; else None when OMP_NUM_THREADS rules; else the default."""
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return default_threads(torch_default)
