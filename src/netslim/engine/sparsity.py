"""The L1 penalty on BatchNorm scaling factors, and how sparse they are.

Sparsity training adds ``lam * sum(|gamma|)`` over every BatchNorm's weight to the
loss. Rather than building that term into the graph, its sub-gradient
``lam * sign(gamma)`` is added to ``gamma.grad`` after ``backward()`` and before the
optimizer step, exactly as the paper's code does. Use it in your own loop::

    loss.backward()
    netslim.add_bn_l1_grad(model, lam=1e-4)
    optimizer.step()

Under mixed precision with a ``GradScaler`` call ``scaler.unscale_(optimizer)``
first: the penalty must act on true (unscaled) gradients.
"""

from __future__ import annotations

import torch
from torch import nn

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def batchnorms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The affine BatchNorm layers of ``model`` as ``(name, module)`` in definition order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BN_TYPES) and m.affine]


@torch.no_grad()
def add_bn_l1_grad(model: nn.Module, lam: float) -> None:
    """Add ``lam * sign(gamma)`` to the gradient of every BatchNorm scaling factor.

    Call after ``loss.backward()`` and before ``optimizer.step()``. A gamma whose
    ``.grad`` is None (e.g. a frozen layer) is skipped. ``lam == 0`` does nothing.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if lam == 0:
        return
    for _, bn in batchnorms(model):
        if bn.weight.grad is not None:
            bn.weight.grad.add_(torch.sign(bn.weight), alpha=lam)


def bn_gammas(model: nn.Module) -> torch.Tensor:
    """All BatchNorm scaling factors of ``model`` as one flat float32 tensor (detached)."""
    gammas = [bn.weight.detach().flatten().float() for _, bn in batchnorms(model)]
    return torch.cat(gammas) if gammas else torch.empty(0)


def bn_sparsity(model: nn.Module, threshold: float = 0.01) -> float:
    """Share of all BatchNorm gammas with ``|gamma| < threshold`` (0.0 to 1.0)."""
    gammas = bn_gammas(model)
    if gammas.numel() == 0:
        return 0.0
    return (gammas.abs() < threshold).float().mean().item()


def gamma_quantiles(model: nn.Module) -> dict[str, float]:
    """Quantiles of ``|gamma|`` (min, 10%, 25%, median, 75%, 90%, max) for the logs."""
    gammas = bn_gammas(model).abs()
    if gammas.numel() == 0:
        return {}
    values = torch.quantile(gammas, torch.tensor(QUANTILES))
    return {f"q{int(q * 100)}": v.item() for q, v in zip(QUANTILES, values)}


def gamma_histogram(model: nn.Module, low: int = -6, high: int = 1, per_decade: int = 10) -> dict:
    """Counts of ``|gamma|`` in log-spaced bins from ``10**low`` to ``10**high``, for the logs.

    Returns ``{"log10_edges": [low, high, per_decade], "counts": [...]}`` (``(high - low) *
    per_decade`` bins); values below the first edge (exact zeros too) count in the first
    bin and values above the last in the last, so the counts add up to every gamma.
    """
    gammas = bn_gammas(model).abs().double()
    bins = (high - low) * per_decade
    where = (torch.log10(gammas.clamp_min(10.0**low)) - low) * per_decade
    index = where.floor().long().clamp(0, bins - 1)
    counts = torch.bincount(index, minlength=bins)
    return {"log10_edges": [low, high, per_decade], "counts": counts.tolist()}
