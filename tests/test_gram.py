"""GramCollector against brute-force references (seed 004_e5d92837cb57ce8a.txt §3, eq. 6).

References are written independently of the collector: a loop of ``torch.autograd.grad`` over
single samples (per-sample gradients), and, where samples are coupled (BatchNorm in training
mode, ``scale_grad_by_freq``), a loop that gives each sample its own zero-valued copy of every
parameter so that autograd itself returns that sample's contribution to the batch gradient.
Everything runs in float64.
"""

from __future__ import annotations

import copy
import warnings

import helpers
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_tricks.gradients import GRAM_RULES, GramCollector, register_gram_rule
from lightning_tricks.gradients.gram import collector as collector_module
from lightning_tricks.gradients.gram import factors
from lightning_tricks.gradients.gram.factors import PerSampleFactor
from lightning_tricks.gradients.gram.rules import norm

DTYPE = torch.float64
RTOL = 1e-10


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py: one torch thread


# -- models -----------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """CIFAR ResNet basic block, with the in-place ops torchvision uses."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu(out)


class SmallResNet(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(ResidualBlock(8, 8, 1), ResidualBlock(8, 12, 2))
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, 2 * growth, 1, bias=False),
            nn.BatchNorm2d(2 * growth),
            nn.ReLU(),
            nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x):
        return torch.cat([x, self.body(x)], dim=1)


class SmallDenseNet(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.block = nn.Sequential(DenseLayer(6, 3), DenseLayer(9, 3), DenseLayer(12, 3))
        self.transition = nn.Sequential(
            nn.BatchNorm2d(15), nn.ReLU(), nn.Conv2d(15, 8, 1, bias=False), nn.AvgPool2d(2)
        )
        self.head = nn.Sequential(
            nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes)
        )

    def forward(self, x):
        return self.head(self.transition(self.block(self.stem(x))))


class SequenceNet(nn.Module):
    """Conv1d over sequences, then LayerNorm and a Linear applied at every position."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 3, padding=2, dilation=2, groups=2)
        self.conv2 = nn.Conv1d(8, 6, 4, stride=2, padding="valid")
        self.norm = nn.LayerNorm(6)
        self.proj = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = self.conv2(torch.relu(self.conv1(x))).transpose(1, 2)
        return self.out(torch.tanh(self.proj(self.norm(h))).mean(dim=1))


class TokenNet(nn.Module):
    """Embedding with a padding index, RMSNorm, a per-token Linear."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 6, padding_idx=0)
        self.norm = getattr(nn, "RMSNorm", nn.LayerNorm)(6)  # RMSNorm from torch 2.4
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, tokens):
        return self.out(torch.tanh(self.mix(self.norm(self.embed(tokens)))).mean(dim=1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))


