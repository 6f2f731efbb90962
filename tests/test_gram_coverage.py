"""GramCollector beyond the first wave of layers, against brute-force references (seed 004 §3, eq. 6).

Each reference runs the model on one sample at a time (sliced along that model's batch dimension)
and takes ``torch.autograd.grad`` of that sample's loss: row i of J. Everything runs in float64;
the collector sees the whole batch once with loss Σ_i ℓ_i.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import reference_gram
from torch import nn

from lightning_tricks.gradients import (
    FALLBACK_RULE,
    GRAM_RULES,
    GramCollector,
    GramRule,
    gram_rule_for,
    register_gram_rule,
)
from lightning_tricks.gradients.gram.factors import PerSampleFactor
from lightning_tricks.gradients.gram.rules.recurrent import unrolled_rnn

DTYPE = torch.float64
RTOL = 1e-10
BATCHES = [1, 3, 8]


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py: one torch thread


# -- references -------------------------------------------------------------------------------


def collect(model: nn.Module, batch_loss, **options) -> GramCollector:
    with GramCollector(model, loss_reduction="sum", **options) as gram:
        batch_loss().backward()
    return gram


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def assert_exact(model, sample_loss, batch_loss, batch, **options) -> GramCollector:
    expected = reference_gram(model, sample_loss, batch)
    gram = collect(model, batch_loss, **options)
    error = relative_error(gram.matrix(), expected)
    assert error < RTOL, f"{options}: relative error {error:.2e}"
    return gram


def squared(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample losses Σ (output − target)² over all but the batch dim (dim 0)."""
    return (output - target).square().flatten(1).sum(1)


# -- closed-form rules: PReLU, Bilinear, EmbeddingBag ---------------------------------------------


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("method", ["auto", "ghost", "materialize"])
def test_prelu_and_bilinear(batch: int, method: str) -> None:
    torch.manual_seed(batch)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 3)
            self.act = nn.PReLU(4, init=0.1)
            self.shared_act = nn.PReLU(init=0.3)
            self.bilinear = nn.Bilinear(4, 3, 5)
            self.positions = nn.Bilinear(4, 4, 2, bias=False)

        def forward(self, x, z):
            h = self.act(self.conv(x))  # (B, 4, 4)
            pooled = self.shared_act(h.mean(-1))
            per_position = self.positions(h.transpose(1, 2), torch.tanh(h).transpose(1, 2))  # (B, 4, 2)
            return torch.cat([self.bilinear(pooled, z), per_position.flatten(1)], dim=1)

    model = Net().to(DTYPE)
    x, z = torch.randn(batch, 3, 6, dtype=DTYPE), torch.randn(batch, 3, dtype=DTYPE)
    target = torch.randn(batch, 13, dtype=DTYPE)
    gram = assert_exact(
        model,
        lambda i: squared(model(x[i : i + 1], z[i : i + 1]), target[i : i + 1]).sum(),
        lambda: squared(model(x, z), target).sum(),
        batch,
        method=method,
    )
    assert "fallback" not in gram.methods.values() and "vjp" not in gram.methods.values()
    if method != "auto":
        assert gram.methods["bilinear.weight"] == method


EMBEDDING_BAG_CASES = [
    dict(mode="sum"),
    dict(mode="mean"),
    dict(mode="max"),
    dict(mode="sum", padding_idx=0),
    dict(mode="mean", padding_idx=0),
    dict(mode="max", padding_idx=0),
    dict(mode="sum", weighted=True),
    dict(mode="sum", weighted=True, padding_idx=0),
]


def _bags(batch: int, weighted: bool, offsets: bool, vocab: int = 7):
    """Either (B, 4) indices, or 1-D indices with offsets (bag sizes 0..4, one bag empty)."""
    if not offsets:
        indices = torch.randint(0, vocab, (batch, 4))
        return [(indices[i : i + 1], None) for i in range(batch)], (indices, None)
    sizes = [(i * 3) % 5 for i in range(batch)]
    sizes[0] = max(sizes[0], 1)
    pieces = [torch.randint(0, vocab, (s,)) for s in sizes]
    starts = torch.tensor([0] + sizes[:-1]).cumsum(0)
    return [(p, torch.tensor([0])) for p in pieces], (torch.cat(pieces), starts)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("offsets", [False, True])
