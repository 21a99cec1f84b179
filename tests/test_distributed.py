"""Data-parallel objective and CLI under torch.distributed (gloo, 2 CPU processes)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import SAMPLES
from ranks import free_port, gloo, run_pair


def _worker(rank, world, port, path, fail_rank, queue):
    from flatscope.checkpoint import load_checkpoint
    from flatscope.data import load_data
    from flatscope.objective import Objective

    torch.set_num_threads(1)
    with gloo(rank, world, port, timeout_s=20):
        if rank == fail_rank:
            raise RuntimeError(f"rank {rank} failed on purpose")
        ck = load_checkpoint(path)
        X, y = load_data(ck.data_spec).split("train")
        obj = Objective(ck.model, X, y, batch_size=300, dtype=torch.float64).shard()
        v = torch.randn(2, obj.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        loss, acc = obj.evaluate()
        _, g = obj.loss_and_grad()
        hv = obj.hvp_operator()(v)
        queue.put((rank, (loss, acc, g.numpy(), hv.numpy(), obj.n)))  # numpy: pickled by value


@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_sharded_objective_equals_single_process(name):
    from flatscope.checkpoint import load_checkpoint
    from flatscope.data import load_data
    from flatscope.objective import Objective

    path = str(SAMPLES / f"{name}-sgd.pt")
    _, multi = run_pair(_worker, (2, free_port(), path, -1))
    loss, acc, g, hv, n_local = multi[0]
    g, hv = torch.from_numpy(g), torch.from_numpy(hv)
    ck = load_checkpoint(path)
    X, y = load_data(ck.data_spec).split("train")
    ref = Objective(ck.model, X, y, batch_size=300, dtype=torch.float64)
    v = torch.randn(2, ref.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert n_local == 674  # 1347 samples: shards of 674 and 673
    assert loss == pytest.approx(ref.evaluate()[0], rel=1e-10) and acc == ref.evaluate()[1]
    torch.testing.assert_close(g, ref.grad(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(hv, ref.hvp(v), rtol=1e-9, atol=1e-12)


def test_a_failing_rank_brings_the_job_down_instead_of_hanging():
    t0 = time.time()
    with pytest.raises(Exception, match="failed on purpose"):
        run_pair(_worker, (2, free_port(), str(SAMPLES / "mlp-sgd.pt"), 1))
    assert time.time() - t0 < 60


def test_torchrun_cli_prints_once_and_matches_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ck = str(SAMPLES / "cnn-sgd.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "flatscope", "info", ck, "--json", "--batch-size", "200"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    multi = json.loads(p.stdout)  # exactly one JSON object: only rank 0 printed
    single = json.loads(subprocess.run([sys.executable, "-m", "flatscope", "info", ck, "--json"],
                                       capture_output=True, text=True, env=env, timeout=300).stdout)
    for split in ("train", "test"):
        assert multi["metrics"][split]["loss"] == pytest.approx(single["metrics"][split]["loss"], rel=1e-5)
        assert multi["metrics"][split]["accuracy"] == single["metrics"][split]["accuracy"]
