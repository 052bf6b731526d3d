"""Every model YAML the installed Ultralytics ships, written as Ultralytics writes a ``.pt``
and read back by netslim without running code (netslim.yolo.files): same classes, same
weights, same outputs as the full unpickler gives? Prints one row per YAML.

    YOLO_CONFIG_DIR=/tmp/yolo PYTHONPATH=src python bench/yolo_files.py [--size 64]

A YAML netslim refuses to build (a layer that fetches weights, one needing CLIP) is listed
with its one-line reason; so is a file that reads back differently (none should).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from netslim.errors import NetslimError
from netslim.models.yolo_yaml import build_ultralytics, offline_ultralytics
from netslim.yolo.files import read_model, write_model


def first_tensor(out):
    while isinstance(out, (list, tuple, dict)):
        out = next(iter(out.values())) if isinstance(out, dict) else out[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="input size of the output check")
    args = parser.parse_args()
    offline_ultralytics()
    import ultralytics

    root = Path(ultralytics.__file__).parent / "cfg" / "models"
    names = sorted(p.name for p in root.rglob("*.yaml"))
    print(f"ultralytics {ultralytics.__version__}, torch {torch.__version__}: {len(names)} YAMLs")
    print(f"{'yaml':<28} {'result':<10} {'params':>11} {'s':>6}  detail")
    same = refused = 0
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            start = time.perf_counter()
            try:
                torch.manual_seed(0)
                model = build_ultralytics(name, 3).eval()
            except NetslimError as e:
                refused += 1
                print(
                    f"{name:<28} {'refused':<10} {'':>11} {time.perf_counter() - start:6.1f}  {e}"
                )
                continue
            path = Path(folder) / "m.pt"
            write_model(model, path)
            plain = torch.load(path, weights_only=False)["ema"].eval()
            try:
                again = read_model(path)
                weights = all(
                    torch.equal(v, again.state_dict()[k]) for k, v in plain.state_dict().items()
                )
                x = torch.rand(1, 3, args.size, args.size)
                with torch.no_grad():
                    diff = (first_tensor(again(x)) - first_tensor(plain(x))).abs().max().item()
                ok = weights and type(again) is type(plain) and diff == 0
                detail = "" if ok else f"weights equal {weights}, max output difference {diff:.3g}"
            except (NetslimError, RuntimeError) as e:
                ok, detail = False, str(e)[:160]
            same += ok
            params = sum(p.numel() for p in model.parameters())
            print(
                f"{name:<28} {'same' if ok else 'DIFFERS':<10} {params:>11,} "
                f"{time.perf_counter() - start:6.1f}  {detail}"
            )
    print(f"{same} read back exactly, {refused} refused, {len(names) - same - refused} differ")


if __name__ == "__main__":
    main()
