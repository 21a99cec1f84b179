"""Two gloo ranks on CPU for the tests: a free port, the group's lifetime, and a spawned pair.

A worker is a module-level function ``worker(rank, *args, queue)`` (spawn pickles it by its qualified
name) that does its work inside ``with gloo(rank, world, port):`` and puts ``(rank, result)`` on
``queue``, once per rank. Results travel by value only if they hold no torch tensors (those would
travel as shared memory, gone with the worker): send ``tensor.numpy()``.
"""

import contextlib
import datetime
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo(rank: int, world: int, port: int, timeout_s: float = 120) -> Iterator[None]:
    """Join the gloo group at ``127.0.0.1:port``; on exit, barrier (only if the body succeeded) and leave it."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
        dist.barrier()  # both ranks done with gloo before either tears it down (avoids an abort at exit)
    finally:
        dist.destroy_process_group()


def run_pair(worker: Callable, args: tuple, while_waiting: Callable[[], Any] | None = None) -> tuple[Any, dict]:
    """Spawn ``worker(rank, *args, queue)`` on 2 ranks; meanwhile run ``while_waiting()`` here.

    Returns ``(while_waiting(), {rank: result})``. The queue is read by a thread from the start (a large
    result would otherwise fill the pipe and block its worker), so that a worker's exception is raised
    by ``procs.join()`` here instead of a wait on the queue.
    """
    queue = mp.get_context("spawn").SimpleQueue()
    procs = mp.start_processes(worker, args=(*args, queue), nprocs=WORLD, join=False, start_method="spawn")
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(queue.get() for _ in range(WORLD)), daemon=True)
    reader.start()
    try:
        mine = while_waiting() if while_waiting is not None else None
        while not procs.join():  # a worker's exception is raised here, instead of a wait on the queue
            pass
    except BaseException:
        for p in procs.processes:  # the parent failed: no worker left behind (procs.join() did this for a worker)
            if p.is_alive():
                p.terminate()
            p.join()
        for _ in range(WORLD):
            queue.put(None)  # and no reader left waiting
        raise
    reader.join(30)
    if len(got) != WORLD:
        raise RuntimeError(f"{WORLD - len(got)} of {WORLD} ranks exited without putting a result")
    return mine, dict(got)