def cnn() -> nn.Module:
    """Stride, padding, dilation, groups, bias, even kernel with padding="same", padding modes."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4),
        nn.ReLU(),
        nn.Conv2d(8, 6, 4, padding="same", padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, padding_mode="circular", bias=False),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 3),
    )


def generator() -> nn.Module:
    """ConvTranspose2d with stride, output padding, groups and dilation, GroupNorm."""
    return nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
        nn.GroupNorm(3, 6),
        nn.ReLU(),
        nn.ConvTranspose2d(6, 4, 2, dilation=2, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    )


def volume_net() -> nn.Module:
    """Conv3d with anisotropic stride/padding/dilation and InstanceNorm3d with affine parameters."""
    return nn.Sequential(
        nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 1), padding=(1, 1, 0), dilation=(1, 1, 2)),
        nn.InstanceNorm3d(4, affine=True),
        nn.ReLU(),
        nn.Conv3d(4, 3, 1),
        nn.Flatten(),
        nn.Linear(3 * 5 * 3 * 1, 3),
    )


def _calibrated(model: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """Run a few training-mode forwards so that BatchNorm running statistics are not trivial."""
    with torch.no_grad():
        for _ in range(3):
            model(inputs + torch.randn_like(inputs))
    return model.eval()


def _images(batch: int, channels: int = 3, size: int = 8) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, dtype=DTYPE)


ARCHITECTURES = {
    "mlp": (mlp, lambda b: torch.randn(b, 10, dtype=DTYPE), 3),
    "cnn": (cnn, _images, 3),
    "resnet_bn_eval": (SmallResNet, _images, 5),
    "densenet_block": (SmallDenseNet, _images, 4),
    "conv1d_sequence": (SequenceNet, lambda b: torch.randn(b, 4, 12, dtype=DTYPE), 3),
    "embedding": (TokenNet, lambda b: torch.randint(0, 11, (b, 5)), 3),
    "conv_transpose": (generator, lambda b: torch.randn(b, 4, 3, 3, dtype=DTYPE), 3),
    "conv3d": (volume_net, lambda b: torch.randn(b, 2, 4, 5, 5, dtype=DTYPE), 3),
}


def build(name: str, batch: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    factory, make_input, classes = ARCHITECTURES[name]
    model = factory().to(DTYPE)
    x = make_input(batch)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model = _calibrated(model, make_input(16))
    return model, x, torch.randint(0, classes, (batch,))


# -- references -------------------------------------------------------------------------------


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def per_sample_jacobian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """J (B, P): row i = ∇ℓ_i over all trainable parameters (the shared reference, helpers.py)."""
    params = [p for _, p in trainable(model)]
    return helpers.per_sample_jacobian(
        params, lambda i: F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum"), len(x)
    )


def contribution_jacobian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    """J (B, P): row i = sample i's contribution to ∇(batch loss), scaled by B for "mean".

    Each parameterised module's output gets ``+ mask_i ⊙ module_with_zero_params(input)``: the value
    is unchanged, and autograd's gradient for the zero copies is the batch-loss gradient restricted
    to sample i's terms — the per-sample weight-gradient calls of seed 004 §4.
    """
    model = copy.deepcopy(model)
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    rows = []
    for i in range(len(x)):
        zeros = {
            m: {n: torch.zeros_like(p, requires_grad=True) for n, p in m.named_parameters(recurse=False)}
            for m in owners
        }
        mask = torch.zeros(len(x), dtype=DTYPE)
        mask[i] = 1.0

        def add_sample_copy(module, args, output, zeros=zeros, mask=mask, inside=set()):  # noqa: B006 (one set per sample, re-entrancy guard)
            if module in inside:  # the functional call below runs this hook again
                return None
            inside.add(module)
            extra = torch.func.functional_call(module, zeros[module], args)
            inside.discard(module)
            return output + mask.view(-1, *([1] * (output.dim() - 1))) * extra

        handles = [m.register_forward_hook(add_sample_copy) for m in owners]
        loss = F.cross_entropy(model(x), y, reduction=reduction)
        params = [z for m in owners for z in zeros[m].values()]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for h in handles:
            h.remove()
        scale = len(x) if reduction == "mean" else 1
        rows.append(scale * helpers.jacobian_row(grads, params))
    return torch.stack(rows)


def column_blocks(model: nn.Module) -> dict[str, slice]:
    """Module name -> its columns in the Jacobians above (parameters in ``named_parameters`` order)."""
    blocks, start = {}, 0
    for name, param in trainable(model):
        module = name.rpartition(".")[0]
        stop = start + param.numel()
        blocks[module] = slice(blocks[module].start if module in blocks else start, stop)
        start = stop
    return blocks


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def collect(model, x, y, reduction="mean", **options) -> GramCollector:
    with GramCollector(model, loss_reduction=reduction, **options) as gram:
        F.cross_entropy(model(x), y, reduction=reduction).backward()
    return gram


# -- exactness on every layer type --------------------------------------------------------------


VARIANTS = [(r, m) for r in ("mean", "sum") for m in ("auto", "ghost", "materialize")]
"""(reduction, method); forced ghost on 8×8 feature maps is slow at B = 64
(B²·T² terms), so it is checked at B = 1 and 7 only."""


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_matches_per_sample_reference(arch: str, batch: int) -> None:
    model, x, y = build(arch, batch)
    jacobian = per_sample_jacobian(model, x, y)
    reference = jacobian @ jacobian.T
    for reduction, method in VARIANTS:
        if batch == 64 and method == "ghost":
            continue
        model.zero_grad(set_to_none=True)
        gram = collect(model, x, y, reduction, method=method).matrix()
        assert gram.dtype == torch.float64 and gram.shape == (batch, batch)
        error = relative_error(gram, reference)
        assert error < RTOL, f"{reduction=} {method=}: relative error {error:.2e}"


@pytest.mark.parametrize(
    "arch", ["cnn", "resnet_bn_eval", "densenet_block", "conv1d_sequence", "conv_transpose", "conv3d"]
)
def test_grouped_convolution_path_matches_reference(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-sample convolution gradients from one B·K-group convolution backward (used on maps of
    more than ``UNFOLD_MAX_POSITIONS`` positions; the 8×8 test inputs take the unfold path)."""
    monkeypatch.setattr(factors, "UNFOLD_MAX_POSITIONS", 0)
    model, x, y = build(arch, 7)
    jacobian = per_sample_jacobian(model, x, y)
    plain = _plain_grads(model, x, y)
    model.zero_grad(set_to_none=True)
    gram = collect(model, x, y, method="materialize").matrix()
    assert relative_error(gram, jacobian @ jacobian.T) < RTOL
    for p, expected in zip(model.parameters(), plain):
        assert torch.equal(p.grad, expected)


