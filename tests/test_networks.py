"""Tests of the seed networks in ``lightning_tricks.models.nets``."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lightning_tricks.models import NETWORKS, build_net
from lightning_tricks.models.nets import network_options
from lightning_tricks.models.nets.densenet_cifar import DenseLayer
from lightning_tricks.models.nets.resnet_cifar import ResidualUnit, ZeroPadShortcut

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py: one torch thread

HOOKED_TYPES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def build_on_meta(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build without allocating or initialising weights, for structure-only checks."""
    with torch.device("meta"):
        return build_net(name, num_classes, in_channels)


def leaf_modules(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if not list(m.children()) and not isinstance(m, nn.Identity)]


def reference_resnet_count(depth: int, num_classes: int, in_channels: int) -> int:
    """Parameters of the seed-004 CIFAR ResNet, counted layer by layer."""
    total, channels = 9 * in_channels * 16 + 2 * 16, 16
    for width in (16, 32, 64):
        for _ in range((depth - 2) // 6):
            total += 9 * channels * width + 9 * width * width + 2 * (2 * width)
            channels = width
    return total + 2 * 64 + 64 * num_classes + num_classes


def reference_densenet_count(growth_rates, layers_per_block: int, num_classes: int, in_channels: int) -> int:
    """Parameters of the seed-004 DenseNet (no bottleneck, no compression), layer by layer."""
    total, channels = 9 * in_channels * 16, 16
    for block, growth in enumerate(growth_rates):
        for _ in range(layers_per_block):
            total += 2 * channels + 9 * channels * growth
            channels += growth
        if block < len(growth_rates) - 1:
            total += 2 * channels + channels * channels
    return total + 2 * channels + channels * num_classes + num_classes


# --- parameter counts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "in_channels", "expected", "rel_tol"),
    [
        ("resnet110", {}, 3, 1.73e6, 0.02),  # seed 004 §4
        ("resnet20", {}, 3, 0.27e6, 0.02),  # He et al. 2016, Table 6
        ("densenet_cifar", {}, 3, 1.77e6, 0.05),  # seed 004 §4
        ("densenet_cifar", {"layers_per_block": 1}, 1, 10_000, 0.05),  # seed 004 §4, MNIST
        ("mlp", {}, 1, 0.77e6, 0.005),  # seed 004 §4.4
    ],
)
def test_parameter_count_matches_seed(name, options, in_channels, expected, rel_tol):
    net = build_net(name, num_classes=10, in_channels=in_channels, **options)
    assert count_parameters(net) == pytest.approx(expected, rel=rel_tol)


@pytest.mark.parametrize("depth", [8, 20, 56, 110])
@pytest.mark.parametrize(("num_classes", "in_channels"), [(10, 3), (100, 1)])
def test_resnet_parameter_count_equals_layerwise_reference(depth, num_classes, in_channels):
    net = build_net("resnet_cifar", num_classes, in_channels, depth=depth)
    assert count_parameters(net) == reference_resnet_count(depth, num_classes, in_channels)


@pytest.mark.parametrize(
    ("growth_rates", "layers_per_block"), [((8, 10, 14), 18), ((8, 10, 14), 2), ((4, 6), 3)]
)
def test_densenet_parameter_count_equals_layerwise_reference(growth_rates, layers_per_block):
    net = build_net("densenet_cifar", 100, 1, growth_rates=growth_rates, layers_per_block=layers_per_block)
    assert count_parameters(net) == reference_densenet_count(growth_rates, layers_per_block, 100, 1)


def test_mlp_has_exactly_the_seed_layers():
    net = build_net("mlp", num_classes=10, in_channels=1)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (1024, 500),
        (500, 500),
        (500, 10),
    ]
    assert count_parameters(net) == 1024 * 500 + 500 + 500 * 500 + 500 + 500 * 10 + 10


def test_dpn_counts_match_the_reference_cifar_implementation():
    # DPN-26 / DPN-92 for CIFAR: 11,574,842 and 34,236,634 parameters at 10 classes.
    assert count_parameters(build_on_meta("dpn26", 10)) == 11_574_842
    assert count_parameters(build_on_meta("dpn92", 10)) == 34_236_634


# --- architecture details ---------------------------------------------------------------------


def expected_vgg_layer_types(blocks_per_stage: int, batch_norm: bool) -> list[type]:
    """Seed 001 §5.2: input block, 3 × (N conv blocks + reduction block), FC output."""
    conv_act = [nn.Conv2d, nn.BatchNorm2d, nn.LeakyReLU] if batch_norm else [nn.Conv2d, nn.LeakyReLU]
    types = list(conv_act)
    for _ in range(3):
        types += conv_act * (2 * blocks_per_stage)
        types += [*conv_act, nn.AvgPool2d, *conv_act]
    return [*types, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]


