"""The pruning engine: trace a network, plan which channels go, build the smaller one.

Bottom to top, each module importing only those before it (and torch, netslim.errors,
netslim.config and netslim.models.gather, nothing higher):

=============== ============================================================================
``graph``       units, groups, layers: the :class:`~.graph.ChannelGraph` everything reads
``ops``         what each op does to channels, and the registry of your own layers
``trace``       runs the forward pass, recording each op, and replays it on unit codes
``sparsity``    the L1 term on BatchNorm gammas, and how sparse they are
``plan``        the global threshold, floors, ``--target-macs``, ``--round-to``, ``ignore``,
                ``importance``
``surgery``     the physically smaller network, bias compensation
``fold``        BatchNorm folded into the layer before it
``recalibrate`` BatchNorm statistics re-estimated on a few batches
``stats``       parameters, MACs, non-finite tensors
=============== ============================================================================

The extension API::

    from netslim import engine

    engine.register_per_channel(MyActivation)     # a module class, a function, a method name
    engine.register_opaque(MyMixingLayer)          # keep every channel it touches
    plan = engine.plan_pruning(model, 0.5, ignore=["head"], importance=my_scores)
"""

from netslim.engine.graph import ChannelGraph
from netslim.engine.ops import register_opaque, register_per_channel, unregister
from netslim.engine.plan import (
    PrunePlan,
    channel_scores,
    gamma_importance,
    global_threshold,
    ignore_layers,
    plan_for_macs,
    plan_pruning,
)
from netslim.engine.surgery import apply_plan
from netslim.engine.trace import trace_channels

__all__ = [
    "ChannelGraph", "PrunePlan", "apply_plan", "channel_scores", "gamma_importance",
    "global_threshold", "ignore_layers", "plan_for_macs", "plan_pruning", "register_opaque",
    "register_per_channel", "trace_channels", "unregister",
]  # fmt: skip
