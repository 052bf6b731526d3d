"""Coverage: netslim and Torch-Pruning on every torchvision classification model and one
timm model per family, side by side in one run.

Every model gets fresh weights, random BatchNorm statistics and a random half of each
channel group made unimportant (tiny gamma in all the BatchNorms that scale it), then:

* **netslim**: traced at the model's input size, planned at ratio 0.5, pruned without
  compensation and compared with the masked network, and with compensation (on a copy with
  wrap-around padding) compared with the gamma-zeroed network. ``exact``: both agree to
  1e-4 of the output's scale and nothing was fixed; ``exact, fixed``: both agree, some
  groups were kept whole (the reasons are listed); ``refused``: a one-line error;
  ``WRONG``: a pruned network that does not compute its reference (must never happen);
  ``crash``: any other exception (an engine bug).
* **Torch-Pruning** (``torch_pruning``, if installed): ``BNScalePruner`` with
  ``BNScaleImportance``, global pruning at ratio 0.5 with the classifier ignored;
  ``runs, exact``: the pruned network runs and computes the masked network of the
  channels it removed (to 1e-4); ``runs, differs``: it runs but computes something else.

Both report the share of BatchNorm channels removed and the MACs kept (netslim's counter
for both). One JSON line per model goes to ``--out`` (resumable: models already there are
skipped), and a Markdown table to stdout at the end::

    PYTHONPATH=src python bench/coverage.py --out runs/coverage.jsonl
    PYTHONPATH=src python bench/coverage.py --out runs/cov.jsonl torchvision:resnet18 timm:dla46_c
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import netslim
from netslim.engine.plan import plan_pruning, reference_network
from netslim.engine.sparsity import batchnorms
from netslim.engine.stats import count_macs
from netslim.engine.surgery import apply_plan
from netslim.engine.trace import trace_channels
from netslim.errors import NetslimError

# one model per timm family (per source module), the smallest variant
TIMM = [
    "resnet10t",
    "efficientnet_b0",
    "mobilenetv3_small_050",
    "regnetx_002",
    "rexnet_100",
    "cs3darknet_s",
    "repvgg_a0",
    "dpn48b",
    "ese_vovnet19b_slim_dw",
    "densenet121",
    "dla46_c",
    "hrnet_w18_small",
    "ghostnet_050",
    "res2net50_48w_2s",
    "resnest14d",
    "hardcorenas_a",
    "selecsls42b",
    "inception_v3",
    "resnetv2_18",
    "repghostnet_050",
    "hgnetv2_b0",
    "legacy_seresnet18",
    "xception41p",
    "tresnet_m",
    "convmixer_768_32",
    "skresnet18",
    "fastvit_t8",
    "efficientvit_b0",
    "mobilevit_xxs",
    "levit_128s",
    "repvit_m0_9",
    "starnet_s050",
    "fasternet_t0",
    "legacy_xception",
    "nf_regnet_b0",
]
# the input side a model needs at least (32 for the rest)
MIN_SIZE = {
    "inception_v3": 75,
    "maxvit_t": 224,
    "levit_128s": 224,
    "alexnet": 64,
    "legacy_xception": 64,
    "efficientvit_b0": 64,
    "mobilevit_xxs": 64,
}
SKIP = {"torchvision:regnet_y_128gf": "637M parameters: too large for this 24 GB machine"}


def all_specs() -> list[str]:
    import timm
    import torchvision

    tv = [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    return tv + [f"timm:{n}" for n in TIMM if timm.is_model(n)]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def circular(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.padding_mode = "circular"
    return model


def input_side(model: nn.Module, size: int) -> int:
    """The smallest of size, 2 size, ... on which the model (with wrap-around padding) runs."""
    while True:
        try:
            with torch.no_grad():
                circular(model).eval()(torch.zeros(1, 3, size, size))
            return size
        except Exception:
            if size >= 256:
                raise
            size *= 2


def make_sparse(model: nn.Module, size: int, seed: int = 0):
    """Random BN statistics; a random half of each group tiny in all its BNs."""
    g = torch.Generator().manual_seed(seed)
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
    graph = trace_channels(model.eval(), (1, 3, size, size))
    weak = torch.zeros(graph.num_units, dtype=torch.bool)
    for group in graph.prunable.values():
        weak[group.units[torch.randperm(group.size, generator=g)[: group.size // 2]]] = True
    with torch.no_grad():
        for name, units in graph.norms.items():
            if bns[name].affine:
                small = weak[units]
                bns[name].weight[small] = 1e-3 * torch.rand(int(small.sum()), generator=g)
    return graph


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-6))


def bn_channels(model: nn.Module) -> int:
    return sum(bn.num_features for _, bn in batchnorms(model))


def one_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"[:300]


def run_netslim(model: nn.Module, graph, size: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_pruning(model, 0.5, graph=graph)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pruned = apply_plan(model, plan, compensate=False).eval()
        err_off = relative_error(pruned(x), reference_network(model, plan, False)(x))
        wrapped = circular(model)
        compensated = apply_plan(wrapped, plan, compensate=True).eval()
        err_on = relative_error(compensated(x), reference_network(wrapped, plan, True)(x))
    exact = max(err_off, err_on) <= 1e-4
    fixed = list(plan.fixed_reasons)
    status = ("exact, fixed" if fixed else "exact") if exact else "WRONG"
    unit = (1, 3, size, size)
    return {
        "status": status,
        "error_off": err_off,
        "error_on": err_on,
        "fixed": fixed,
        "removed": 1 - bn_channels(pruned) / bn_channels(model),
        "macs_kept": count_macs(pruned, unit) / count_macs(model, unit),
    }


def run_torch_pruning(model: nn.Module, size: int, classes: int) -> dict:
    """Torch-Pruning's network slimming; its pruned network is compared with the masked
    network of the channels it removed (found by their gammas, which are all distinct)."""
    import torch_pruning as tp

    original, model = model, copy.deepcopy(model).eval()
    unit = (1, 3, size, size)
    macs, channels = count_macs(model, unit), bn_channels(model)
    heads = [
        m
        for m in model.modules()
        if (isinstance(m, nn.Linear) and m.out_features == classes)
        or (isinstance(m, nn.Conv2d) and m.out_channels == classes)
    ]
    pruner = tp.pruner.BNScalePruner(
        model,
        torch.randn(unit),
        importance=tp.importance.BNScaleImportance(),
        global_pruning=True,
        pruning_ratio=0.5,
        ignored_layers=heads,
    )
    pruner.step()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
    if tuple(out.shape) != (2, classes):
        raise RuntimeError(f"output shape {tuple(out.shape)}")
    masks = {}
    pruned_bns = dict(batchnorms(model))
    for name, bn in batchnorms(original):
        if bn.affine:
            masks[name] = torch.isin(bn.weight.detach(), pruned_bns[name].weight.detach())
    with torch.no_grad():
        error = relative_error(out, reference_network_of(original, masks)(x))
    return {
        "status": "runs, exact" if error <= 1e-4 else "runs, differs",
        "error": error,
        "removed": 1 - bn_channels(model) / channels,
        "macs_kept": count_macs(model, unit) / macs,
    }


def reference_network_of(model: nn.Module, masks: dict) -> nn.Module:
    """The official masked network: gamma and beta of the removed channels zeroed."""
    masked = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, bn in batchnorms(masked):
            if name in masks:
                bn.weight[~masks[name]] = 0.0
                bn.bias[~masks[name]] = 0.0
    return masked


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout("gave up after the time limit")


def measure(spec: str, classes: int = 10, limit: int = 600) -> dict:
    record: dict = {"model": spec}
    t0 = time.perf_counter()
    with torch.device("meta"):  # cheap, when the builder allows it: is there any BatchNorm?
        try:
            bn = has_batchnorm(netslim.build_model(spec, classes))
        except Exception:
            bn = None
    if bn is False:
        record["batchnorm"] = False
        try:
            netslim.prune_model(_meta(spec, classes), 0.5)
            record["netslim"] = {"status": "WRONG: pruned a network without BatchNorm"}
        except NetslimError as e:
            record["netslim"] = {"status": "refused", "reason": str(e)}
        record["torch_pruning"] = {"status": "n/a (no BatchNorm)"}
        return record
    torch.manual_seed(0)
    model = netslim.build_model(spec, classes).eval()
    record["batchnorm"] = True
    size = input_side(model, MIN_SIZE.get(spec.split(":")[1], 32))
    record["size"] = size
    record["params"] = netslim.count_params(model)
    signal.signal(signal.SIGALRM, _alarm)
    graph = None
    try:
        signal.alarm(limit)
        try:
            graph = make_sparse(model, size)
            record["netslim"] = run_netslim(model, graph, size)
        except NetslimError as e:
            record["netslim"] = {"status": "refused", "reason": str(e)}
        except Exception as e:
            record["netslim"] = {"status": "crash", "reason": one_line(e)}
        finally:
            signal.alarm(0)
        if graph is None:  # netslim could not trace it: random gammas for Torch-Pruning
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for _, b in batchnorms(model):
                    if b.affine:
                        b.weight.copy_(torch.rand(b.num_features, generator=g) + 1e-3)
        signal.alarm(limit)
        try:
            record["torch_pruning"] = run_torch_pruning(model, size, classes)
        except ImportError:
            record["torch_pruning"] = {"status": "not installed"}
        except Exception as e:
            record["torch_pruning"] = {"status": "fails", "reason": one_line(e)}
        finally:
            signal.alarm(0)
    finally:
        signal.alarm(0)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


def _meta(spec: str, classes: int) -> nn.Module:
    with torch.device("meta"):
        return netslim.build_model(spec, classes)


def table(records: list[dict]) -> str:
    lines = [
        "| model | px | netslim | removed | MACs kept | Torch-Pruning | removed | MACs kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        ns, tp = r["netslim"], r["torch_pruning"]
        why = ns.get("reason") or ("; ".join(ns["fixed"][:2]) if ns.get("fixed") else "")
        status = ns["status"] + (f" ({why[:90]})" if why else "")
        lines.append(
            f"| {r['model']} | {r.get('size', '')} | {status} | {_pct(ns.get('removed'))} | "
            f"{_pct(ns.get('macs_kept'))} | {tp['status']}"
            f"{' (' + tp['reason'][:60] + ')' if tp.get('reason') else ''} | "
            f"{_pct(tp.get('removed'))} | {_pct(tp.get('macs_kept'))} |"
        )
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def summary(records: list[dict]) -> str:
    out = []
    for source in ("torchvision", "timm"):
        rs = [r for r in records if r["model"].startswith(source + ":") and r["batchnorm"]]
        if not rs:
            continue
        exact = sum(r["netslim"]["status"].startswith("exact") for r in rs)
        whole = sum(r["netslim"]["status"] == "exact" for r in rs)
        wrong = sum(r["netslim"]["status"] == "WRONG" for r in rs)
        runs = sum(r["torch_pruning"]["status"].startswith("runs") for r in rs)
        tp = sum(r["torch_pruning"]["status"] == "runs, exact" for r in rs)
        out.append(
            f"{source}: {len(rs)} models with BatchNorm; netslim exact on {exact} "
            f"({100 * exact / len(rs):.0f}%; {whole} with no group fixed), wrong on "
            f"{wrong}; Torch-Pruning runs on {runs} and equals its masked network on "
            f"{tp} ({100 * tp / len(rs):.0f}%)"
        )
    nobn = [r for r in records if not r["batchnorm"]]
    refused = sum(r["netslim"]["status"] == "refused" for r in nobn)
    out.append(f"without BatchNorm: {len(nobn)} models, netslim refuses {refused} in one line")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="specs (default: all)")
    parser.add_argument("--out", required=True, help="JSON lines file (appended, resumable)")
    parser.add_argument("--limit", type=int, default=600, help="seconds per model and tool")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    done = {}
    if out.exists():
        done = {r["model"]: r for r in map(json.loads, out.read_text().splitlines())}
    specs = args.models or all_specs()
    for spec in specs:
        if spec in done or spec in SKIP:
            continue
        record = measure(spec, limit=args.limit)
        done[spec] = record
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(
            f"{spec}: {record['netslim']['status']} | {record['torch_pruning']['status']} "
            f"({record.get('seconds', 0)} s)",
            flush=True,
        )
    records = [done[s] for s in specs if s in done]
    print(table(records))
    print()
    for spec, why in SKIP.items():
        if spec in specs:
            print(f"skipped {spec}: {why}")
    print(summary(records))


if __name__ == "__main__":
    main()
