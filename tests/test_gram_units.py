"""GramCollector's units (modules measured whole), ``exclude=``, training refusals and compiled modules.

Exactness is checked against brute-force per-sample loops (``helpers.per_sample_jacobian``: one
``torch.autograd.grad`` per sample) in float64, the collector seeing the whole batch once.
"""

from __future__ import annotations

import gc
import math
import warnings
import weakref

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from common import quiet_fit_trainer
from helpers import assert_identical, per_sample_jacobian, reference_gram
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

from lightning_tricks.callbacks.fisher_spectrum import FisherSpectrum
from lightning_tricks.gradients import GramCollector
from lightning_tricks.gradients.gram import fallback
from lightning_tricks.gradients.gram.units import is_unit

DTYPE = torch.float64
RTOL = 1e-10

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py: one torch thread


def collect(model: nn.Module, batch_loss, **options) -> GramCollector:
    """One measured step as FisherSpectrum runs it: forward, outside-use check, backward."""
    with GramCollector(model, loss_reduction="sum", **options) as gram:
        loss = batch_loss()
        gram.check_outside_use(loss)
        loss.backward()
    return gram


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    error = ((actual - expected).norm() / expected.norm()).item()
    assert error < RTOL, f"relative error {error:.2e}"


# -- units: Swin v1 and v2 ----------------------------------------------------------------------


def tiny_swin(v2: bool) -> SwinTransformer:
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    model = SwinTransformer(
        patch_size=[2, 2],
        embed_dim=8,
        depths=[1, 1],
        num_heads=[1, 1],
        window_size=[2, 2],
        stochastic_depth_prob=0.0,
        num_classes=3,
        **extra,
    )
    return model.to(DTYPE).train()


@pytest.mark.parametrize("batch", [2, 3])
@pytest.mark.parametrize("v2", [False, True], ids=["swin_v1", "swin_v2"])
def test_swin_attention_is_measured_whole_and_exactly(v2: bool, batch: int) -> None:
    """v1's ShiftedWindowAttention calls F.linear(x, self.qkv.weight); v2's also runs cpb_mlp on a
    position table without a sample dimension: each attention is one unit, exact."""
    torch.manual_seed(batch)
    model = tiny_swin(v2)
    x = torch.randn(batch, 3, 8, 8, dtype=DTYPE)
    y = torch.randint(0, 3, (batch,))
    expected = reference_gram(model, lambda i: F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), batch)
    gram = collect(model, lambda: F.cross_entropy(model(x), y, reduction="sum"))
    assert_close(gram.matrix(), expected)
    units = ["features.1.0.attn", "features.3.0.attn"]
    assert all(name in gram.layer_names for name in units)
    assert not any(name.startswith(f"{unit}.") for name in gram.layer_names for unit in units)
    assert gram.methods["features.1.0.attn.qkv.weight"] == "fallback"
    assert gram.methods["features.0.0.weight"] != "fallback"
    if v2:
        assert "features.1.0.attn.cpb_mlp.0.weight" in gram.methods


class FunctionalChild(nn.Module):
    """Uses a child's weight functionally, and reads another child's weight for its shape only."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.other = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(F.linear(x, self.fc.weight, self.fc.bias))
        assert h.shape[-1] == self.other.weight.shape[1]
        return self.other(h)


class TableChild(nn.Module):
    """Runs a parameterised child on its own buffer (no sample dimension), adds it to each sample."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.linspace(-1, 1, 6).reshape(3, 2))
        self.mlp = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        self.proj = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.bias().reshape(-1)

    def bias(self) -> torch.Tensor:
        return self.mlp(self.table)


class ShapeOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc.bias is not None:
            x = x.reshape(-1, self.fc.weight.shape[1])
        return self.fc(x)