def test_batchnorm_statistics_recomputed_when_autograd_does_not_expose_them() -> None:
    torch.manual_seed(0)
    layer = nn.BatchNorm2d(4).to(DTYPE)
    nn.init.normal_(layer.weight)
    x = (3 + 2 * torch.randn(5, 4, 3, 3, dtype=DTYPE)).requires_grad_()
    output = layer(x)
    backprops = torch.randn_like(output)
    captured = norm.batch_norm_capture(layer, (x,), {}, output)
    assert isinstance(captured, norm.NormalizedInput)
    from_autograd = norm.batch_norm_factors(layer, captured, backprops)
    recomputed = norm.batch_norm_factors(layer, x.detach(), backprops)
    for name in ("weight", "bias"):
        torch.testing.assert_close(
            recomputed[name].per_sample(), from_autograd[name].per_sample(), rtol=1e-12, atol=1e-12
        )
    torch.autograd.backward(output, backprops)
    torch.testing.assert_close(
        from_autograd["weight"].per_sample().sum(0), layer.weight.grad, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("arch", ["resnet_bn_eval", "conv1d_sequence", "embedding", "conv_transpose"])
def test_per_layer_blocks_match_reference_and_sum_to_total(arch: str) -> None:
    model, x, y = build(arch, 9)
    jacobian = per_sample_jacobian(model, x, y)
    gram = collect(model, x, y)
    blocks = gram.matrix(per_layer=True)
    assert set(blocks) == set(column_blocks(model))
    for module, columns in column_blocks(model).items():
        assert relative_error(blocks[module], jacobian[:, columns] @ jacobian[:, columns].T) < RTOL, module
    assert relative_error(sum(blocks.values()), gram.matrix()) < 1e-14


@pytest.mark.parametrize(
    "arch", ["cnn", "resnet_bn_eval", "densenet_block", "conv1d_sequence", "conv_transpose", "conv3d"]
)
@pytest.mark.parametrize("method", ["materialize", "ghost"])
@pytest.mark.parametrize("grouped", ["grouped", "grouped, shifted by offset", "one by one"])
def test_blocks_grouped_by_shape_or_one_by_one(
    arch: str, grouped: str, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Normalisation layers and convolutions (materialised or ghost) of one shape get their blocks
    from one batched computation when G is read (small operands), larger ones each at its
    backward: the same blocks either way, and ``.grad`` untouched."""
    if grouped == "one by one":
        monkeypatch.setattr(collector_module, "GROUP_MAX_ENTRIES", 0)
    if grouped == "grouped, shifted by offset":  # per-sample rows split by kernel offset
        monkeypatch.setattr(factors, "SHIFTED_STACK_MAX_ENTRIES", 0)
        monkeypatch.setattr(factors, "GROUPED_MIN_POSITIONS_PER_CHANNEL", 10**9)
    model, x, y = build(arch, 6)
    jacobian = per_sample_jacobian(model, x, y)
    plain = _plain_grads(model, x, y)
    model.zero_grad(set_to_none=True)
    gram = collect(model, x, y, method=method)
    assert bool(gram._grouped) == (grouped != "one by one")
    for p, expected in zip(model.parameters(), plain):
        assert torch.equal(p.grad, expected)
    blocks = gram.matrix(per_layer=True)
    for module, columns in column_blocks(model).items():
        assert relative_error(blocks[module], jacobian[:, columns] @ jacobian[:, columns].T) < RTOL, module


def test_auto_method_follows_cost_model() -> None:
    """Wide layer at one position: ghost (B²·(d_in + d_out) ≪ B·d_in·d_out); 32×32 conv: materialised."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
    ).to(DTYPE)
    x, y = torch.randn(8, 3, 32, 32, dtype=DTYPE), torch.randint(0, 256, (8,))
    methods = collect(model, x, y).methods
    assert methods["0.weight"] == "materialize" and methods["5.weight"] == "ghost"
    assert methods["5.bias"] == "materialize"


# -- gradients are untouched -------------------------------------------------------------------


def _plain_grads(model: nn.Module, x, y, steps: int = 1) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("arch", ["cnn", "resnet_bn_eval", "conv_transpose", "conv3d", "conv1d_sequence"])
def test_model_grads_equal_plain_backward(arch: str) -> None:
    model, x, y = build(arch, 6)
    plain = _plain_grads(model, x, y)
    model.zero_grad(set_to_none=True)
    collect(model, x, y)
    for p, expected in zip(model.parameters(), plain):
        assert torch.equal(p.grad, expected)
        assert p.requires_grad


def test_grads_accumulate_into_existing_grad() -> None:
    model, x, y = build("resnet_bn_eval", 5)
    twice = _plain_grads(model, x, y, steps=2)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    collect(model, x, y)
    for p, expected in zip(model.parameters(), twice):
        assert torch.equal(p.grad, expected)


# -- coupled samples: BatchNorm in training mode --------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_batchnorm_train_mode_gives_sample_contributions(reduction: str) -> None:
    model, x, y = build("resnet_bn_eval", 7)
    model.train()
    reference_model = copy.deepcopy(model)
    contributions = contribution_jacobian(reference_model, x, y, reduction)
    gram = collect(model, x, y, reduction)
    assert relative_error(gram.matrix(), contributions @ contributions.T) < RTOL
    batch_grad = torch.cat([p.grad.reshape(-1) for _, p in trainable(model)])
    scale = 7 if reduction == "mean" else 1
    ones = torch.ones(7, dtype=DTYPE)
    # Σ_i col_i = B·∇L  ⇒  1ᵀG1 = B²‖∇L‖², overall and per layer
    assert abs(ones @ gram.matrix() @ ones / (scale**2 * batch_grad.square().sum()) - 1) < RTOL
    blocks = gram.matrix(per_layer=True)
    for module, columns in column_blocks(model).items():
        expected = scale**2 * batch_grad[columns].square().sum()
        assert abs(ones @ blocks[module] @ ones / expected - 1) < RTOL, module


def test_embedding_scale_grad_by_freq_gives_sample_contributions() -> None:
    model, x, y = build("embedding", 8)
    model.embed = nn.Embedding(11, 6, scale_grad_by_freq=True).to(DTYPE)
    contributions = contribution_jacobian(model, x, y, "mean")
    for method in ("ghost", "materialize"):
        assert (
            relative_error(collect(model, x, y, method=method).matrix(), contributions @ contributions.T)
            < RTOL
        )


def test_contribution_reference_is_per_sample_gradient_without_coupling() -> None:
    """Sanity check of the second reference: without coupling it equals the per-sample one."""
    model, x, y = build("densenet_block", 5)
    contributions, per_sample = contribution_jacobian(model, x, y, "mean"), per_sample_jacobian(model, x, y)
    torch.testing.assert_close(contributions, per_sample, rtol=1e-10, atol=1e-12)


# -- selection, unsupported layers ---------------------------------------------------------------


def test_params_and_module_filters_restrict_columns() -> None:
    model, x, y = build("resnet_bn_eval", 6)
    jacobian = per_sample_jacobian(model, x, y)
    columns = column_blocks(model)
    head = jacobian[:, columns["fc"]]
    assert relative_error(collect(model, x, y, params=model.fc.parameters()).matrix(), head @ head.T) < RTOL
    convs = torch.cat([jacobian[:, c] for m, c in columns.items() if "conv" in m or m == "stem.0"], dim=1)
    only_convs = collect(
        model, x, y, modules=lambda name, m: isinstance(m, nn.Conv2d) and "shortcut" not in name
    )
    assert relative_error(only_convs.matrix(), convs @ convs.T) < RTOL
    weight_only = collect(model, x, y, params=[model.fc.weight])
    w = jacobian[:, columns["fc"]][:, : model.fc.weight.numel()]
    assert relative_error(weight_only.matrix(), w @ w.T) < RTOL


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, dtype=DTYPE))

    def forward(self, x):
        return x * self.gain


