"""Every per-sample method of the convolution rule against a brute-force loop, in float64.

``ConvFactor`` computes the per-sample weight gradients g_i (seed 004_e5d92837cb57ce8a.txt §3,
eq. 6) by one of three methods chosen from the layer's shape: a B·groups-group convolution backward
("grouped"), one batched matrix product per kernel offset on shifted views of the padded map
("shifted", stride 1) or unfolded patches ("patches"). Each is checked here on its own, forced, for
many geometries, against g_i from ``torch.autograd.grad`` of ⟨conv(x_i), δ_i⟩ one sample at a time;
``rows()`` (the flattened g_i that G is built from, in the method's own entry order) must give
the same Gram matrix. The chooser is checked on the ResNet-20 shapes it was tuned for.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_tricks.gradients import GRAM_RULES, GramCollector
from lightning_tricks.gradients.gram import factors
from lightning_tricks.gradients.gram.factors import ConvFactor

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py: one torch thread

DTYPE = torch.float64

GEOMETRIES = {
    "conv2d 3x3": (lambda: nn.Conv2d(4, 6, 3, padding=1), (8, 8)),
    "conv2d rectangular map, no padding": (lambda: nn.Conv2d(3, 5, 3), (6, 9)),
    "conv2d dilation, groups": (lambda: nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2), (7, 5)),
    "conv2d even kernel, same, reflect": (
        lambda: nn.Conv2d(3, 4, 4, padding="same", padding_mode="reflect", bias=False),
        (6, 6),
    ),
    "conv2d anisotropic kernel, circular": (
        lambda: nn.Conv2d(2, 3, (1, 3), padding=(0, 1), padding_mode="circular"),
        (5, 4),
    ),
    "conv2d stride 2": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (9, 8)),
    "conv1d dilation": (lambda: nn.Conv1d(3, 4, 3, padding=3, dilation=3), (11,)),
    "conv3d": (lambda: nn.Conv3d(2, 3, (2, 3, 2), padding=(1, 0, 1), dilation=(1, 2, 1)), (3, 6, 4)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, padding=1, groups=2), (5, 6)),
    "conv_transpose2d dilation, output padding": (
        lambda: nn.ConvTranspose2d(3, 2, 2, dilation=2, output_padding=1, padding=1),
        (4, 5),
    ),
    "conv_transpose1d stride 2": (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2, output_padding=1), (6,)),
}

METHODS = ("grouped", "shifted", "patches")


def reference_per_sample(layer: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """g_i(W) = ∇_W ⟨layer(x_i), δ_i⟩, one autograd.grad call per sample."""
    rows = []
    for i in range(len(x)):
        (grad,) = torch.autograd.grad((layer(x[i : i + 1]) * delta[i : i + 1]).sum(), layer.weight)
        rows.append(grad)
    return torch.stack(rows)


def factor_for(name: str, batch: int, seed: int = 0) -> tuple[ConvFactor, torch.Tensor]:
    """The rule's factor for one layer of the geometry and random x, δ; and the reference g_i."""
    torch.manual_seed(seed)
    make_layer, size = GEOMETRIES[name]
    layer = make_layer().to(DTYPE)
    x = torch.randn(batch, layer.in_channels, *size, dtype=DTYPE)
    with torch.no_grad():
        delta = torch.randn_like(layer(x))
    factor = GRAM_RULES[type(layer)].factorize(layer, x, delta)["weight"]
    return factor, reference_per_sample(layer, x, delta)


