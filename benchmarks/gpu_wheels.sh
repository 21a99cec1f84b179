#!/bin/bash
# Fetch the competitors of benchmarks/bench_realistic.py as wheels into .whl (ignored by git), for a
# GPU machine that has torch, transformers, einops, linear_operator and opt_einsum but no network.
# Then, on that machine, before `python benchmarks/gpu_suite.py realistic`:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl \
  hessian-eigenthings==1.0.0a5 curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 einconv==0.1.0 unfoldNd==0.2.3
ls .whl
