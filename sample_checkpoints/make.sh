#!/usr/bin/env bash
# Regenerates the sample checkpoints from scratch with `flatscope train` (about a minute on 2 CPU cores).
# Usage: bash sample_checkpoints/make.sh
set -euo pipefail
cd "$(dirname "$0")"
T="--threads 1 --seed 0 -q"
flatscope train --model mlp    --data digits --opt sgd --epochs 30 --lr 0.05 $T -o mlp-sgd.pt
flatscope train --model cnn    --data digits --opt sgd --epochs 20 --lr 0.05 $T -o cnn-sgd.pt
flatscope train --model resnet --data digits --opt sgd --epochs 10 --lr 0.05 $T -o resnet-sgd.pt
