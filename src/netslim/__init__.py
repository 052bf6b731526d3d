"""netslim: network slimming (Liu et al., ICCV 2017) for convolutional networks.

The three steps as a Python API::

    import netslim
    model = netslim.build_model("vgg19")
    # in your training loop, after loss.backward():
    netslim.add_bn_l1_grad(model, lam=1e-4)
    # afterwards:
    pruned, report = netslim.prune_model(model, ratio=0.7)
    model = netslim.load("pruned.pth")
"""

from netslim.checkpoint import load, read_checkpoint, save_checkpoint
from netslim.data import load_dataset
from netslim.errors import NetslimError
from netslim.export import export
from netslim.fold import fold_bn
from netslim.lab import LabConfig, run_lab
from netslim.models import ARCHS, VGG, build_model
from netslim.pruning import global_threshold, plan_for_macs, plan_pruning
from netslim.recalibrate import recalibrate_bn
from netslim.slim import PruneReport, prune_model
from netslim.sparsity import add_bn_l1_grad, bn_gammas, bn_sparsity, gamma_quantiles
from netslim.stats import count_macs, count_params
from netslim.surgery import apply_plan, prune
from netslim.train import TrainConfig, evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "ARCHS", "VGG", "NetslimError", "PruneReport", "TrainConfig", "add_bn_l1_grad",
    "bn_gammas", "bn_sparsity", "build_model", "count_macs", "count_params", "evaluate",
    "fit", "gamma_quantiles", "global_threshold", "load", "load_dataset", "plan_pruning",
    "plan_for_macs", "prune", "prune_model", "apply_plan", "read_checkpoint", "recalibrate_bn",
    "save_checkpoint",
]  # fmt: skip
__all__ += ["LabConfig", "run_lab"]  # the whole experiment in one call
__all__ += ["export", "fold_bn"]  # deployment: a file that runs without netslim
