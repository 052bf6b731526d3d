"""netslim: network slimming (Liu et al., ICCV 2017) for convolutional networks.

The three steps as a Python API::

    import netslim
    model = netslim.build_model("vgg19")
    # in your training loop, after loss.backward():
    netslim.add_bn_l1_grad(model, lam=1e-4)
    # afterwards:
    pruned, report = netslim.prune_model(model, ratio=0.7)
    model = netslim.load("pruned.pth")

The names below are imported on first use (``netslim.load`` imports torch then), so that
``import netslim`` itself, and with it ``netslim --help``, is instant.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_WHERE = {
    "load": "checkpoint", "read_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "load_dataset": "data", "NetslimError": "errors", "LabConfig": "config",
    "TrainConfig": "config", "run_lab": "lab", "ARCHS": "config", "VGG": "models",
    "build_model": "models", "global_threshold": "pruning", "plan_for_macs": "pruning",
    "plan_pruning": "pruning", "recalibrate_bn": "recalibrate", "PruneReport": "slim",
    "prune_model": "slim", "save": "slim", "add_bn_l1_grad": "sparsity", "bn_gammas": "sparsity",
    "bn_sparsity": "sparsity", "gamma_quantiles": "sparsity", "count_macs": "stats",
    "count_params": "stats", "apply_plan": "surgery", "prune": "surgery", "evaluate": "train",
    "fit": "train", "export": "export", "fold_bn": "fold",
}  # fmt: skip

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"netslim.{_WHERE[name]}"), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"netslim.{name}"):
        value = importlib.import_module(f"netslim.{name}")  # a module: netslim.train.lr_at
    else:
        raise AttributeError(f"module 'netslim' has no attribute {name!r}")
    globals()[name] = value  # the next lookup skips this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
