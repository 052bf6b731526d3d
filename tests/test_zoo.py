"""The CNNs people bring: every torchvision classification model with BatchNorm, and one
model of each of 22 timm families, slimmed exactly.

Each model gets random BatchNorm statistics and a random half of every channel group made
unimportant (tiny gamma in all the BatchNorms that scale it), as sparsity training leaves
it; then it is traced and planned at ratio 0.5 and must prune to a network that computes
what its reference computes (the masked network without compensation; the gamma-zeroed
one with compensation, under wrap-around padding), train one step with the L1 term, and
load back from its checkpoint to identical outputs. Models the engine cannot yet prune
exactly are listed with their exact one-line refusal: never a silent skip.

torchvision and timm are the ``zoo`` extra, installed by ``make test``: a missing one
fails this file, it is never skipped.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from conftest import make_sparse
from torch import nn

import netslim
from netslim.engine.plan import plan_pruning, reference_network
from netslim.engine.sparsity import add_bn_l1_grad, batchnorms
from netslim.engine.surgery import apply_plan
from netslim.errors import NetslimError

pytestmark = pytest.mark.slow  # not in make test-fast

TORCHVISION = torchvision.models.list_models(module=torchvision.models)
# classification models without any BatchNorm: nothing to slim, and netslim says so
NO_BATCHNORM = [
    "alexnet",
    "convnext_base",
    "convnext_large",
    "convnext_small",
    "convnext_tiny",
    "squeezenet1_0",
    "squeezenet1_1",
    "swin_b",
    "swin_s",
    "swin_t",
    "swin_v2_b",
    "swin_v2_s",
    "swin_v2_t",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "vit_b_16",
    "vit_b_32",
    "vit_h_14",
    "vit_l_16",
    "vit_l_32",
]
WITH_BATCHNORM = [name for name in TORCHVISION if name not in NO_BATCHNORM]
# the smallest model of each torchvision family and block type, in make test; the larger
# sizes (the same blocks, wider and deeper) and MaxViT (224 px) only in make test-all:
# 4 minutes more on 2 cores
QUICK_TORCHVISION = {
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "densenet121",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "vgg11_bn",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mnasnet0_5",
    "shufflenet_v2_x0_5",
    "googlenet",
    "inception_v3",
}
# one model per timm family, the smallest variant (the family is the model's source module)
TIMM = [
    "resnet10t",
    "efficientnet_b0",
    "mobilenetv3_small_050",
    "regnetx_002",
    "rexnet_100",
    "ese_vovnet19b_slim_dw",
    "densenet121",
    "dla46_c",
    "hrnet_w18_small",
    "ghostnet_050",
    "res2net50_48w_2s",
    "resnest14d",
    "selecsls42b",
    "resnetv2_18",
    "repghostnet_050",
    "gernet_s",
    "hgnetv2_b0",
    "legacy_seresnet18",
    "xception41p",
    "inception_v3",
    "dpn48b",
    "cs3darknet_s",
]
# the input side each model needs at least (32 for the rest)
INPUT_SIZE = {"inception_v3": 75, "maxvit_t": 224}
# models the engine refuses (or cannot yet prune exactly): the exact one-line error
EXPECTED_REFUSALS: dict[str, str] = {}


def circular(model: nn.Module) -> nn.Module:
    """A copy with wrap-around padding: a constant map stays constant at the borders too."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.padding_mode = "circular"
    return model


def wrappable_size(model: nn.Module, size: int) -> int:
    """The smallest of size, 2 size, 4 size at which every padded conv's input is at least as
    large as its padding, so that wrap-around padding is possible everywhere."""
    while size < 256:
        try:
            with torch.no_grad():
                circular(model).eval()(torch.zeros(1, 3, size, size))
            return size
        except RuntimeError as e:
            if "wrapping around" not in str(e):
                raise
            size *= 2
    return size


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to 1e-4 of the output's scale."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * max(scale, 1e-3))


