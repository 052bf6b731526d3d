"""Where onnxruntime spends its time: a per-layer profile of checkpoints, side by side.

    python bench/ort_profile.py A.pth B.pth --batch 64

Each checkpoint is exported to ONNX (BatchNorm folded, checked) and run ``--runs`` times
with onnxruntime's profiler; the script prints the time per op type and the slowest
nodes, each with its share of the total and its output shape.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch

import netslim


def profile(path: Path, batch: int, runs: int, workdir: Path) -> list[dict]:
    onnx_path = workdir / f"{path.stem}.onnx"
    netslim.export(netslim.load(path), onnx_path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / path.stem)
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    x = {"images": torch.randn(batch, 3, 32, 32).numpy()}
    for _ in range(runs + 2):
        session.run(None, x)
    events = json.loads(Path(session.end_profiling()).read_text())
    return [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for path in map(Path, args.checkpoints):
            events = profile(path, args.batch, args.runs, Path(tmp))
            total = sum(e["dur"] for e in events)
            by_op, by_node = collections.Counter(), collections.Counter()
            shapes, ops = {}, {}
            for e in events:
                by_op[e["args"]["op_name"]] += e["dur"]
                node = e["name"].removesuffix("_kernel_time")
                ops[node] = e["args"]["op_name"]
                by_node[node] += e["dur"]
                shapes[node] = e["args"].get("output_type_shape")
            print(
                f"\n{path.stem}, batch {args.batch}: {total / 1000 / (args.runs + 2):.2f} ms "
                f"per run in kernels, {len(by_node)} nodes"
            )
            for op, t in by_op.most_common():
                nodes = sum(o == op for o in ops.values())
                print(f"  {op:<20} {100 * t / total:5.1f}%  {nodes:>4} nodes")
            for node, t in by_node.most_common(args.top):
                print(f"  {node:<40} {100 * t / total:5.1f}%  {shapes[node]}")


if __name__ == "__main__":
    main()