@pytest.mark.parametrize(
    "case", EMBEDDING_BAG_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
)
def test_embedding_bag(batch: int, offsets: bool, case: dict) -> None:
    torch.manual_seed(batch)
    options = dict(case)
    weighted = options.pop("weighted", False)
    bag = nn.EmbeddingBag(7, 5, **options).to(DTYPE)
    head = nn.Linear(5, 3).to(DTYPE)
    samples, (indices, starts) = _bags(batch, weighted, offsets)
    weights = [torch.rand(s[0].shape, dtype=DTYPE) + 0.5 if weighted else None for s in samples]
    all_weights = None if not weighted else torch.cat([w.reshape(-1) for w in weights]).reshape(indices.shape)
    target = torch.randn(batch, 3, dtype=DTYPE)
    model = nn.ModuleDict({"bag": bag, "head": head})

    def run(idx, off, w):
        return head(torch.tanh(bag(idx, off, per_sample_weights=w)))

    for method in ("ghost", "materialize"):
        assert_exact(
            model,
            lambda i: squared(run(samples[i][0], samples[i][1], weights[i]), target[i : i + 1]).sum(),
            lambda: squared(run(indices, starts, all_weights), target).sum(),
            batch,
            method=method,
        )


def test_embedding_bag_include_last_offset_and_scale_grad_by_freq() -> None:
    """With ``scale_grad_by_freq`` the samples are coupled: the columns add up to the batch gradient."""
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(6, 4, mode="sum", include_last_offset=True).to(DTYPE)
    indices, offsets = torch.tensor([1, 2, 2, 5, 1, 0, 3]), torch.tensor([0, 3, 3, 5, 7])
    target = torch.randn(4, 4, dtype=DTYPE)

    def sample(i):
        return squared(
            bag(indices[offsets[i] : offsets[i + 1]], torch.tensor([0, offsets[i + 1] - offsets[i]]))[:1],
            target[i : i + 1],
        ).sum()  # noqa: E731

    assert_exact(bag, sample, lambda: squared(bag(indices, offsets), target).sum(), 4)
    bag.scale_grad_by_freq = True
    gram = collect(bag, lambda: squared(bag(indices, offsets), target).sum())
    bag.zero_grad()
    squared(bag(indices, offsets), target).sum().backward()
    ones = torch.ones(4, dtype=DTYPE)
    assert abs(ones @ gram.matrix() @ ones / bag.weight.grad.square().sum() - 1) < RTOL


# -- subclasses, fallback --------------------------------------------------------------------------


class TaggedLinear(nn.Linear):
    """A subclass that inherits Linear's forward: Linear's rule applies (nearest registered base)."""

    tag = "kept"


class DoubledLinear(nn.Linear):
    """A subclass with its own forward: Linear's rule would be wrong, so the fallback serves it."""

    def forward(self, x):
        return 2 * super().forward(x)


