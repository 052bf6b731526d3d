"""timm's layers that subclass torch's with a ``forward`` of their own, which computes what
torch's does (so the engine may prune them as torch's)."""

from __future__ import annotations

from netslim.engine.rules import Rules


def register(rules: Rules) -> None:
    """``Conv2dSame`` pads like TensorFlow's "same" and convolves; ``Linear`` casts for
    TorchScript and is a linear layer; ``BatchNormAct2d`` (and its synced form) runs the
    BatchNorm, then its ``drop`` and ``act`` submodules, which the engine probes."""
    rules.register_conv("timm.layers.conv2d_same:Conv2dSame", same_padding=True)
    rules.register_linear("timm.layers.linear:Linear")
    for norm in ("BatchNormAct2d", "SyncBatchNormAct"):
        rules.register_norm(f"timm.layers.norm_act:{norm}", then=("drop", "act"))