def test_unsupported_layers_raise_one_error_or_are_skipped() -> None:
    model = nn.Sequential(nn.Linear(5, 4), Scale(), nn.PReLU(), nn.Linear(4, 3)).to(DTYPE)
    with pytest.raises(ValueError, match=r"no rule for these parameterised modules: 1 \(Scale: gain\)\."):
        GramCollector(model, fallback=False)
    x, y = torch.randn(6, 5, dtype=DTYPE), torch.randint(0, 3, (6,))
    with pytest.warns(UserWarning, match="Scale"):
        gram = collect(model, x, y, unsupported="skip", fallback=False)
    jacobian = per_sample_jacobian(model, x, y)
    keep = torch.cat([jacobian[:, :24], jacobian[:, 25:]], dim=1)
    assert relative_error(gram.matrix(), keep @ keep.T) < RTOL


def test_registering_a_rule_for_a_new_layer() -> None:
    @register_gram_rule(Scale, param_names=("gain",))
    def scale_factors(layer, activations, backprops):
        return {"gain": PerSampleFactor(torch.einsum("b...,b...->b", backprops, activations)[:, None])}

    try:
        model = nn.Sequential(nn.Linear(5, 4), Scale(), nn.Linear(4, 3)).to(DTYPE)
        x, y = torch.randn(6, 5, dtype=DTYPE), torch.randint(0, 3, (6,))
        jacobian = per_sample_jacobian(model, x, y)
        assert relative_error(collect(model, x, y).matrix(), jacobian @ jacobian.T) < RTOL
    finally:
        del GRAM_RULES[Scale]