def test_units_are_found_from_the_source() -> None:
    assert is_unit(FunctionalChild())
    assert is_unit(TableChild())  # through the method it calls on self
    assert not is_unit(ShapeOnly())  # metadata and `is None` tests use no value
    assert not is_unit(nn.Sequential(nn.Linear(2, 2)))  # stock modules: their rules know them
    assert not is_unit(nn.TransformerEncoderLayer(4, 2, 8, batch_first=True))


@pytest.mark.parametrize("batch", [1, 3])
def test_user_units_are_exact(batch: int) -> None:
    torch.manual_seed(batch)
    model = nn.ModuleDict({"a": FunctionalChild(), "b": TableChild(), "c": ShapeOnly()}).to(DTYPE)
    x = torch.randn(batch, 4, dtype=DTYPE)

    def sample_losses(inputs: torch.Tensor) -> torch.Tensor:
        h = model["a"](inputs)
        return (model["c"](model["b"](torch.cat([h, h[:, :1]], dim=1)))).square().sum(1)

    expected = reference_gram(model, lambda i: sample_losses(x[i : i + 1]).sum(), batch)
    gram = collect(model, lambda: sample_losses(x).sum())
    assert_close(gram.matrix(), expected)
    assert gram.layer_names == ["a", "b", "c.fc"]


# -- exclude=, training refusals: a TransformerEncoder text classifier ---------------------------


class TextClassifier(nn.Module):
    """Embedding, a stock TransformerEncoder (dropout 0.1), mean pooling, a linear head."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embedding = nn.Embedding(20, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embedding(tokens)
        if not self.batch_first:
            return self.head(self.encoder(h.transpose(0, 1)).mean(0))
        return self.head(self.encoder(h).mean(1))


def text_batch(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 20, (batch, 5)), torch.randint(0, 3, (batch,))


def masked_reference(model: nn.Module, params: list[nn.Parameter], tokens, labels, seed: int) -> torch.Tensor:
    """J Jᵀ over ``params``: ∇ℓ_i from a forward of the whole batch under ``seed`` (the dropout masks
    of the measured run), one forward and ``torch.autograd.grad`` per sample."""

    def sample_loss(i: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return F.cross_entropy(model(tokens), labels, reduction="none")[i]

    jacobian = per_sample_jacobian(params, sample_loss, len(tokens))
    return jacobian @ jacobian.T


def plain_step(model: nn.Module, tokens, labels, seed: int) -> tuple[dict, torch.Tensor]:
    """The parameters' gradients of one plain step under ``seed``, and the RNG state after it."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    F.cross_entropy(model(tokens), labels, reduction="sum").backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, torch.get_rng_state()