@pytest.mark.parametrize(("name", "blocks", "weight_layers"), [("vgg38", 5, 38), ("vgg08", 0, 8)])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg_follows_seed_001_layer_by_layer(name, blocks, weight_layers, batch_norm):
    net = build_net(name, num_classes=100, batch_norm=batch_norm)
    layers = leaf_modules(net)
    assert [type(m) for m in layers] == expected_vgg_layer_types(blocks, batch_norm)
    weights = [m for m in layers if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weights) == weight_layers
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    assert all(
        (c.out_channels, c.kernel_size, c.padding, c.stride) == (32, (3, 3), (1, 1), (1, 1)) for c in convs
    )
    assert all((c.bias is None) == batch_norm for c in convs)
    assert all(m.negative_slope == 0.01 for m in layers if isinstance(m, nn.LeakyReLU))
    assert layers[-1].out_features == 100


def test_zero_pad_shortcut_matches_loop_reference():
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    out = ZeroPadShortcut(3, 5, stride=2)(x)
    expected = torch.zeros(2, 5, 4, 3, dtype=torch.float64)
    for b in range(2):
        for c in range(3):
            for i in range(4):
                for j in range(3):
                    expected[b, c, i, j] = x[b, c, 2 * i, 2 * j]
    assert torch.equal(out, expected)


def test_residual_unit_is_conv_bn_relu_conv_bn_plus_identity_without_final_relu():
    unit = ResidualUnit(4, 4).double()
    assert [type(m) for m in unit.residual] == [
        nn.Conv2d,
        nn.BatchNorm2d,
        nn.ReLU,
        nn.Conv2d,
        nn.BatchNorm2d,
    ]
    assert count_parameters(unit.shortcut) == 0
    nn.init.zeros_(unit.residual[-1].weight)  # f_r(v) = BN(...) = 0, so r(v) = v (seed 004 eq. 1)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert torch.equal(unit(x), x)


def test_resnet_has_depth_weight_layers_and_parameter_free_shortcuts():
    net = build_net("resnet110", 10)
    weights = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weights) == 110
    assert sum(isinstance(m, ResidualUnit) for m in net.modules()) == 54
    assert all(count_parameters(m) == 0 for m in net.modules() if isinstance(m, ZeroPadShortcut))


def test_dense_layer_keeps_its_input_and_adds_growth_rate_channels():
    layer = DenseLayer(6, growth_rate=4, bottleneck=True)
    x = torch.randn(2, 6, 5, 5)
    out = layer(x)
    assert out.shape == (2, 10, 5, 5)
    assert torch.equal(out[:, :6], x)
    assert [m.out_channels for m in layer.modules() if isinstance(m, nn.Conv2d)] == [16, 4]


def test_densenet_compression_sets_transition_widths():
    net = build_net("densenet_cifar", 10, growth_rates=(4, 4, 4), layers_per_block=3, compression=0.5)
    transitions = [m for m in net.features if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert [(m.in_channels, m.out_channels) for m in transitions] == [(28, 14), (26, 13)]
    assert net.head[-1].in_features == 13 + 3 * 4


@pytest.mark.parametrize(("name", "features"), [("dpn26", 2048 + 3 * 128), ("dpn92", 2048 + 4 * 128)])
def test_dpn_final_width_is_residual_plus_dense_channels(name, features):
    net = build_on_meta(name, 10)
    assert net.head[-1].in_features == features
    grouped = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert grouped and all(m.groups == 32 and m.kernel_size == (3, 3) for m in grouped)


def test_torchvision_stems_are_adapted_to_small_images():
    resnet = build_on_meta("resnet34", 10, in_channels=1)
    assert (resnet.conv1.in_channels, resnet.conv1.kernel_size, resnet.conv1.stride) == (
        1,
        (3, 3),
        (1, 1),
    )
    assert isinstance(resnet.maxpool, nn.Identity)
    densenet = build_on_meta("densenet121", 10, in_channels=1)
    conv0 = densenet.features.conv0
    assert (conv0.in_channels, conv0.kernel_size, conv0.stride) == (1, (3, 3), (1, 1))
    assert isinstance(densenet.features.pool0, nn.Identity)
    mobilenet = build_on_meta("mobilenetv2", 10, in_channels=1)
    stem = mobilenet.features[0][0]
    assert (stem.in_channels, stem.kernel_size, stem.stride) == (1, (3, 3), (1, 1))


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("resnet34", torchvision.models.resnet34),
        ("densenet121", torchvision.models.densenet121),
        ("mobilenetv2", torchvision.models.mobilenet_v2),
    ],
)
def test_torchvision_adaptation_computes_what_torchvision_computes(name, reference):
    net = build_net(name, 10).eval()
    original = reference(weights=None, num_classes=10).eval()
    if name == "resnet34":
        original.conv1, original.maxpool = net.conv1, nn.Identity()
    elif name == "densenet121":
        original.features.conv0, original.features.pool0 = net.features.conv0, nn.Identity()
    else:
        original.features[0][0] = net.features[0][0]
    original.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x), original(x), rtol=0, atol=0)


