"""netslim's adapters: what the pruning engine needs to know of other libraries.

Each module holds one library's quirks as a function ``register(rules)`` that adds them to
a :class:`~netslim.engine.rules.Rules`. The engine's default rules run :func:`register` the
first time they are built (not at ``import netslim.engine``); other packages add theirs as
entry points of the group ``netslim.adapters`` (:data:`netslim.engine.rules.ADAPTER_GROUP`).

No adapter imports its library or a netslim architecture: classes are named as strings
(``"timm.layers.conv2d_same:Conv2dSame"``), resolved only once their module is loaded.
"""

from __future__ import annotations

from netslim.adapters import gather, timm, torchvision, ultralytics
from netslim.engine.rules import Rules

#: netslim's own adapters, in the order they run.
ADAPTERS = (gather, torchvision, timm, ultralytics)


def register(rules: Rules) -> Rules:
    """Add every adapter of netslim's own to ``rules`` (in place); returns them."""
    for adapter in ADAPTERS:
        adapter.register(rules)
    return rules
