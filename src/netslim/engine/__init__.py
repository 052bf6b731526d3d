"""The pruning engine: trace a network, plan which channels go, build the smaller one.

Bottom to top, each module importing only those before it (and torch, netslim.errors,
netslim.config, netslim.limits; no architecture and no other library):

=============== ============================================================================
``graph``       units, groups, layers: the :class:`~.graph.ChannelGraph` everything reads
``rules``       what the engine knows beyond ``torch.nn``: a :class:`~.rules.Rules` object,
                scoped to a call, and the adapters (timm, torchvision, Ultralytics, the
                paper's channel selection) that build the default one on first use
``ops``         what each op does to channels (``torch.nn`` and ``torch``)
``trace``       runs the forward pass, recording each op, and replays it on unit codes
``sparsity``    the L1 term on BatchNorm gammas, and how sparse they are
``plan``        the global threshold, floors, ``--target-macs``, ``--round-to``, ``ignore``,
                ``importance``
``surgery``     the physically smaller network, bias compensation
``fold``        BatchNorm folded into the layer before it
``recalibrate`` BatchNorm statistics re-estimated on a few batches
``stats``       parameters, MACs, non-finite tensors
=============== ============================================================================

The extension API, scoped to the calls given ``rules=`` (:mod:`netslim.engine.rules`)::

    from netslim import engine

    rules = engine.default_rules().copy()
    rules.register_per_channel(MyActivation)      # a module class, a function, a method name
    rules.register_opaque(MyMixingLayer)          # keep every channel it touches
    rules.register_layer(MyConv, params={"weight": ("out", "in"), "bias": ("out",)})
    plan = engine.plan_pruning(model, 0.5, ignore=["head"], importance=my_scores, rules=rules)
    pruned = engine.apply_plan(model, plan)       # follows plan.graph.rules

``engine.register_per_channel``, ``register_opaque`` and ``unregister`` do the same on the
default rules, for every later call in the process.
"""

from netslim.engine.graph import ChannelGraph
from netslim.engine.plan import (
    PrunePlan,
    channel_scores,
    gamma_importance,
    global_threshold,
    ignore_layers,
    plan_for_latency,
    plan_for_macs,
    plan_pruning,
)
from netslim.engine.rules import (
    LayerSpec,
    Rules,
    default_rules,
    model_inputs,
    register_opaque,
    register_per_channel,
    unregister,
)
from netslim.engine.surgery import apply_plan
from netslim.engine.trace import trace_channels

__all__ = [
    "ChannelGraph",
    "LayerSpec",
    "PrunePlan",
    "Rules",
    "apply_plan",
    "channel_scores",
    "default_rules",
    "gamma_importance",
    "global_threshold",
    "ignore_layers",
    "model_inputs",
    "plan_for_latency",
    "plan_for_macs",
    "plan_pruning",
    "register_opaque",
    "register_per_channel",
    "trace_channels",
    "unregister",
]