# -- several forwards, weight sharing ------------------------------------------------------------


class SharedNet(nn.Module):
    """One Linear applied twice in a row and a Conv2d applied to two inputs of different sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        small = F.avg_pool2d(x, 2)
        h = torch.cat([self.conv(x).mean(dim=(2, 3)), self.conv(small).amax(dim=(2, 3))], dim=1)
        return self.out(self.shared(torch.tanh(self.shared(h))))


def test_weight_sharing_is_exact() -> None:
    torch.manual_seed(0)
    model, x, y = SharedNet().to(DTYPE), torch.randn(7, 2, 6, 6, dtype=DTYPE), torch.randint(0, 3, (7,))
    jacobian = per_sample_jacobian(model, x, y)
    plain = _plain_grads(model, x, y)
    for method in ("auto", "ghost", "materialize"):
        model.zero_grad(set_to_none=True)
        gram = collect(model, x, y, method=method).matrix()
        assert relative_error(gram, jacobian @ jacobian.T) < RTOL, method
        for p, expected in zip(model.parameters(), plain):
            assert torch.equal(p.grad, expected)


def test_unused_call_output_contributes_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).to(DTYPE)
    x, y = torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 3, (5,))
    jacobian = per_sample_jacobian(model, x, y)
    with GramCollector(model) as gram:
        model(x * 2)  # output never reaches the loss
        F.cross_entropy(model(x), y).backward()
    assert relative_error(gram.matrix(), jacobian @ jacobian.T) < RTOL
    assert all(p.requires_grad for p in model.parameters())


class TiedLM(nn.Module):
    """Embedding and output Linear share one weight; the Linear also has its own bias."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.embed(idx)))).mean(dim=1)


def test_parameter_shared_between_modules_is_measured_exactly() -> None:
    torch.manual_seed(0)
    model = TiedLM().to(DTYPE)
    x, y = torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (5,))
    jacobian = per_sample_jacobian(model, x, y)
    plain = _plain_grads(model, x, y)
    model.zero_grad(set_to_none=True)
    gram = collect(model, x, y)
    assert relative_error(gram.matrix(), jacobian @ jacobian.T) < RTOL
    assert set(gram.matrix(per_layer=True)) == {"mix", "head", "embed.weight"}
    for p, expected in zip(model.parameters(), plain):
        assert torch.equal(p.grad, expected)


def _linear_of(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def test_parameter_used_outside_its_module_is_refused() -> None:
    """A use the forward's source does not show (through a helper: ``self.a.weight`` in the
    forward itself would make the module a unit measured whole, tests/test_gram_units.py)."""

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 3)

        def forward(self, x):
            return self.b(_linear_of(x, self.a))

    model = Functional()
    with GramCollector(model) as gram:
        F.cross_entropy(model(torch.randn(3, 4)), torch.tensor([0, 1, 2])).backward()
    with pytest.raises(RuntimeError, match=r"\['a.bias', 'a.weight'\] received gradients"):
        gram.matrix()


