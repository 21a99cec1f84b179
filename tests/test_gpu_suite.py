"""The GPU half of the scale benchmarks (``benchmarks/gpu_suite.py``), dry-run on CPU with tiny models,
so that a lent GPU spends its minutes on figures, not on fixing the script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("transformers")


@pytest.mark.slow
def test_scale_part_runs_every_model_and_dtype_and_reports(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "scale", "--device", "cpu", "--tiny"]
    subprocess.run([*cmd, "--out", str(out), "--work", str(work)], check=True, capture_output=True, timeout=900)
    rows = [json.loads(ln) for ln in (out / "scale.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["rc"] == 0 for r in rows)
    for r in rows:
        j = r["result"]
        assert len(j["eigenvalues"]) == 5 and j["density"]["n_probes"] == 4
        big = "tiny-b" in r["args"][0]
        assert j["density"]["reorthogonalized"] is (not big)
    rep = subprocess.run([*cmd[:2], "report", "--out", str(out)], capture_output=True, text=True, check=True)
    assert rep.stdout.count("\n") == 6 and "process RSS" in rep.stdout and "failed" not in rep.stdout
