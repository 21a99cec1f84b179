import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"


@pytest.fixture
def samples() -> Path:
    return SAMPLES


def make_regression_checkpoint(folder: Path, n=40, d=3, seed=0, name="lin.pt"):
    """A linear model with MSE on float targets: the loss is an exact quadratic."""
    from flatscope.checkpoint import save_checkpoint

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = (X @ rng.standard_normal(d) + 0.3 * rng.standard_normal(n)).astype(np.float32)
    Xt = rng.standard_normal((n // 2, d)).astype(np.float32)
    yt = (Xt @ rng.standard_normal(d)).astype(np.float32)
    data = folder / "reg.npz"
    np.savez(data, X=X, y=y, X_test=Xt, y_test=yt)
    torch.manual_seed(seed)
    model = torch.nn.Linear(d, 1)
    path = folder / name
    save_checkpoint(str(path), model, {"name": "linear", "kwargs": {"in_features": d, "out_features": 1}},
                    {"name": f"npz:{data}"}, "mse", {})
    return path, X, y


@pytest.fixture
def regression_checkpoint(tmp_path):
    return make_regression_checkpoint(tmp_path)


def run_cli(args, **kw):
    """Invoke the CLI in-process; returns the click Result (stdout and stderr kept apart)."""
    from click.testing import CliRunner

    from flatscope.cli import main

    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 always separates stderr
        runner = CliRunner()
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


@pytest.fixture
def cli():
    return run_cli


def assert_one_line_error(result, code=2, contains=None):
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    if contains:
        assert contains.lower() in lines[0].lower(), lines[0]
    return lines[0]
