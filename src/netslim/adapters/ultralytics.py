"""Ultralytics' blocks that keep a width derived from their channel counts."""

from __future__ import annotations

from torch import nn

from netslim.engine.rules import Rules


def c2f_half_width(model: nn.Module) -> nn.Module:
    """Bring attributes that Ultralytics derives from channel counts in line with resized
    layers (in place). Its C2f family keeps its half width ``c`` for ``forward_split``, which
    its ONNX export switches to; the engine keeps both halves equal (a ``chunk`` tie), so
    ``c`` is half of ``cv1``'s output."""
    for m in model.modules():
        if type(m).__module__.startswith("ultralytics.") and hasattr(m, "forward_split"):
            if isinstance(getattr(m, "c", None), int) and hasattr(m, "cv1"):
                m.c = m.cv1.conv.out_channels // 2
    return model


def register(rules: Rules) -> None:
    rules.add_after_resize(c2f_half_width)