# --- every network: forward, backward, hooks ---------------------------------------------------


@pytest.mark.parametrize(("in_channels", "size"), [(1, 8), (3, 32)])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_forward_backward_with_module_backward_hooks(name, in_channels, size):
    torch.manual_seed(0)
    net = build_net(name, num_classes=7, in_channels=in_channels)
    fired = set()
    for module_name, module in net.named_modules():
        if isinstance(module, HOOKED_TYPES):
            module.register_full_backward_hook(lambda *_, n=module_name: fired.add(n))
    x = torch.randn(2, in_channels, size, size, requires_grad=True)
    out = net(x)
    assert out.shape == (2, 7)
    out.square().sum().backward()
    hooked = {n for n, m in net.named_modules() if isinstance(m, HOOKED_TYPES)}
    assert fired == hooked
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for param_name, param in net.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name


@pytest.mark.parametrize("name", ["resnet8", "densenet_cifar", "vgg08", "mlp", "mobilenetv2", "dpn26"])
def test_odd_and_non_square_inputs(name):
    options = {"layers_per_block": 1} if name == "densenet_cifar" else {}
    net = build_net(name, num_classes=3, in_channels=1, **options).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1, 9, 13)).shape == (2, 3)


def test_mlp_resamples_only_inputs_of_another_size():
    net = build_net("mlp", num_classes=4, in_channels=2, image_size=8).double()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    h = x.reshape(3, -1)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    for linear in linears[:-1]:
        h = torch.clamp(h @ linear.weight.T + linear.bias, min=0)
    expected = h @ linears[-1].weight.T + linears[-1].bias
    torch.testing.assert_close(net(x), expected, rtol=1e-12, atol=1e-12)
    assert net(torch.randn(3, 2, 28, 28, dtype=torch.float64)).shape == (3, 4)


# --- arguments --------------------------------------------------------------------------------


def test_unknown_name_lists_available_networks():
    with pytest.raises(ValueError, match="unknown network 'resnet111'") as error:
        build_net("resnet111", 10)
    assert all(name in str(error.value) for name in NETWORKS)


@pytest.mark.parametrize(
    "name",
    [
        "resnet20",
        "densenet_cifar",
        "mlp",
        "vgg08",
        "resnet34",
        "densenet121",
        "mobilenetv2",
        "dpn26",
    ],
)
@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"num_classes": 0}, ValueError, "num_classes"),
        ({"num_classes": 2.5}, TypeError, "num_classes"),
        ({"num_classes": 10, "in_channels": 0}, ValueError, "in_channels"),
        ({"num_classes": 10, "in_channels": True}, TypeError, "in_channels"),
    ],
)
def test_bad_common_arguments_name_the_argument(name, kwargs, error, argument):
    with pytest.raises(error, match=f"`{argument}`"):
        build_net(name, **kwargs)


@pytest.mark.parametrize(
    ("name", "options", "unknown"),
    [
        ("resnet20", {"batch_norm": True}, "batch_norm"),
        ("vgg38", {"depth": 38}, "depth"),
        ("dpn92", {"foo": 1}, "foo"),
    ],
)
def test_unknown_option_raises_type_error_naming_it(name, options, unknown):
    with pytest.raises(TypeError, match=f"{name!r} got unknown option.*{unknown}"):
        build_net(name, 10, **options)


@pytest.mark.parametrize(
    ("name", "options", "error", "argument"),
    [
        ("resnet_cifar", {"depth": 21}, ValueError, "depth"),
        ("resnet_cifar", {"depth": 2}, ValueError, "depth"),
        ("densenet_cifar", {"growth_rates": ()}, ValueError, "growth_rates"),
        ("densenet_cifar", {"growth_rates": (8, 0, 14)}, ValueError, r"growth_rates\[1\]"),
        ("densenet_cifar", {"layers_per_block": 0}, ValueError, "layers_per_block"),
        ("densenet_cifar", {"compression": 0.0}, ValueError, "compression"),
        ("densenet_cifar", {"bottleneck": 1}, TypeError, "bottleneck"),
        ("vgg38", {"batch_norm": "yes"}, TypeError, "batch_norm"),
        ("mlp", {"image_size": 0}, ValueError, "image_size"),
        ("mlp", {"hidden_sizes": 500}, TypeError, "hidden_sizes"),
    ],
)
def test_bad_network_options_name_the_option(name, options, error, argument):
    with pytest.raises(error, match=f"`{argument}`"):
        build_net(name, 10, **options)


def test_network_options_lists_keyword_options():
    assert network_options("resnet_cifar") == ("depth",)
    assert network_options("vgg38") == ("batch_norm",)
    assert network_options("resnet110") == ()
    assert set(network_options("densenet_cifar")) == {
        "growth_rates",
        "layers_per_block",
        "init_channels",
        "bottleneck",
        "compression",
    }
