"""The weight initialisation shared by every netslim architecture."""

from __future__ import annotations

import math

from torch import nn


def reset_parameters(model: nn.Module) -> None:
    """He-normal convs, BN gamma 0.5 and beta 0, linear N(0, 0.01) with zero bias.

    Gamma starts at 0.5 as in the paper's code: the L1 term then has room to drive the
    unimportant ones towards 0 within a normal schedule.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 0.5)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