def test_forward_done_quiets_the_hooks_of_recorded_parameters_until_reset(monkeypatch) -> None:
    """After ``forward_done`` a gradient reaching a parameter its module's captured call recorded
    runs no leaf hook (it would return at once), across collections of a collector left attached;
    a parameter no captured call recorded keeps its hook, and its use is refused as before."""
    calls: list[nn.Parameter] = []
    on_param_grad = GramCollector._on_param_grad

    def counted(self, param, grad):
        calls.append(param)
        on_param_grad(self, param, grad)

    monkeypatch.setattr(GramCollector, "_on_param_grad", counted)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)
    x = torch.randn(3, 4, dtype=DTYPE)
    collector = GramCollector(model)
    collector.attach()
    for _ in range(2):  # attached throughout, as FisherSpectrum measuring every step
        collector.reset()
        loss = model(x).sum()
        collector.forward_done()
        loss.backward()
        collector.matrix()
    assert calls == []
    collector.reset()  # without forward_done: the four hooks run again
    model(x).sum().backward()
    assert len(calls) == 4
    collector.matrix()
    calls.clear()
    collector.reset()
    loss = model[2](torch.tanh(_linear_of(x, model[0]))).sum()  # model[0] used outside its forward
    collector.forward_done()
    loss.backward()
    assert len(calls) == 2 and set(calls) == {model[0].weight, model[0].bias}
    with pytest.raises(RuntimeError, match=r"\['0.bias', '0.weight'\] received gradients"):
        collector.matrix()
    collector.detach()


def test_outside_use_check_needs_tracking() -> None:
    model, x, y = build("mlp", 4)
    with GramCollector(model) as gram:
        gram.track_outside_use = False
        loss = F.cross_entropy(model(x), y)
        with pytest.raises(RuntimeError, match="track_outside_use"):
            gram.check_outside_use(loss)
        loss.backward()
    assert not gram._consumers and gram.matrix().shape == (4, 4)


def test_second_backward_without_reset_is_refused() -> None:
    model, x, y = build("mlp", 4)
    with GramCollector(model) as gram:
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(RuntimeError, match="reset"):
            model(x)
        gram.reset()
        F.cross_entropy(model(x), y).backward()
    assert gram.matrix().shape == (4, 4)


def test_inplace_change_of_a_captured_input_is_refused() -> None:
    class Inplace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            out = self.b(h)
            h.mul_(2)
            return out

    model = Inplace()
    with GramCollector(model):
        loss = F.cross_entropy(model(torch.randn(3, 4)), torch.tensor([0, 1, 2]))
        with pytest.raises(RuntimeError, match="modified in place"):
            loss.backward()


# -- callback-style use ----------------------------------------------------------------------------


def test_attach_enable_reset_detach_cycle() -> None:
    model, x, y = build("cnn", 5)
    jacobian = per_sample_jacobian(model, x, y)
    gram = GramCollector(model).attach()
    gram.enabled = False
    F.cross_entropy(model(x), y).backward()
    assert not gram.captured and gram.batch_size is None
    with pytest.raises(RuntimeError, match="captured no backward"):
        gram.matrix()
    for _ in range(2):  # measured steps, separated by reset()
        gram.reset()
        gram.enabled = True
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        gram.enabled = False
        assert gram.captured and gram.batch_size == 5
        assert relative_error(gram.matrix(), jacobian @ jacobian.T) < RTOL
    with torch.no_grad():
        gram.reset()
        gram.enabled = True
        model(x)
    assert not gram.captured
    gram.detach()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(not p._backward_hooks for p in model.parameters())


def test_batch_dim_mismatch_is_refused() -> None:
    class Flattening(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(12, 3)

        def forward(self, x):
            return self.b(self.a(x.reshape(-1, 4)).reshape(len(x), -1))

    model = Flattening()
    with GramCollector(model):
        with pytest.raises(RuntimeError, match="batch dimension first"):
            model(torch.randn(2, 3, 4))


def test_float32_model_and_loss_checks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    with GramCollector(model) as gram:
        loss = F.cross_entropy(model(x), y)
        GramCollector.check_loss(loss)
        loss.backward()
    reference = per_sample_jacobian(model.to(DTYPE), x.to(DTYPE), y)
    assert relative_error(gram.matrix(), reference @ reference.T) < 1e-5
    with pytest.raises(TypeError, match="floating-point"):
        GramCollector.check_loss(torch.tensor(3))
    with pytest.raises(TypeError, match="scalar"):
        GramCollector.check_loss(torch.ones(2, requires_grad=True))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"loss_reduction": "avg"}, ValueError),
        ({"method": "fast"}, ValueError),
        ({"unsupported": "ignore"}, ValueError),
        ({"modules": "conv"}, TypeError),
        ({"params": [torch.ones(2)]}, TypeError),
        ({"params": []}, ValueError),
    ],
)
def test_constructor_validates_arguments(kwargs, error) -> None:
    with pytest.raises(error):
        GramCollector(mlp(), **kwargs)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        GramCollector(lambda x: x)


