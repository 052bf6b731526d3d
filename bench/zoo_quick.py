"""Quick check of the pruning engine on real torchvision and timm models (fresh weights).

Each model gets random BatchNorm statistics and half of its channel units made unimportant
(tiny gamma in every BN that scales them), is planned at ratio 0.5 and pruned twice:
without compensation, compared with the official masked network, and with compensation
on a copy with circular padding, compared with the reference (gamma-zeroed) network.
Prints one line per model: exact or not (max error relative to the output's scale), the
share of BN channels removed, the MACs kept, how many reasons fixed some channels, and
the first reason.

    PYTHONPATH=src python bench/zoo_quick.py [NAME ...]   # torchvision:NAME or timm:NAME
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from torch import nn

from netslim.engine.plan import plan_pruning, reference_network
from netslim.engine.sparsity import batchnorms
from netslim.engine.stats import count_macs
from netslim.engine.surgery import apply_plan
from netslim.engine.trace import trace_channels
from netslim.errors import NetslimError

MODELS = [
    ("torchvision:resnet18", 32),
    ("torchvision:resnet50", 32),
    ("torchvision:mobilenet_v3_small", 32),
    ("torchvision:efficientnet_b0", 32),
    ("torchvision:shufflenet_v2_x0_5", 32),
    ("torchvision:regnet_y_400mf", 32),
    ("torchvision:resnext50_32x4d", 32),
    ("torchvision:densenet121", 32),
    ("torchvision:googlenet", 32),
    ("torchvision:inception_v3", 75),
    ("torchvision:mnasnet0_5", 32),
    ("torchvision:convnext_tiny", 32),
    ("torchvision:alexnet", 64),
    ("torchvision:squeezenet1_0", 64),
    ("timm:efficientnet_b0", 32),
    ("timm:mobilenetv3_small_100", 32),
    ("timm:rexnet_100", 32),
    ("timm:cspresnet50", 64),
    ("timm:repvgg_a0", 32),
    ("timm:dpn68", 32),
    ("timm:ese_vovnet19b_dw", 64),
    ("timm:ghostnet_100", 32),
    ("timm:res2net50_14w_8s", 32),
    ("timm:regnetx_002", 32),
    ("timm:hrnet_w18_small", 64),
    ("timm:dla34", 64),
    ("timm:resnest14d", 64),
    ("timm:mixnet_s", 32),
    ("timm:tf_efficientnet_b0", 32),
    ("timm:lcnet_050", 32),
    ("timm:selecsls42b", 64),
    ("timm:semnasnet_050", 32),
    ("timm:tresnet_m", 64),
    ("timm:densenet121", 32),
]


def build(spec: str) -> nn.Module:
    lib, name = spec.split(":")
    if lib == "torchvision":
        import torchvision

        kwargs = (
            {"aux_logits": False, "init_weights": True}
            if name in ("googlenet", "inception_v3")
            else {}
        )
        return torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    import timm

    return timm.create_model(name, pretrained=False, num_classes=10)


def make_sparse(model: nn.Module, size: tuple[int, ...], share: float = 0.5) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    graph = trace_channels(model, size)
    weak = torch.zeros(graph.num_units, dtype=torch.bool)
    for group in graph.prunable.values():
        weak[group.units[torch.randperm(group.size, generator=g)[: int(share * group.size)]]] = True
    bns = dict(batchnorms(model))
    with torch.no_grad():
        for bn in bns.values():
            n = bn.num_features
            if bn.affine:
                bn.weight.copy_(torch.rand(n, generator=g) + 0.1)
                bn.bias.copy_(torch.randn(n, generator=g) * 0.3)
            if bn.track_running_stats:
                bn.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        for name, units in graph.norms.items():
            if bns[name].affine:
                small = weak[units]
                bns[name].weight[small] = 1e-3 * torch.rand(int(small.sum()), generator=g)
    return model.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def check(spec: str, px: int) -> str:
    size = (1, 3, px, px)
    model = make_sparse(build(spec).eval(), size)
    x = torch.randn(2, 3, px, px, generator=torch.Generator().manual_seed(1))
    plan = plan_pruning(model, 0.5, graph=trace_channels(model, size))
    with torch.no_grad():
        off = rel(
            apply_plan(model, plan, compensate=False).eval()(x),
            reference_network(model, plan, False)(x),
        )
        circ = copy.deepcopy(model)
        for m in circ.modules():
            if isinstance(m, nn.Conv2d) and any(p > 0 for p in m.padding if isinstance(p, int)):
                m.padding_mode = "circular"
        on = float("nan")
        for scale in (1, 2, 4):  # circular padding needs maps at least as large as the padding
            big = (1, 3, px * scale, px * scale)
            xb = torch.randn(2, *big[1:], generator=torch.Generator().manual_seed(2))
            try:
                cplan = plan_pruning(circ, 0.5, graph=trace_channels(circ, big))
            except NetslimError:
                continue
            on = rel(apply_plan(circ, cplan).eval()(xb), reference_network(circ, cplan, True)(xb))
            break
    pruned = apply_plan(model, plan).train()  # one training step runs
    out = pruned(x)
    sum(
        t.float().sum() for t in (out if isinstance(out, tuple) else [out]) if t is not None
    ).backward()
    macs = plan.macs / count_macs(model, size)
    verdict = "exact" if off < 1e-4 and not on >= 1e-4 else "WRONG"
    first = plan.fixed_reasons[0][:90] if plan.fixed_reasons else ""
    return (
        f"{verdict:6} off {off:.1e} on {on:.1e} removed {plan.pruned_share:5.1%} "
        f"MACs kept {macs:5.1%} fixed {len(plan.fixed_reasons):2d} {first}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("names", nargs="*")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    models = [
        (n, px)
        for n, px in MODELS
        if not args.names or n in args.names or n.split(":")[1] in args.names
    ]
    for spec, px in models:
        start = time.perf_counter()
        try:
            line = check(spec, px)
        except NetslimError as e:
            line = f"refused {e}"[:200]
        except Exception as e:  # noqa: BLE001 - a crash is a finding too
            line = f"CRASH  {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        print(f"{spec:34} {px:3d}px {time.perf_counter() - start:5.1f}s  {line}", flush=True)


if __name__ == "__main__":
    main()
