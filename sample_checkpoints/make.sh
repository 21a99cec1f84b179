#!/usr/bin/env bash
# Regenerates the sample checkpoints from scratch with `flatscope train` (about a minute on 2 CPU cores).
# Usage: bash sample_checkpoints/make.sh
# The entropic pairs are trained at the same gradient budget as the SGD checkpoint of their model
# (`--epochs` counts gradient evaluations, Langevin steps and replica steps included).
set -euo pipefail
cd "$(dirname "$0")"
T="--threads 1 --seed 0 -q"
flatscope train --model mlp    --data digits --opt sgd  --epochs 30 --lr 0.05 $T -o mlp-sgd.pt
flatscope train --model cnn    --data digits --opt sgd  --epochs 20 --lr 0.05 $T -o cnn-sgd.pt
flatscope train --model resnet --data digits --opt sgd  --epochs 10 --lr 0.05 $T -o resnet-sgd.pt
flatscope train --model mlp    --data digits --opt esgd --epochs 30 --nesterov $T -o mlp-esgd.pt
flatscope train --model mlp    --data digits --opt rsgd --epochs 30 --replicas 3 $T -o mlp-rsgd.pt
flatscope train --model cnn    --data digits --opt esgd --epochs 20 --nesterov $T -o cnn-esgd.pt
flatscope train --model cnn    --data digits --opt rsgd --epochs 20 --replicas 3 --lr 0.1 $T -o cnn-rsgd.pt
