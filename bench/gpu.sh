#!/usr/bin/env bash
# The GPU check of bench/RESULTS.md, as one script for a lent GPU machine (under 8 minutes):
# VGG-19 sparsity-training throughput of netslim against the paper's pipeline on real
# CIFAR-10, then pruned-model latency. Run from the repository root:
#     bash bench/gpu.sh [DATA_DIR]
# It installs netslim into .venv if needed and prepares CIFAR-10 from ../shared/datasets.
set -euo pipefail
data=${1:-/tmp/cifar}
[ -x .venv/bin/netslim ] || make .venv/bin/netslim TORCH=torch
[ -d "$data/cifar-10-batches-py" ] || .venv/bin/python ../shared/datasets/prepare_cifar10.py "$data"
.venv/bin/python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
timeout 300 .venv/bin/python bench/throughput.py --device cuda --data-root "$data" \
    --images 25600 --archs vgg19 --repeats 2
timeout 120 .venv/bin/python bench/latency.py --device cuda --precisions fp32 bf16 --batches 1 256
