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
    "load": "checkpoint",
    "read_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "load_dataset": "data",
    "NetslimError": "errors",
    "LabConfig": "config",
    "TrainConfig": "config",
    "run_lab": "lab.experiment",
    "ARCHS": "config",
    "VGG": "models",
    "build_model": "models",
    "global_threshold": "engine.plan",
    "plan_by_threshold": "engine.plan",
    "plan_for_latency": "engine.plan",
    "plan_keeping": "engine.plan",
    "LatencyBudget": "latency",
    "LatencyTable": "latency",
    "latency_table": "latency",
    "plan_for_macs": "engine.plan",
    "plan_pruning": "engine.plan",
    "recalibrate_bn": "engine.recalibrate",
    "PruneReport": "slim",
    "prune_model": "slim",
    "save": "slim",
    "add_bn_l1_grad": "engine.sparsity",
    "bn_gammas": "engine.sparsity",
    "bn_sparsity": "engine.sparsity",
    "gamma_quantiles": "engine.sparsity",
    "count_macs": "engine.stats",
    "count_params": "engine.stats",
    "apply_plan": "engine.surgery",
    "evaluate": "train.evaluate",
    "fit": "train.loop",
    "export": "export",
    "fold_bn": "engine.fold",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"netslim.{_WHERE[name]}"), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"netslim.{name}"):
        value = importlib.import_module(f"netslim.{name}")  # a module: netslim.engine
    else:
        raise AttributeError(f"module 'netslim' has no attribute {name!r}")
    globals()[name] = value  # the next lookup skips this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
