#!/usr/bin/env bash
# Deployment speed of slimmed networks: prune a sparsity-trained checkpoint at each ratio with
# and without --round-to, measure each network's test accuracy after BN recalibration, then
# time all of them side by side with `netslim bench` in PyTorch eager and onnxruntime at
# batch 1 and 64.
#
#   bash bench/deploy.sh CHECKPOINT DATA_ROOT OUT_DIR "0.5 0.7" "1 8 16"
#
# DATA_ROOT holds cifar-10-batches-py/. Accuracy is on the first TEST_SIZE test images
# (default 2000, the same images for every network, so differences are paired).
set -euo pipefail
ckpt=${1:?usage: bench/deploy.sh CHECKPOINT DATA_ROOT OUT_DIR RATIOS ROUNDS}
data=${2:?DATA_ROOT}
out=${3:?OUT_DIR}
ratios=${4:-"0.5 0.7"}
rounds=${5:-"1 8 16"}
ns=${NETSLIM:-.venv/bin/netslim}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
nets=("$ckpt")
for ratio in $ratios; do
    for n in $rounds; do
        pruned="$out/pruned-$ratio-r$n.pth"
        $ns prune "$ckpt" --ratio "$ratio" --round-to "$n" --out "$pruned" > "$out/prune-$ratio-r$n.txt"
        grep -E "^(MACs|       before)" "$out/prune-$ratio-r$n.txt"
        nets+=("$pruned")
    done
done
$ns bench "${nets[@]}" --batch 1,64 --runtime torch,onnxruntime --repeats "${REPEATS:-10}" \
    | tee "$out/bench.txt"
$python bench/accuracy.py "$data" "${nets[@]}" --test-size "${TEST_SIZE:-2000}" | tee "$out/accuracy.txt"
