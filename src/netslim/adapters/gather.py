"""The paper's channel selection (:class:`netslim.models.gather.ChannelGather`).

Named as a string: importing it here would import :mod:`netslim.models`, every architecture.
A network holding one has imported it, and then the rule resolves.
"""

from __future__ import annotations

from netslim.engine.rules import Rules

CHANNEL_GATHER = "netslim.models.gather:ChannelGather"


def register(rules: Rules) -> None:
    """Output channel ``j`` of a ChannelGather is input channel ``index[j]``: what it reads is
    kept, and pruning its outputs cuts the index."""
    rules.register_selection(CHANNEL_GATHER, index="index")
