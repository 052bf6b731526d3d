"""Building the physically smaller network a :class:`~netslim.engine.plan.PrunePlan` describes.

:func:`apply_plan` copies the model and replaces every conv, linear and BatchNorm layer
by a smaller one holding only the kept channels' weights. The module tree, its names
and ``forward`` stay the same, so a pruned network is described completely by its
architecture and the channel counts of its layers (:func:`channel_counts`), and
:func:`resize_layers` rebuilds it from those counts before loading a state_dict.

Bias compensation (``compensate=True``). Once a channel's gammas are 0, every BatchNorm
that scales it outputs the constant ``beta`` there, so each layer reading the channel
sees a constant (``relu(beta)`` after a ReLU, and so on). Dropping the channel drops that
constant from what the reader sums, so it is folded back in: into the running mean of
the BatchNorm that directly follows the reader, else into the reader's bias (created if
it had none). The constants are measured, not derived: the network with the pruned gammas
set to 0 runs on two random inputs of the traced shape (on the traced input itself where
the forward reads tensor values, so that it takes the traced path), and records what each
reader sees on the removed channels; a reader that does not run once per input, as in the
trace, ends in NetslimError rather than a measurement of another path.
The pruned network then computes exactly what that network computes wherever the
readers see no zero padding (1x1 convs, linear layers, and the interior of every map);
at a padded border the zeros replace part of the constant, so there the fold is an
approximation. Where a removed channel's constant reaches a layer only multiplied by
something that varies (a squeeze-excitation gate), nothing can be folded: there the
channel is dropped as the official code does, and the reference network zeroes its beta
too (:func:`~netslim.engine.plan.reference_network`).

Without compensation the result is exactly the official code's masked network (pruned
gamma *and* beta zeroed, so the dropped channels output 0 after their BatchNorm). A
function with ``f(0) != 0`` after the BatchNorm (a hard-sigmoid) turns that 0 into the
constant ``f(0)``; it is measured and folded the same way, so the equality holds there too
(the channel tracer keeps such channels where a zero-padded conv reads them).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from netslim.engine.graph import Layer
from netslim.engine.plan import PrunePlan, reference_network
from netslim.engine.rules import Rules, default_rules
from netslim.errors import NetslimError

#: Module name -> ``[in, out, groups, has_bias]`` (conv), ``[in, out, has_bias]`` (linear),
#: ``[channels]`` (BatchNorm) or ``[in, out]`` (a layer of your own the rules slice).
ChannelCounts = dict[str, list[int]]


def channel_counts(model: nn.Module, rules: Rules | None = None) -> ChannelCounts:
    """The channel counts of every conv, linear and BatchNorm layer of ``model``, and of every
    layer of your own that ``rules`` (default: the default rules) say how to slice."""
    rules = rules or default_rules()
    counts: ChannelCounts = {}
    for name, m in model.named_modules():
        spec = rules.layer_spec(m)
        if spec is not None:
            if spec.counts(m) is not None:  # else: not the layout registered, never pruned
                counts[name] = list(spec.counts(m))
        elif isinstance(m, nn.Conv2d):
            counts[name] = [m.in_channels, m.out_channels, m.groups, int(m.bias is not None)]
        elif isinstance(m, nn.Linear):
            counts[name] = [m.in_features, m.out_features, int(m.bias is not None)]
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            counts[name] = [m.num_features]
    return counts


def _resize(m: nn.Module, count: list[int], rules: Rules) -> None:
    """Give layer ``m`` other channel counts in place: fresh, uninitialised weights of the
    new shapes (same device, dtype); its class and everything else stay (a subclass's own
    extras, such as timm's activation in BatchNormAct2d, included)."""
    spec = rules.layer_spec(m)
    if spec is not None:
        spec.resize(m, *count)
        return
    ref = next(m.parameters(), None)
    ref = ref if ref is not None else next(m.buffers())

    def empty(*shape: int) -> nn.Parameter:
        return nn.Parameter(ref.new_empty(shape))

    if isinstance(m, nn.Conv2d):
        n_in, n_out, groups, bias = count
        m.in_channels, m.out_channels, m.groups = n_in, n_out, groups
        m.weight = empty(n_out, n_in // groups, *m.kernel_size)
        m.register_parameter("bias", empty(n_out) if bias else None)
    elif isinstance(m, nn.Linear):
        n_in, n_out, bias = count
        m.in_features, m.out_features = n_in, n_out
        m.weight = empty(n_out, n_in)
        m.register_parameter("bias", empty(n_out) if bias else None)
    else:
        (n,) = count
        m.num_features = n
        if m.affine:
            m.weight, m.bias = empty(n), empty(n)
        if m.track_running_stats:
            m.running_mean = ref.new_zeros(n)
            m.running_var = ref.new_ones(n)


def resize_layers(
    model: nn.Module, counts: ChannelCounts, source: str = "checkpoint", rules: Rules | None = None
) -> nn.Module:
    """Replace ``model``'s layers in place by empty ones with the given channel counts, then
    run the rules' after-resize hooks (attributes a library derives from channel counts).

    Used to rebuild a pruned network from its architecture before loading its weights.
    """
    rules = rules or default_rules()
    current = channel_counts(model, rules)
    unknown = sorted(set(counts) - set(current))
    if unknown:
        raise NetslimError(
            f"{source} names layers the architecture does not have: {', '.join(unknown[:5])}"
        )
    for name, count in counts.items():
        if list(count) != current[name]:
            if len(count) != len(current[name]):
                raise NetslimError(f"{source}: bad channel counts {count} for layer {name}")
            _resize(model.get_submodule(name), list(count), rules)
    return rules.after_resize(model)


def _compensation(
    model: nn.Module, plan: PrunePlan, compensate: bool, rules: Rules
) -> dict[str, torch.Tensor]:
    """Layer name -> the shift to add to its output (one value per original output channel):
    what the removed input channels contribute in the reference network, where they hold
    constants (a grouped conv loses its outputs with its inputs: nothing to fold; a layer of
    your own reads only removed channels that hold zero: nothing to fold)."""
    # (an auxiliary head that only training runs is not measured: it gets no fold)
    readers = {
        name: ~plan.kept_of(layer.inputs)
        for name, layer in plan.graph.layers.items()
        if layer.kind not in ("grouped", "custom")
        and layer.inference
        and not bool(plan.kept_of(layer.inputs).all())
    }
    if not readers:
        return {}
    reference = reference_network(model, plan, compensate)
    seen = _probe(reference, plan, list(readers), rules)
    shifts = {}
    for name, removed in readers.items():
        weight = model.get_submodule(name).weight.detach()
        layer = plan.graph.layers[name]
        read = seen[name]
        removed = removed.to(read.device)
        if layer.kind == "linear":  # features on the last dim
            values = read.reshape(-1, read.shape[-1])[:, removed]
            weight = weight[:, removed.to(weight.device)]
        else:  # (N, C, H, W): positions after the channels
            values = read.transpose(0, 1)[removed].flatten(1).t()
            weight = weight[:, removed.to(weight.device)].sum(dim=(2, 3))
        ref = values[0]
        spread = (values - ref).abs().amax(dim=0)
        # Only constant inputs can be folded; anything else stays dropped as in the official code.
        constant = torch.where(spread <= 1e-5 * (1 + ref.abs()), ref, torch.zeros_like(ref))
        if bool((constant != 0).any()):
            shifts[name] = weight @ constant
    return shifts


def _probe(
    reference: nn.Module, plan: PrunePlan, readers: list[str], rules: Rules
) -> dict[str, torch.Tensor]:
    """What each reader gets as input when ``reference`` runs the traced path: on two random
    inputs of the traced shape where the trace saw no value read, else on the traced input
    itself (zeros), the one input known to take the traced path. Each reader must run once
    per input, as in the trace; random inputs that run them otherwise are replaced by the
    traced one, and where even that does not, NetslimError: the measurement would be of
    another path."""
    graph = plan.graph
    param = next(reference.parameters())
    traced = [torch.zeros(graph.input_size)]
    random = [
        torch.randn(graph.input_size, generator=torch.Generator().manual_seed(seed))
        for seed in (0, 1)
    ]
    calls: dict[str, int] = {}
    for inputs in [traced] if graph.value_reads else [random, traced]:
        runs = [
            _run_readers(reference, x.to(param.device, param.dtype), readers, rules) for x in inputs
        ]
        calls = {name: sum(c[name] for _, c in runs) for name in readers}
        if all(n == len(inputs) for n in calls.values()):
            return {name: torch.cat([seen[name] for seen, _ in runs]) for name in readers}
    name = next(n for n, c in calls.items() if c != 1)
    why = f" (it reads tensor values: {graph.value_reads[0]})" if graph.value_reads else ""
    raise NetslimError(
        f"cannot measure what the removed channels leave: on the traced input the masked "
        f"{graph.model_name} ran {name} {calls[name]} times, where the trace ran it once{why}, "
        "so its path changes from run to run; make forward() take one path for one input, "
        "or leave that module unpruned (ignore=, --ignore)"
    )


def _run_readers(
    reference: nn.Module, x: torch.Tensor, readers: list[str], rules: Rules
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Run ``reference`` on ``x``: each reader's input, and how often each ran."""
    seen: dict[str, torch.Tensor] = {}
    calls = dict.fromkeys(readers, 0)

    def record(name: str, read: torch.Tensor) -> None:
        seen[name] = read.detach()
        calls[name] += 1

    handles = [
        reference.get_submodule(name).register_forward_hook(
            lambda m, inputs, out, name=name: record(name, inputs[0])
        )
        for name in readers
    ]
    try:
        with torch.no_grad():
            reference(*rules.model_inputs(reference, x))
    finally:
        for h in handles:
            h.remove()
    return seen, calls


def _copy_norm(
    old: nn.Module, new: nn.Module, idx: torch.Tensor, shift: torch.Tensor | None
) -> None:
    if old.affine:
        new.weight.copy_(old.weight[idx])
        new.bias.copy_(old.bias[idx])
    if old.track_running_stats:
        mean = old.running_mean if shift is None else old.running_mean - shift
        new.running_mean.copy_(mean[idx])
        new.running_var.copy_(old.running_var[idx])
        new.num_batches_tracked.copy_(old.num_batches_tracked)


def _copy_layer(
    old: nn.Module,
    new: nn.Module,
    layer: Layer,
    i: torch.Tensor,
    o: torch.Tensor,
    shift: torch.Tensor | None,
    rules: Rules,
) -> None:
    if layer.kind == "custom":
        rules.layer_spec(old).copy(old, new, i, o)
        return
    weight = old.weight[o]
    if layer.kind != "grouped":
        weight = weight[:, i]
    new.weight.copy_(weight)
    if new.bias is not None:
        bias = old.bias if old.bias is not None else old.weight.new_zeros(old.weight.shape[0])
        new.bias.copy_((bias if shift is None else bias + shift)[o])


@torch.no_grad()
def apply_plan(
    model: nn.Module, plan: PrunePlan, compensate: bool = True, rules: Rules | None = None
) -> nn.Module:
    """The smaller network keeping ``plan``'s channels, with their weights copied in.

    ``model`` is not modified. See the module docs for ``compensate``. ``rules``: those the
    plan's graph was traced with by default (``plan.graph.rules``).
    """
    graph = plan.graph
    rules = rules or graph.rules or default_rules()
    names = {name for name, _ in model.named_modules()}  # once: per layer it was quadratic
    missing = [n for n in graph.layers if n not in names]
    if missing:
        raise NetslimError(f"the prune plan is for another network: no layer {missing[0]}")
    shifts = _compensation(model, plan, compensate, rules)
    into_norm = {
        layer.norm: shifts.pop(name)
        for name, layer in graph.layers.items()
        if name in shifts and layer.norm is not None
    }
    device = next(model.parameters()).device
    kept = {
        name: (
            plan.kept_of(layer.inputs).nonzero().flatten().to(device),
            plan.kept_of(layer.outputs).nonzero().flatten().to(device),
        )
        for name, layer in graph.layers.items()
    }
    pruned = copy.deepcopy(model)
    counts = channel_counts(model, rules)
    for name, layer in graph.layers.items():
        n_in, n_out = (len(idx) for idx in kept[name])
        old = counts[name]
        if layer.kind == "custom":
            counts[name] = [n_in, n_out]
        elif layer.kind == "linear":
            counts[name] = [n_in, n_out, int(old[2] or name in shifts)]
        else:  # a grouped conv keeps the width of each of its convolution groups
            groups = n_in * layer.groups // len(layer.inputs) if layer.kind == "grouped" else 1
            counts[name] = [n_in, n_out, groups, int(old[3] or name in shifts)]
    for name, space in graph.norms.items():
        counts[name] = [int(plan.kept_of(space).sum())]
    resize_layers(pruned, counts, rules=rules)
    for name, layer in graph.layers.items():
        _copy_layer(
            model.get_submodule(name),
            pruned.get_submodule(name),
            layer,
            *kept[name],
            shifts.get(name),
            rules,
        )
    for name, space in graph.norms.items():
        idx = plan.kept_of(space).nonzero().flatten().to(device)
        _copy_norm(model.get_submodule(name), pruned.get_submodule(name), idx, into_norm.get(name))
    for name, space in graph.gathers.items():  # its inputs are fixed: only outputs go
        kept_out = plan.kept_of(space).to(device)
        old = model.get_submodule(name)
        index = rules.selection_index(old) or "index"
        setattr(pruned.get_submodule(name), index, getattr(old, index)[kept_out].clone())
    return pruned
