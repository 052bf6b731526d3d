#!/usr/bin/env bash
# What a small YOLO lab leaves behind: settings dumps in its log, lines, bytes and files.
# Compare two checkouts: bench/yolo_lab_files.sh SRC_DIR TAG (SRC_DIR: a checkout's src/),
# e.g. the commit before issue 28 (git worktree add /tmp/old 740298c) and main.
# Measured for issue 28 (docs/yolo.md, "What a YOLO lab keeps").
set -euo pipefail
src=$1 tag=$2
root=$(cd "$(dirname "$0")/.." && pwd)
export YOLO_CONFIG_DIR=$(mktemp -d) PYTHONPATH=$src
work=/tmp/yolo-lab-files-$tag
rm -rf "$work" && mkdir -p "$work"
"$root/.venv/bin/python" -c "
import sys; sys.path.insert(0, '$root/tests')
from pathlib import Path
from test_yolo import write_data
write_data(Path('$work/data'))"
"$root/.venv/bin/python" -m netslim yolo lab --model yolov8n.yaml --data "$work/data/data.yaml" \
    workers=0 nbs=8 amp=False warmup_epochs=0 mosaic=0 --lams 0 1e-2 --ratios 0.5 --sweep 0.3 \
    --epochs 1 --finetune-epochs 1 --recalibrate 1 --image-size 64 --batch-size 8 --device cpu \
    --out "$work/lab" > "$work/log.txt" 2>&1
echo "$tag: settings dumps $(grep -c 'engine/trainer:' "$work/log.txt" || true)," \
     "log lines $(wc -l < "$work/log.txt"), bytes $(du -sb "$work/lab" | cut -f1)," \
     "files $(find "$work/lab" -type f | wc -l)"