def test_collector_leaves_no_warning_on_supported_model() -> None:
    model, x, y = build("resnet_bn_eval", 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collect(model, x, y).matrix()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("entries", [1, 4])
@pytest.mark.parametrize("batch", [1, 63, 64, 65, 128, 129])
def test_block_triangular_gram_equals_full_product(
    batch: int, entries: int, split: bool, threads: int
) -> None:
    """The Gram of each materialised layer is built from its upper block triangle from
    ``SYMMETRIC_MIN_BATCH`` rows on, as a sum over column blocks (one plain product for small
    2-D rows on one thread); it must equal R Rᵀ, for odd B and columns that do not split evenly
    too, its lower-left block the mirror of the upper-right one; rows given split into column
    blocks (n, B, P / n) give the Gram of their concatenation."""
    from lightning_tricks.gradients.gram.collector import SYMMETRIC_MIN_BATCH, SYMMETRIC_MIN_ENTRIES, _gram

    assert SYMMETRIC_MIN_BATCH <= 64
    rows = torch.randn(batch, SYMMETRIC_MIN_ENTRIES * entries + 3 * (entries == 1), dtype=DTYPE)
    blocks = rows.view(batch, 4, -1).transpose(0, 1) if split and entries == 4 else rows
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gram = _gram(blocks)
    finally:
        torch.set_num_threads(before)
    expected = rows @ rows.T
    torch.testing.assert_close(gram, expected, rtol=1e-13, atol=1e-13 * expected.abs().max().item())
    half = batch // 2
    if batch >= SYMMETRIC_MIN_BATCH:
        assert torch.equal(gram[half:, :half], gram[:half, half:].T)


@pytest.mark.parametrize("first", ["linear", "layer_norm"])
def test_trainable_set_is_read_again_when_a_flag_changes_between_collections(first: str) -> None:
    """The collector derives a layer's measured parameters again only when a requires_grad flag
    changed since its last collection: freezing and unfreezing between collections must still
    give the brute-force G of the parameters trainable at each one, whichever layer runs first."""
    torch.manual_seed(0)
    layers = [nn.Linear(4, 3)] if first == "linear" else [nn.LayerNorm(4), nn.Linear(4, 3)]
    model = nn.Sequential(*layers, nn.Tanh(), nn.Linear(3, 2)).double()  # model[0].weight toggled
    x = torch.randn(5, 4, dtype=torch.float64)
    collector = GramCollector(model, loss_reduction="sum")

    def collected() -> torch.Tensor:
        collector.reset()
        collector.attach()
        model(x).square().sum().backward()
        collector.detach()
        return collector.matrix()

    def reference() -> torch.Tensor:
        return helpers.reference_gram(model, lambda i: model(x[i : i + 1]).square().sum(), len(x))

    for flag in (True, False, True, False):
        model[0].weight.requires_grad_(flag)
        torch.testing.assert_close(collected(), reference())


def test_outside_use_is_caught_when_a_weight_is_unfrozen_after_attach() -> None:
    """A weight frozen at attach (so not hooked then) and unfrozen before the forward, with the
    same flags as the previous collection, still gets the hook that spots a use outside its module."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    x = torch.randn(3, 4)
    collector = GramCollector(model)

    collector.reset()
    collector.attach()
    model(x).sum().backward()
    collector.detach()
    collector.matrix()
    collector.reset()
    model[2].weight.requires_grad_(False)
    collector.attach()
    model[2].weight.requires_grad_(True)  # unfrozen after attach: the flags equal the first step's
    F.linear(model[:2](x), model[2].weight).sum().backward()  # its module not called: only the hook sees it
    collector.detach()
    with pytest.raises(RuntimeError, match="outside its module"):
        collector.matrix()
