#!/usr/bin/env bash
# ResNet-56 on real CIFAR-10, short schedule: sparsity training (lambda 1e-5), pruning at 40%
# and 60% (measured right after pruning three ways), fine-tuning, and CPU latency against
# the unpruned network, beside the MACs the paper's approach (residual path kept) leaves.
#
#   bash bench/resnet56.sh DATA_ROOT [RUN_DIR]      # about 25 min on a quiet 2-core CPU
#   LAM=1e-3 bash bench/resnet56.sh DATA_ROOT runs/resnet56-l3   # another lambda
#
# DATA_ROOT holds cifar-10-batches-py/ (../shared/datasets/prepare_cifar10.py writes one).
set -euo pipefail
data=${1:?usage: bench/resnet56.sh DATA_ROOT [RUN_DIR]}
run=${2:-runs/resnet56}
lam=${LAM:-1e-5}
ns=".venv/bin/netslim"
common=(--dataset cifar10 --data-root "$data" --no-download --train-size 20000)

resume() { [ -f "$1/last.pth" ] && echo --resume || true; }  # continue an interrupted run

$ns train --arch resnet56 "${common[@]}" --lam "$lam" --epochs 15 --out "$run/sparse" \
    $(resume "$run/sparse")
for ratio in 0.4 0.6; do
    $ns prune "$run/sparse/last.pth" --ratio $ratio "${common[@]}" --out "$run/pruned-$ratio.pth"
    $ns finetune "$run/pruned-$ratio.pth" "${common[@]}" --epochs 5 --lr 0.01 \
        --out "$run/finetune-$ratio" $(resume "$run/finetune-$ratio")
done
.venv/bin/python bench/latency.py --checkpoint "$run/sparse/last.pth" --ratios 0.4 0.6 \
    --batches 1 256 --precisions fp32