class Gate(nn.Module):
    """Own parameters, a child Linear, a shared mask argument and a tuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.gate = nn.Parameter(torch.randn(4))
        self.shift = nn.Parameter(torch.randn(2, 4))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x, mask):
        self.calls += 1
        h = self.inner(x) * torch.sigmoid(self.gate) * mask + self.shift.sum(0)
        return h, torch.tanh(h)


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = TaggedLinear(3, 4)
        self.gated = Gate()
        self.doubled = DoubledLinear(4, 2)

    def forward(self, x):
        h, t = self.gated(torch.tanh(self.first(x)), torch.tensor([1.0, 0.5, 1.0, 2.0], dtype=x.dtype))
        return self.doubled(h * t)


@pytest.mark.parametrize("batch", BATCHES)
def test_subclass_lookup_and_fallback(batch: int) -> None:
    torch.manual_seed(batch)
    model = GatedNet().to(DTYPE)
    x, target = torch.randn(batch, 3, dtype=DTYPE), torch.randn(batch, 2, dtype=DTYPE)
    gram = assert_exact(
        model,
        lambda i: squared(model(x[i : i + 1]), target[i : i + 1]).sum(),
        lambda: squared(model(x), target).sum(),
        batch,
    )
    methods = gram.methods
    assert methods["first.weight"] in ("ghost", "materialize")
    assert methods["gated.inner.weight"] in ("ghost", "materialize")
    assert methods["gated.gate"] == methods["gated.shift"] == "fallback"
    assert methods["doubled.weight"] == methods["doubled.bias"] == "fallback"
    assert gram_rule_for(model.first) is GRAM_RULES[nn.Linear] and gram_rule_for(model.doubled) is None


@pytest.mark.parametrize("layer", [nn.Linear(5, 3), nn.LayerNorm(5), nn.Conv1d(5, 3, 1)], ids=type)
def test_fallback_equals_closed_form_rules(layer: nn.Module) -> None:
    """rules={type: None} sends a supported layer to the fallback: same matrix as its rule."""
    torch.manual_seed(0)
    layer = layer.to(DTYPE)
    x = torch.randn(6, 5, 4, dtype=DTYPE).transpose(1, 2).contiguous().transpose(1, 2)
    x = x if isinstance(layer, nn.Conv1d) else x.transpose(1, 2)
    loss = lambda: layer(x).square().sum() + layer(x).sum()  # noqa: E731
    closed, fallback = collect(layer, loss), collect(layer, loss, rules={type(layer): None})
    assert set(fallback.methods.values()) == {"fallback"}
    assert relative_error(fallback.matrix(), closed.matrix()) < 1e-12


def test_fallback_changes_nothing_the_user_trains() -> None:
    """Same .grad (bit for bit), buffers and RNG stream as a plain backward."""
    torch.manual_seed(0)
    model = GatedNet().to(DTYPE)
    twin = copy.deepcopy(model)
    x, target = torch.randn(5, 3, dtype=DTYPE), torch.randn(5, 2, dtype=DTYPE)
    torch.manual_seed(1)
    squared(twin(x), target).sum().backward()
    after_plain = torch.rand(3)
    torch.manual_seed(1)
    gram = collect(model, lambda: squared(model(x), target).sum())
    assert torch.equal(torch.rand(3), after_plain)
    assert gram.methods["gated.gate"] == "fallback"
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), name
        assert p.requires_grad
    for b, c in zip(model.buffers(), twin.buffers()):
        assert torch.equal(b, c)
    assert model.gated.calls.item() == 1


def test_fallback_refuses_coupled_modules() -> None:
    """(A module drawing random numbers is measured from the step's graph: tests/test_gram_units.py.)"""

    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3, dtype=DTYPE))

        def forward(self, x):
            return F.dropout(x * self.scale, 0.5, self.training)

    class Centred(Noisy):
        def forward(self, x):
            return (x - x.mean(0)) * self.scale

    x = torch.randn(4, 3, dtype=DTYPE)
    centred = Centred()
    with pytest.raises(RuntimeError, match="coupled"):
        collect(centred, lambda: centred(x).square().sum()).matrix()
    noisy = Noisy().eval()
    assert collect(noisy, lambda: noisy(x).square().sum()).methods == {"scale": "fallback"}


# -- MultiheadAttention and Transformer layers -------------------------------------------------------


def _seq(batch_first: bool, batch: int, length: int, dim: int) -> torch.Tensor:
    shape = (batch, length, dim) if batch_first else (length, batch, dim)
    return torch.randn(*shape, dtype=DTYPE)


def _sample(t: torch.Tensor, i: int, dim: int) -> torch.Tensor:
    return t.narrow(dim, i, 1)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("variant", ["self", "cross_kdim", "masks", "bias_kv"])
