#!/bin/sh
# Images/s of one process against two torchrun processes (gloo) on this machine's CPU.
# Usage: sh bench/ddp.sh [REPEATS]; runs one after the other, never side by side.
set -e
PY=${PY:-.venv/bin/python}
OUT=$(mktemp -d)
ARGS="--dataset synthetic --train-size 4096 --test-size 1000 --arch vgg11-small --epochs 2 --device cpu"
for i in $(seq "${1:-2}"); do
    echo "== 1 process, 2 threads"
    $PY -m netslim train $ARGS --out "$OUT/p1t2-$i" | grep "^epoch"
    echo "== 1 process, 1 thread"
    OMP_NUM_THREADS=1 $PY -m netslim train $ARGS --out "$OUT/p1t1-$i" | grep "^epoch"
    echo "== 2 processes (torchrun), 1 thread each"
    OMP_NUM_THREADS=1 $PY -m torch.distributed.run --standalone --nproc_per_node 2 \
        -m netslim train $ARGS --out "$OUT/p2t1-$i" 2>/dev/null | grep "^epoch"
done
rm -rf "$OUT"