def applicable(name: str, method: str) -> bool:
    """Shifted views need stride 1."""
    return method != "shifted" or all(s == 1 for s in GEOMETRIES[name][0]().stride)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch", [1, 5, 16])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_each_method_matches_per_sample_loop(
    name: str, batch: int, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not applicable(name, method):
        pytest.skip("shifted views need stride 1")
    monkeypatch.setattr(ConvFactor, "per_sample_method", lambda self: method)
    factor, expected = factor_for(name, batch)
    grads = factor.per_sample()
    assert grads.shape == expected.shape and grads.dtype == DTYPE
    torch.testing.assert_close(grads, expected, rtol=1e-12, atol=1e-12)
    rows = factor.rows()  # (B, P), or split into column blocks (n, B, P / n)
    blocks = rows if rows.dim() == 3 else rows[None]
    assert blocks.shape[1] == batch and blocks.shape[0] * blocks.shape[2] == expected[0].numel()
    flat = expected.reshape(batch, -1)
    gram = sum(block @ block.T for block in blocks)
    torch.testing.assert_close(gram, flat @ flat.T, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("im2col", [True, False])
@pytest.mark.parametrize("name", [name for name in GEOMETRIES if name.startswith("conv2d")])
def test_patches_by_im2col_or_views_match_per_sample_loop(
    name: str, im2col: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2-D patches from ``F.unfold`` (tiny maps) or from strided views: the per-sample loop's
    g_i, and bit for bit the same patches."""
    monkeypatch.setattr(ConvFactor, "per_sample_method", lambda self: "patches")
    monkeypatch.setattr(factors, "IM2COL_MAX_POSITIONS", 10**6 if im2col else 0)
    factor, expected = factor_for(name, 5)
    torch.testing.assert_close(factor.per_sample(), expected, rtol=1e-12, atol=1e-12)
    layer, padded = factor.layer, factor._read_and_other()[0]
    patches = factors.unfold_patches(padded, layer.kernel_size, layer.stride, layer.dilation)
    monkeypatch.setattr(factors, "IM2COL_MAX_POSITIONS", 0 if im2col else 10**6)
    assert torch.equal(
        patches, factors.unfold_patches(padded, layer.kernel_size, layer.stride, layer.dilation)
    )


@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("name", [name for name in GEOMETRIES if applicable(name, "shifted")])
def test_shifted_products_stacked_or_per_offset_match_per_sample_loop(
    name: str, stacked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shifted products as one product on the stacked windows (small) or one per kernel offset
    (large): both give the per-sample loop's g_i and Gram."""
    monkeypatch.setattr(ConvFactor, "per_sample_method", lambda self: "shifted")
    monkeypatch.setattr(factors, "SHIFTED_STACK_MAX_ENTRIES", 10**12 if stacked else 0)
    factor, expected = factor_for(name, 5)
    torch.testing.assert_close(factor.per_sample(), expected, rtol=1e-12, atol=1e-12)
    flat, rows = expected.reshape(5, -1), factor.rows()
    gram = sum(block @ block.T for block in (rows if rows.dim() == 3 else rows[None]))
    torch.testing.assert_close(gram, flat @ flat.T, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_methods_agree_with_each_other_in_float32(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same float32 layer through every applicable method: equal up to float32 round-off."""
    torch.manual_seed(1)
    make_layer, size = GEOMETRIES[name]
    layer = make_layer()
    x = torch.randn(6, layer.in_channels, *size)
    with torch.no_grad():
        delta = torch.randn_like(layer(x))
    results = {}
    for method in METHODS:
        if applicable(name, method):
            monkeypatch.setattr(ConvFactor, "per_sample_method", lambda self, m=method: m)
            results[method] = ConvFactor(x, delta, layer, torch.float32).per_sample()
    for method, grads in results.items():
        torch.testing.assert_close(grads, results["grouped"], rtol=1e-4, atol=1e-4, msg=method)


@pytest.mark.parametrize("batch", [9, 64])
@pytest.mark.parametrize("method", METHODS)
def test_collector_on_a_conv_net_through_each_method(
    method: str, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """G of a small conv net, every convolution through one method (stride 2 stays on patches when
    shifted is asked), against J Jᵀ of a per-sample autograd loop; at B = 64 the 12→12 layer's
    1,296 entries take the block-triangular Gram."""
    monkeypatch.setattr(
        ConvFactor,
        "per_sample_method",
        lambda self: method if method != "shifted" or max(self.layer.stride) == 1 else "patches",
    )
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 12, 3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(12, 8, 3, padding=1, groups=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).to(DTYPE)
    x, y = torch.randn(batch, 3, 8, 8, dtype=DTYPE), torch.randint(0, 3, (batch,))
    rows = []
    params = list(model.parameters())
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    jacobian = torch.stack(rows)
    with GramCollector(model, method="materialize") as gram:
        nn.functional.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(gram.matrix(), jacobian @ jacobian.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("layer", "size", "on_cpu", "elsewhere"),
    [
        (nn.Conv2d(3, 16, 3, padding=1), 32, "patches", "grouped"),  # stem: 27-entry patches
        (nn.Conv2d(16, 16, 3, padding=1), 32, "grouped", "grouped"),
        (nn.Conv2d(32, 32, 3, padding=1), 16, "grouped", "grouped"),
        (nn.Conv2d(64, 64, 3, padding=1), 8, "shifted", "patches"),  # 64 positions < 2 × 64 channels
        (nn.Conv2d(32, 64, 3, stride=2, padding=1), 16, "patches", "patches"),  # 8×8 output, stride 2
        (nn.Conv2d(16, 16, 3, padding=1), 8, "grouped", "patches"),  # the host-overhead proxy's maps
        (nn.Conv2d(16, 32, 3, stride=2, padding=1), 8, "patches", "patches"),
        (nn.Conv2d(32, 32, 3, padding=1), 4, "shifted", "patches"),
        (nn.Conv2d(32, 64, 3, stride=2, padding=1), 4, "patches", "patches"),
        (nn.Conv2d(64, 64, 3, padding=1), 2, "shifted", "patches"),
    ],
)
def test_chooser_on_resnet20_shapes(layer: nn.Module, size: int, on_cpu: str, elsewhere: str) -> None:
    """The CPU choices (:data:`~lightning_tricks.gradients.gram.factors.GROUPED_MIN_POSITIONS_PER_CHANNEL`),
    and the GPU ones (fewer kernel launches), seen on the shape-only meta device; CIFAR's 32×32
    maps and the host-overhead proxy's 8×8."""
    x = torch.randn(2, layer.in_channels, size, size)
    with torch.no_grad():
        delta = torch.randn_like(layer(x))
    assert ConvFactor(x, delta, layer, torch.float32).per_sample_method() == on_cpu
    meta = ConvFactor(x.to("meta"), delta.to("meta"), layer.to("meta"), torch.float32)
    assert meta.per_sample_method() == elsewhere