@pytest.mark.parametrize("batch", [2, 5])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
def test_transformer_with_dropout_in_training_is_measured_exactly(batch: int, batch_first: bool) -> None:
    """A stock TransformerEncoder (dropout 0.1 in attention, feed-forward and residuals) in
    training mode: every parameter measured, with the dropout masks the step drew (the reference
    replays them: each per-sample loss comes from a forward of the batch under the same seed).
    The step itself is unchanged (gradients bit for bit, RNG state), and torch warns nothing."""
    torch.manual_seed(batch)
    model = TextClassifier(batch_first).to(DTYPE).train()
    tokens, labels = text_batch(batch)
    expected = masked_reference(model, list(model.parameters()), tokens, labels, seed=batch + 100)
    plain_grads, plain_rng = plain_step(model, tokens, labels, seed=batch + 100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(batch + 100)
        gram = collect(model, lambda: F.cross_entropy(model(tokens), labels, reduction="sum"))
    assert [str(w.message) for w in caught] == []
    assert_close(gram.matrix(), expected)
    assert_identical({name: p.grad for name, p in model.named_parameters()}, plain_grads)
    assert torch.equal(torch.get_rng_state(), plain_rng)
    attention = "encoder.layers.0.self_attn" if batch_first else "encoder.layers.0"
    assert attention in gram.layer_names
    assert (
        gram.methods[f"{attention}.in_proj_weight" if batch_first else f"{attention}.linear1.weight"] == "vjp"
    )


@pytest.mark.parametrize("need_weights", [False, True])
def test_attention_with_dropout_and_both_outputs_is_exact(need_weights: bool) -> None:
    """MultiheadAttention called directly, its (dropped-out) output and its attention weights
    both in the loss; the user's own hook on a parameter sees the step's gradient only."""
    torch.manual_seed(3)
    attention = nn.MultiheadAttention(6, 2, dropout=0.3, batch_first=True).to(DTYPE).train()
    x = torch.randn(4, 3, 6, dtype=DTYPE)
    seen = []
    attention.in_proj_weight.register_hook(lambda g: seen.append(g.shape))

    def sample_losses() -> torch.Tensor:
        out, weights = attention(x, x, x, need_weights=need_weights)
        losses = out.square().sum((1, 2))
        return losses + weights.pow(3).sum((1, 2)) if need_weights else losses

    def sample_loss(i: int) -> torch.Tensor:
        torch.manual_seed(11)
        return sample_losses()[i]

    jacobian = per_sample_jacobian(list(attention.parameters()), sample_loss, 4)
    seen.clear()
    torch.manual_seed(11)
    gram = collect(attention, lambda: sample_losses().sum())
    assert_close(gram.matrix(), jacobian @ jacobian.T)
    assert seen == [attention.in_proj_weight.shape]


class Tagger(nn.Module):
    """An embedding and a two-layer LSTM with dropout between its layers, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 6)
        self.lstm = nn.LSTM(6, 5, num_layers=2, dropout=0.2, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embedding(tokens))[0].mean(1))


def test_module_refused_in_training_names_exclude() -> None:
    torch.manual_seed(0)
    model = Tagger().to(DTYPE).train()
    tokens, labels = text_batch(3)
    with pytest.raises(ValueError) as error:
        collect(model, lambda: F.cross_entropy(model(tokens), labels, reduction="sum"))
    assert str(error.value) == (
        "LSTM 'lstm' has dropout=0.2 between layers in training mode; GramCollector cannot reproduce its "
        "dropout masks per sample. Set that dropout to 0, or leave the module out of the measurement: "
        "exclude=['lstm'] (GramCollector, FisherSpectrum), or unsupported='skip' to leave out every module "
        "refused so"
    )


@pytest.mark.parametrize("batch", [2, 5])
@pytest.mark.parametrize("how", ["exclude_names", "exclude_modules", "skip"])
def test_refused_module_left_out_the_rest_measured_exactly(batch: int, how: str) -> None:
    """``exclude=`` (names or modules) or ``unsupported="skip"``: the LSTM left out, the rest
    measured exactly with the step's dropout masks; only the skip warning is shown."""
    torch.manual_seed(batch)
    model = Tagger().to(DTYPE).train()
    tokens, labels = text_batch(batch)
    options = {
        "exclude_names": {"exclude": ["lstm"]},
        "exclude_modules": {"exclude": [model.lstm]},
        "skip": {"unsupported": "skip"},
    }[how]
    measured = [*model.embedding.parameters(), *model.head.parameters()]
    expected = masked_reference(model, measured, tokens, labels, seed=batch + 100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(batch + 100)
        gram = collect(model, lambda: F.cross_entropy(model(tokens), labels, reduction="sum"), **options)
    assert_close(gram.matrix(), expected)
    assert gram.layer_names == ["embedding", "head"]
    messages = [str(w.message) for w in caught]
    skipped = "GramCollector leaves out of G the parameters of: lstm (LSTM: dropout=0.2 between layers in training mode)"
    assert messages == ([skipped] if how == "skip" else [])


def test_exclude_leaves_out_whole_subtrees() -> None:
    torch.manual_seed(1)
    model = TextClassifier(batch_first=False).to(DTYPE).train()
    tokens, labels = text_batch(3)
    measured = [*model.embedding.parameters(), *model.head.parameters()]
    expected = masked_reference(model, measured, tokens, labels, seed=7)
    torch.manual_seed(7)
    gram = collect(
        model, lambda: F.cross_entropy(model(tokens), labels, reduction="sum"), exclude=["encoder"]
    )
    assert_close(gram.matrix(), expected)
    assert gram.layer_names == ["embedding", "head"]


def test_attention_without_dropout_is_measured_without_torch_warnings() -> None:
    """The per-sample recomputation of MultiheadAttention gives no vmap "performance drop" warning."""
    torch.manual_seed(2)
    model = TextClassifier().to(DTYPE).eval()
    tokens, labels = text_batch(3)
    expected = reference_gram(
        model, lambda i: F.cross_entropy(model(tokens[i : i + 1]), labels[i : i + 1]), len(tokens)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.enable_grad():
            gram = collect(model, lambda: F.cross_entropy(model(tokens), labels, reduction="sum"))
    assert_close(gram.matrix(), expected)


def test_exclude_is_checked() -> None:
    model = TextClassifier()
    with pytest.raises(
        ValueError, match=r"no module named 'encoder.layer.0' \(did you mean 'encoder.layers.0'\?\)"
    ):
        GramCollector(model, exclude=["encoder.layer.0"])
    with pytest.raises(TypeError, match="exclude must be a list of module names or modules"):
        GramCollector(model, exclude="head")
    with pytest.raises(ValueError, match="Linear module is not part of the model"):
        GramCollector(model, exclude=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="found no trainable parameter"):
        GramCollector(model, exclude=[model])


# -- torch.compile ----------------------------------------------------------------------------------


class CompiledNet(nn.Module):
    def __init__(self, compile_net: bool = True) -> None:
        super().__init__()
        net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        self.net = torch.compile(net, backend="eager") if compile_net else net
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


def test_compiled_submodule_is_refused_naming_compilation_and_the_way_out() -> None:
    with pytest.raises(ValueError) as error:
        GramCollector(CompiledNet())
    assert str(error.value) == (
        "GramCollector cannot measure modules compiled with torch.compile: ['net']. A compiled forward runs "
        "a cached graph without the collector's module hooks, so per-sample gradients cannot be captured (and "
        "measuring through the uncompiled module would change the numerics that train). Measure the "
        "uncompiled model (compile it after the diagnostic run). Or leave them out of the measurement: "
        "exclude=['net'] (GramCollector, FisherSpectrum)"
    )
    inplace = nn.Sequential(nn.Linear(2, 2))
    inplace.compile(backend="eager")
    with pytest.raises(ValueError, match=r"compiled with torch.compile: \['<root>'\]"):
        GramCollector(inplace)


@pytest.mark.parametrize("batch", [2, 3])
def test_excluding_the_compiled_module_measures_the_rest(batch: int) -> None:
    torch.manual_seed(batch)
    model = CompiledNet().to(DTYPE)
    x = torch.randn(batch, 4, dtype=DTYPE)
    params = list(model.head.parameters())
    expected = per_sample_jacobian(params, lambda i: model(x[i : i + 1]).square().sum(), batch)
    gram = collect(model, lambda: model(x).square().sum(), exclude=["net"])
    assert_close(gram.matrix(), expected @ expected.T)


class HiddenCompiled(nn.Module):
    """Calls a compiled copy of its child that is not registered as a submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        self.__dict__["fast"] = torch.compile(self.net, backend="eager")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fast(x)


def test_cached_compiled_graph_without_hooks_is_named_at_the_first_measured_step() -> None:
    """Two compiled runs without the collector cache a graph; a measured step with it then runs
    that graph without the collector's hooks, which the outside-use check names as such."""
    torch.manual_seed(0)
    model = HiddenCompiled()
    x = torch.randn(3, 4)
    for _ in range(2):
        model(x).square().sum().backward()
    with pytest.raises(ValueError) as error:
        collect(model, lambda: model(x).square().sum())
    assert "ran without GramCollector's hooks: either the module runs compiled (torch.compile" in str(
        error.value
    )
    assert "exclude=['net.0', 'net.2']" in str(error.value)


class CompiledClassifier(L.LightningModule):
    """A user's classifier whose network is compiled (``backend="eager"``: no C compiler needed)."""

    def __init__(self, hidden_compile: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        if hidden_compile:  # a compiled copy the module tree does not show
            self.__dict__["run"] = torch.compile(self.net, backend="eager")
        else:
            self.net = torch.compile(self.net, backend="eager")
            self.__dict__["run"] = self.net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.run(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def compiled_fit(module: L.LightningModule, tmp_path, callbacks=()) -> L.Trainer:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(12, 4), torch.randint(0, 3, (12,)))
    trainer = quiet_fit_trainer(list(callbacks), tmp_path, max_epochs=1)
    trainer.fit(module, DataLoader(data, batch_size=4))
    return trainer


@pytest.mark.parametrize("hidden_compile", [False, True], ids=["compiled_submodule", "hidden_compiled_copy"])
def test_cached_compile_two_fits_then_one_measured_is_refused_before_any_update(tmp_path, hidden_compile):
    """In one process: two fits of a compiled module without FisherSpectrum (torch caches the
    compiled graph), then a fit with it: refused, naming compilation, before any update."""
    for _ in range(2):
        compiled_fit(CompiledClassifier(hidden_compile), tmp_path)
    module = CompiledClassifier(hidden_compile)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    match = (
        "ran without GramCollector's hooks" if hidden_compile else r"compiled with torch.compile: \['net'\]"
    )
    with pytest.raises(ValueError, match=match):
        compiled_fit(module, tmp_path, [FisherSpectrum()])
    assert_identical({name: p.detach() for name, p in module.named_parameters()}, before)


# -- memory: the graph kept for dropout layers ---------------------------------------------------


def transformer_step(ending: str) -> list[weakref.ref]:
    """One collection on a training-mode TransformerEncoder with dropout, ending with a backward,
    without one, or with an exception after the forward; weak references to model and collector."""
    model = TextClassifier(batch_first=False).train()
    tokens, labels = text_batch(3)
    gram = GramCollector(model)
    try:
        with gram:
            loss = F.cross_entropy(model(tokens), labels)
            if ending == "exception":
                raise KeyError(ending)
            if ending == "backward":
                loss.backward()
    except KeyError:
        pass
    if ending == "backward":
        gram.matrix()
    return [weakref.ref(model), weakref.ref(gram)]


def live_tensors() -> int:
    gc.collect()
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


def test_kept_graph_keeps_nothing_alive() -> None:
    """Steps ending with a backward, without one, or with an exception leave no tensor, model or
    collector alive (the rule keeps no reference to the graph it reads in the backward)."""
    torch.manual_seed(0)
    endings = ["backward", "no_backward", "exception"]
    for ending in endings:  # first use: lazily created state settles
        transformer_step(ending)
    before = live_tensors()
    refs = [ref for ending in endings for ref in transformer_step(ending)]
    assert live_tensors() == before
    assert [ref() for ref in refs] == [None] * 6


class TransformerTextClassifier(L.LightningModule):
    """A user's text classifier on a stock ``nn.TransformerEncoderLayer`` (defaults: dropout 0.1,
    sequence first)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 8)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(8, 2, 16), 2, enable_nested_tensor=False
        )
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embedding(tokens).transpose(0, 1)).mean(0))

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        return F.cross_entropy(self(tokens), labels)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_fisher_spectrum_measures_a_stock_transformer_in_training(tmp_path) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randint(0, 20, (12, 6)), torch.randint(0, 3, (12,)))
    fisher = FisherSpectrum()
    trainer = quiet_fit_trainer([fisher], tmp_path, max_epochs=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="There is a performance drop")
        trainer.fit(TransformerTextClassifier(), DataLoader(data, batch_size=4))
    assert [record["step"] for record in fisher.history] == [0, 1, 2]
    assert all(record["trace"] > 0 and math.isfinite(record["c_k"]) for record in fisher.history)


# -- modules drawing random numbers, measured from the step's graph --------------------------------


class NoisyBlock(nn.Module):
    """A user block with its own parameter and functional dropout (no rule: the generic fallback)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.dropout(torch.tanh(x * self.scale), 0.4, self.training))


@pytest.mark.parametrize("batch", [2, 3])
@pytest.mark.parametrize("v2", [False, True], ids=["swin_v1", "swin_v2"])
def test_units_and_fallback_with_dropout_in_training_are_exact(v2: bool, batch: int) -> None:
    """Swin with attention and projection dropout inside its attention units, stochastic depth
    around them, and a user block with functional dropout: exact with the masks the step drew."""
    torch.manual_seed(batch)
    swin = tiny_swin(v2)
    for block in (swin.features[1][0], swin.features[3][0]):
        block.attn.attention_dropout, block.attn.dropout = 0.2, 0.1
        block.stochastic_depth.p = 0.3
    head = [NoisyBlock(), nn.Unflatten(1, (1, 2, 2)), nn.Upsample(scale_factor=4), nn.Conv2d(1, 3, 1)]
    model = nn.Sequential(*head, swin).to(DTYPE).train()
    x = torch.randn(batch, 4, dtype=DTYPE)
    y = torch.randint(0, 3, (batch,))

    def sample_loss(i: int) -> torch.Tensor:
        torch.manual_seed(5)
        return F.cross_entropy(model(x), y, reduction="none")[i]

    jacobian = per_sample_jacobian(list(model.parameters()), sample_loss, batch)
    torch.manual_seed(5)
    gram = collect(model, lambda: F.cross_entropy(model(x), y, reduction="sum"))
    assert_close(gram.matrix(), jacobian @ jacobian.T)
    assert gram.methods["0.scale"] == "fallback" and "4.features.1.0.attn" in gram.layer_names


def test_graph_backwards_in_chunks_give_the_same_matrix(monkeypatch) -> None:
    """Per-sample backwards one sample at a time (chunks of 1) give what one batched call gives."""
    torch.manual_seed(4)
    model = TextClassifier(batch_first=False).to(DTYPE).train()
    tokens, labels = text_batch(4)
    torch.manual_seed(9)
    whole = collect(model, lambda: F.cross_entropy(model(tokens), labels, reduction="sum")).matrix()
    monkeypatch.setattr(fallback, "GRAPH_CHUNK_ENTRIES", 1)
    torch.manual_seed(9)
    chunked = collect(model, lambda: F.cross_entropy(model(tokens), labels, reduction="sum")).matrix()
    assert_close(chunked, whole)


def test_a_module_defined_in_exec_code_without_a_module_name_is_measured() -> None:
    """Code run by ``exec`` with fresh globals (the README's examples, some notebook tools) defines
    functions whose ``__module__`` is ``None``; reading their source for units must not fail."""
    namespace: dict = {}
    exec(
        "import torch\n"
        "class Block(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.linear = torch.nn.Linear(3, 2)\n"
        "    def forward(self, x):\n"
        "        return self.linear(x)\n",
        namespace,
    )
    block = namespace["Block"]()
    assert block.forward.__func__.__module__ is None
    x = torch.randn(4, 3)
    with GramCollector(block) as collector:
        block(x).pow(2).sum(1).mean().backward()  # the mean of the per-sample losses
    expected = reference_gram(block, lambda i: block(x[i : i + 1]).pow(2).sum(), 4)
    torch.testing.assert_close(
        collector.matrix(), expected.to(collector.matrix().dtype), rtol=1e-5, atol=1e-6
    )