def test_multihead_attention(batch: int, batch_first: bool, variant: str) -> None:
    torch.manual_seed(batch)
    options = {"cross_kdim": {"kdim": 3, "vdim": 5}, "bias_kv": {"add_bias_kv": True, "add_zero_attn": True}}
    attention = nn.MultiheadAttention(6, 2, batch_first=batch_first, **options.get(variant, {})).to(DTYPE)
    b = 0 if batch_first else 1
    query = _seq(batch_first, batch, 4, 6)
    key = _seq(batch_first, batch, 5, 3) if variant == "cross_kdim" else query
    value = _seq(batch_first, batch, 5, 5) if variant == "cross_kdim" else query
    padding = torch.zeros(batch, 4, dtype=torch.bool)
    padding[:, -1] = torch.arange(batch) % 2 == 1
    causal = torch.triu(torch.full((4, 4), float("-inf"), dtype=DTYPE), 1)
    target = _seq(batch_first, batch, 4, 6)

    def loss(index=None):
        def pick(t, d=b):
            return t if index is None else _sample(t, index, d)

        masks = {"key_padding_mask": pick(padding, 0), "attn_mask": causal} if variant == "masks" else {}
        out, weights = attention(pick(query), pick(key), pick(value), **masks)
        return (out - pick(target)).square().sum() + (weights * weights.shape[-1]).square().sum()

    gram = assert_exact(attention, loss, loss, batch)
    assert gram.layer_names == [""] and set(gram.methods.values()) == {"vjp"}
    if variant == "self":
        assert set(gram.methods) == {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_per_head_mask_and_unaveraged_weights(batch: int, batch_first: bool) -> None:
    """A 3-D (B·heads, L, S) mask is per sample; per-head weights are upstream of the output."""
    torch.manual_seed(batch)
    attention = nn.MultiheadAttention(6, 2, batch_first=batch_first).to(DTYPE)
    b = 0 if batch_first else 1
    query, target = _seq(batch_first, batch, 4, 6), _seq(batch_first, batch, 4, 6)
    per_head = torch.randn(batch * 2, 4, 4, dtype=DTYPE)

    def loss(index=None):
        mask = per_head if index is None else per_head[2 * index : 2 * index + 2]
        q = query if index is None else _sample(query, index, b)
        out, weights = attention(q, q, q, attn_mask=mask, average_attn_weights=False)
        return (out - (target if index is None else _sample(target, index, b))).square().sum() + weights[
            :, 0
        ].sum()

    assert_exact(attention, loss, loss, batch)


class Encoder(nn.Module):
    """Batch-first input and output around a Transformer layer of either layout."""

    def __init__(self, batch_first: bool, norm_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(3, 8)
        self.layer = nn.TransformerEncoderLayer(
            8, 2, 16, dropout=0.0, batch_first=batch_first, norm_first=norm_first
        )
        self.head = nn.Linear(8, 2)

    def forward(self, x, padding=None):
        h = self.embed(x)
        h = self.layer(h if self.batch_first else h.transpose(0, 1), src_key_padding_mask=padding)
        return self.head(h if self.batch_first else h.transpose(0, 1))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_end_to_end(batch: int, batch_first: bool, norm_first: bool) -> None:
    """Batch first: MultiheadAttention's rule plus the Linear/LayerNorm rules of the children.
    Sequence first: the children see (T, B, E), so the layer is recomputed as a whole."""
    torch.manual_seed(batch)
    model = Encoder(batch_first, norm_first).to(DTYPE).train()
    x, target = torch.randn(batch, 5, 3, dtype=DTYPE), torch.randn(batch, 5, 2, dtype=DTYPE)
    padding = torch.zeros(batch, 5, dtype=torch.bool)
    padding[:, -1] = torch.arange(batch) % 2 == 0
    gram = assert_exact(
        model,
        lambda i: (model(x[i : i + 1], padding[i : i + 1]) - target[i : i + 1]).square().sum(),
        lambda: (model(x, padding) - target).square().sum(),
        batch,
    )
    assert "layer.self_attn.out_proj" not in gram.layer_names
    if batch_first:
        assert "layer.self_attn" in gram.layer_names
        assert gram.methods["layer.linear1.weight"] in ("ghost", "materialize")
        assert gram.methods["layer.self_attn.out_proj.weight"] == "vjp"
    else:
        assert "layer" in gram.layer_names and gram.methods["layer.linear1.weight"] == "vjp"


# -- RNN, LSTM, GRU ------------------------------------------------------------------------------------

RNNS = [
    (nn.RNN, {}),
    (nn.RNN, {"nonlinearity": "relu", "bias": False}),
    (nn.LSTM, {}),
    (nn.LSTM, {"proj_size": 2}),
    (nn.GRU, {}),
]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize(("kind", "options"), RNNS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_recurrent_layers(batch: int, batch_first: bool, kind, options: dict) -> None:
    torch.manual_seed(batch)
    rnn = kind(3, 4, num_layers=2, bidirectional=True, batch_first=batch_first, **options).to(DTYPE)
    head = nn.Linear(2 * (getattr(rnn, "proj_size", 0) or 4), 2).to(DTYPE)
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    b = 0 if batch_first else 1
    x = _seq(batch_first, batch, 5, 3)
    h0 = torch.randn(4, batch, getattr(rnn, "proj_size", 0) or 4, dtype=DTYPE)
    initial = (h0, torch.randn(4, batch, 4, dtype=DTYPE)) if kind is nn.LSTM else h0

    def loss(index=None, with_state=True):
        def pick(t, d=b):
            return t if index is None else _sample(t, index, d)

        state = None
        if with_state:
            state = tuple(pick(s, 1) for s in initial) if kind is nn.LSTM else pick(initial, 1)
        output, final = rnn(pick(x), state)
        h_n = final[0] if kind is nn.LSTM else final
        return head(output if batch_first else output.transpose(0, 1)).square().sum() + h_n.sum() * 0.5

    gram = assert_exact(model, loss, loss, batch)
    assert gram.methods["rnn.weight_ih_l1_reverse"] == "vjp"
    only_output = lambda index=None: loss(index, with_state=False)  # noqa: E731
    assert_exact(model, only_output, only_output, batch)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize(("kind", "options"), RNNS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_unrolled_rnn_equals_module(batch_first: bool, kind, options: dict) -> None:
    torch.manual_seed(0)
    rnn = kind(3, 4, num_layers=3, bidirectional=True, batch_first=batch_first, **options).to(DTYPE)
    x = _seq(batch_first, 6, 7, 3)
    expected = rnn(x)
    weights = dict(rnn.named_parameters())
    actual = unrolled_rnn(rnn, weights, x, None)
    for a, e in zip(actual, [expected[0], *(expected[1] if kind is nn.LSTM else (expected[1],))]):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_recurrent_refusals() -> None:
    lstm = nn.LSTM(3, 4, num_layers=2, dropout=0.2)
    with GramCollector(lstm):
        with pytest.raises(ValueError, match="dropout=0.2 between layers"):
            lstm(torch.randn(5, 2, 3))
        with pytest.raises(ValueError, match="unbatched"):
            lstm.eval()(torch.randn(5, 3))
        packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
        with pytest.raises(ValueError, match="PackedSequence"):
            lstm(packed)


# -- registry ------------------------------------------------------------------------------------------


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.full((1,), 1.5, dtype=DTYPE))

    def forward(self, x):
        return x * self.gain


def _scale_factors(layer, activations, backprops):
    return {"gain": PerSampleFactor(torch.einsum("b...,b...->b", backprops, activations)[:, None])}


def test_registry_clash_overwrite_and_per_collector_override() -> None:
    rule = GramRule(_scale_factors, ("gain",))
    model = nn.Sequential(nn.Linear(3, 3), Scale()).to(DTYPE)
    x = torch.randn(5, 3, dtype=DTYPE)
    loss = lambda: model(x).square().sum()  # noqa: E731
    assert collect(model, loss).methods["1.gain"] == "fallback"
    try:
        assert register_gram_rule(Scale, param_names=("gain",))(_scale_factors) is _scale_factors
        assert GRAM_RULES[Scale] == rule
        with pytest.raises(ValueError, match="already has a Gram rule"):
            register_gram_rule(Scale, param_names=("gain",))(_scale_factors)
        assert collect(model, loss).methods["1.gain"] == "materialize"

        @register_gram_rule(Scale, param_names=("gain",), overwrite=True)
        def doubled(*args):
            return {"gain": PerSampleFactor(2 * _scale_factors(*args)["gain"].grads)}

        blocks = collect(model, loss).matrix(per_layer=True)
        expected = collect(model, loss, rules={Scale: rule}).matrix(per_layer=True)
        torch.testing.assert_close(blocks["1"], 4 * expected["1"], rtol=1e-12, atol=0)
        fallback = collect(model, loss, rules={Scale: None}).matrix(per_layer=True)
        torch.testing.assert_close(fallback["1"], expected["1"], rtol=1e-12, atol=0)
        with_override = collect(model, loss, rules={nn.Linear: FALLBACK_RULE})
        assert with_override.methods["0.weight"] == "fallback"
    finally:
        GRAM_RULES.pop(Scale, None)
    with pytest.raises(TypeError, match="Module subclasses"):
        register_gram_rule("Scale")
    with pytest.raises(TypeError, match="Module subclasses"):
        register_gram_rule(Scale, rule)  # the removed second form: a rule record after the type
    with pytest.raises(TypeError, match="rules must map"):
        GramCollector(model, rules={Scale: _scale_factors})
    with pytest.raises(ValueError, match="no rule for these"):
        GramCollector(model, fallback=False)
