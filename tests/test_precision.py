"""bfloat16 and float16 models: forward and backward in the low precision, sums in float32, the
Lanczos recurrence in float64. The eigenvalues move by the rounding of the weights and of every
product, so the tolerance is a multiple of the format's machine epsilon times lambda_max."""

import json

import h5py
import numpy as np
import pytest
import torch

from flatscope.analyses.hessian import hessian_analysis
from flatscope.checkpoint import load_checkpoint
from flatscope.data import load_data
from flatscope.objective import Objective


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_top_eigenvalues_agree_with_float32(samples, dtype):
    ck = load_checkpoint(str(samples / "mlp-sgd.pt"))
    X, y = load_data(ck.data_spec).split("train")
    ref = hessian_analysis(Objective(ck.model, X[:400], y[:400]), top=5, density=False, trace_probes=4)
    obj = Objective(ck.model, X[:400], y[:400], dtype=dtype)
    assert obj.acc_dtype == torch.float32 and obj.grad().dtype == torch.float32
    low = hessian_analysis(obj, top=5, density=False, trace_probes=4)
    eps = torch.finfo(dtype).eps            # 2^-7 for bfloat16, 2^-10 for float16
    err = np.abs(low.top.eigenvalues - ref.top.eigenvalues) / ref.top.eigenvalues[0]
    assert err.max() < 16 * eps, err        # measured: 7.6 eps for bfloat16, 7.8 eps for float16 (digits MLP, 400 samples)
    assert err.max() > 0                    # it did run in the low precision


def test_cli_bfloat16_records_the_dtype(cli, samples, tmp_path):
    r = cli(["hessian", samples / "mlp-sgd.pt", "--dtype", "bfloat16", "--top", "2", "--no-density", "--trace-probes",
             "2", "--max-samples", "200", "-o", tmp_path / "r.h5", "--no-plot", "--json", "-q"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["lambda_max"] > 0
    with h5py.File(tmp_path / "r.h5") as f:
        assert f["hessian"].attrs["dtype"] == "bfloat16"
