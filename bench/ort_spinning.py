"""Two networks timed in turn on onnxruntime, with its threads spinning and without.

    python bench/ort_spinning.py A.pth B.pth [--image-size 640] [--rounds 15]

onnxruntime's intra-op threads spin for work after each run. When two sessions are timed
in turn (netslim bench's interleaved rounds), each run starts while the other session's
threads still spin on the same cores. The script prints each network's time alone and in
turn, with spinning on (onnxruntime's default) and off (what netslim's timing uses), and
the speed-up of B over A both ways.
"""

from __future__ import annotations

import argparse

import onnxruntime as ort
import torch

import netslim
from netslim.benchmark import time_interleaved
from netslim.engine.fold import fold_bn
from netslim.export import DEFAULT_OPSET, FORMATS
from netslim.models.external import for_deployment


def session(onnx: bytes, x: torch.Tensor, spinning: bool):
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    s = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    feed = {s.get_inputs()[0].name: x.numpy()}
    return lambda: s.run(None, feed)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--image-size", type=int, default=640)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    size = (1, 3, args.image_size, args.image_size)
    x = torch.randn(size)
    files = {}
    for name, path in (("A", args.a), ("B", args.b)):
        model = for_deployment(fold_bn(netslim.load(path).float().eval(), size))
        files[name] = FORMATS["onnx"].write(model, x, DEFAULT_OPSET)
    print(f"{'spinning':<9} {'timed':<8} {'A ms':>8} {'B ms':>8} {'B speed-up':>10}")
    for spinning in (True, False):
        runs = {name: session(onnx, x, spinning) for name, onnx in files.items()}
        alone = {n: time_interleaved({n: f}, args.rounds, stat="min")[n] for n, f in runs.items()}
        turn = time_interleaved(runs, args.rounds, stat="min")
        for how, t in (("alone", alone), ("in turn", turn)):
            print(
                f"{'on' if spinning else 'off':<9} {how:<8} {1000 * t['A']:>8.2f} "
                f"{1000 * t['B']:>8.2f} {t['A'] / t['B']:>9.2f}x"
            )


if __name__ == "__main__":
    main()