def check_slims_exactly(model: nn.Module, size: int, tmp_path, arch=None, builder=None) -> None:
    torch.manual_seed(0)
    size = wrappable_size(model, size)
    model, graph = make_sparse(model, (1, 3, size, size))
    with warnings.catch_warnings():  # a floored group is fine here
        warnings.simplefilter("ignore")
        plan = plan_pruning(model, 0.5, graph=graph)
    assert plan.pruned_share > 0.05  # really pruned (some networks keep many groups whole)
    x = torch.randn(2, 3, size, size)
    pruned = apply_plan(model, plan, compensate=False).eval()
    with torch.no_grad():
        assert_close(pruned(x), reference_network(model, plan, compensate=False)(x))
        wrapped = circular(model)
        compensated = apply_plan(wrapped, plan, compensate=True).eval()
        assert_close(compensated(x), reference_network(wrapped, plan, compensate=True)(x))
        assert netslim.count_params(pruned) < netslim.count_params(model)

    # save and load back: the same network, computing the same outputs
    path = tmp_path / "pruned.pth"
    netslim.save(pruned, path, arch=arch, image_size=size)
    loaded = netslim.load(path, builder)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))

    # one training step with the L1 term on gamma
    pruned.train()
    opt = torch.optim.SGD(pruned.parameters(), lr=0.01)
    loss = F.cross_entropy(pruned(x), torch.tensor([0, 1]))
    loss.backward()
    bn = next(m for _, m in batchnorms(pruned) if m.affine)
    grad = bn.weight.grad.clone()
    add_bn_l1_grad(pruned, lam=1e-2)
    torch.testing.assert_close(bn.weight.grad, grad + 1e-2 * torch.sign(bn.weight.detach()))
    before = bn.weight.detach().clone()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(bn.weight.detach(), before)


def check_or_refused(name: str, build, size: int, tmp_path, **load) -> None:
    if name in EXPECTED_REFUSALS:
        with pytest.raises(NetslimError, match=re.escape(EXPECTED_REFUSALS[name])) as e:
            check_slims_exactly(build(), size, tmp_path, **load)
        assert "\n" not in str(e.value)
        return
    check_slims_exactly(build(), size, tmp_path, **load)


def small_vgg_bn(name: str) -> nn.Module:
    """torchvision's VGG with BN, its 4096-wide classifier narrowed to 64 (the builder has
    no width argument; the flatten -> linear is what matters)."""
    model = netslim.build_model(f"torchvision:{name}", 10)
    model.classifier[0] = nn.Linear(512 * 7 * 7, 64)
    model.classifier[3] = nn.Linear(64, 64)
    model.classifier[6] = nn.Linear(64, 10)
    return model


def narrow_regnet(name: str) -> nn.Module:
    """regnet_y_128gf's layout (depth 27, SE) at an eighth of its widths: 637M parameters
    are too many for a unit test."""
    from torchvision.models.regnet import BlockParams, RegNet

    assert name == "regnet_y_128gf"
    params = BlockParams.from_init_params(
        depth=27, w_0=56, w_a=20.1, w_m=2.52, group_width=32, se_ratio=0.25
    )
    return RegNet(params, num_classes=10)


REDUCED = {name: small_vgg_bn for name in ("vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")}
REDUCED["regnet_y_128gf"] = narrow_regnet


def test_every_torchvision_classification_model_is_listed():
    assert set(NO_BATCHNORM) <= set(TORCHVISION) and len(WITH_BATCHNORM) >= 50
    assert QUICK_TORCHVISION <= set(WITH_BATCHNORM)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=() if name in QUICK_TORCHVISION else pytest.mark.exhaustive)
        for name in WITH_BATCHNORM
    ],
)
def test_torchvision_model_slims_exactly(name, tmp_path):
    size = INPUT_SIZE.get(name, 32)
    if name in REDUCED:  # loads back through the builder, as a user's own module does
        build = lambda: REDUCED[name](name)  # noqa: E731
        check_or_refused(name, build, size, tmp_path, builder=build)
    else:  # loads back from the spec stored in the checkpoint
        spec = f"torchvision:{name}"
        check_or_refused(name, lambda: netslim.build_model(spec, 10), size, tmp_path, arch=spec)


@pytest.mark.parametrize("name", NO_BATCHNORM)
def test_torchvision_model_without_batchnorm_is_refused_in_one_line(name):
    with torch.device("meta"):  # never computed: the refusal comes before any tracing
        model = netslim.build_model(f"torchvision:{name}", 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with pytest.raises(
        NetslimError, match="^nothing to slim in .*: no BatchNorm scales any prunable channel$"
    ):
        netslim.prune_model(model, 0.5)


def test_timm_models_span_twenty_families():
    families = {timm.models.model_entrypoint(name).__module__ for name in TIMM}
    assert len(families) == len(TIMM) >= 20, sorted(families)


@pytest.mark.parametrize("name", TIMM)
def test_timm_model_slims_exactly(name, tmp_path):
    spec = f"timm:{name}"
    size = INPUT_SIZE.get(name, 32)
    check_or_refused(name, lambda: netslim.build_model(spec, 10), size, tmp_path, arch=spec)
