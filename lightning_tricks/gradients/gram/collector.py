"""Exact Gram matrix of per-sample gradients from the training step's own backward (seed 004 §3, eq. 6).

Seed 004_e5d92837cb57ce8a.txt characterises training by the spectrum of F̃_k = J_kᵀ J_k (B×B), where
column i of J_k is sample i's loss gradient over all trainable parameters (§3, eq. 6), and builds it
layer by layer, F̃_k = Σ_l J_(k,l)ᵀ J_(k,l) (§4). The authors looped over samples inside modified
Torch/cuDNN layers and could afford it every 50 mini-batches; :class:`GramCollector` gets the same
matrix exactly from the activations and output gradients of one ordinary batched forward/backward.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.hooks import RemovableHandle

from ... import checks
from ..autograd_graph import leaf_uses
from .factors import (
    ChannelAffineFactor,
    ConvFactor,
    EmbeddingFactor,
    GradFactor,
    OuterFactor,
    PerSampleFactor,
    cast,
    concat_factors,
)
from .fallback import FALLBACK_RULE, RECOMPUTING, output_leaves
from .registry import GramRule, capture_input, first_tensor, gram_rule_for, leading_batch_size
from .units import UNIT_RULE, compiled_modules, excluded_parameters, is_unit, training_refusal

LOSS_REDUCTIONS = ("mean", "sum")

METHODS = ("auto", "ghost", "materialize")

UNSUPPORTED_POLICIES = ("raise", "skip")


@dataclass
class _Layer:
    """Capture state of one parameterised module.

    ``candidates`` are the module's own parameters that may enter G, ``shared`` those it shares
    with another captured module; ``params`` and ``active_shared`` are the ones that required grad
    at the module's first captured forward of the current collection (the trainable set then);
    ``flags`` are the ``requires_grad`` of candidates and shared parameters they were derived from
    (derived again only when the flags change); ``recorded_ids`` the ids of the active and active
    shared parameters (those a captured call records), ``shared_params`` the active shared ones;
    ``everything`` candidates then shared parameters (the order of ``flags``), set once tied
    weights are known.
    ``default_capture``: the rule keeps the first tensor argument, whose leading size is B;
    ``leading_batch``: B is that leading size (the rule's ``batch_size`` is the default).
    ``backprop_hook``: the collector's (weak) output-gradient hook for this layer. ``plan``: per
    parameter, the method chosen at its first collection with the shapes it was chosen for."""

    name: str
    module: nn.Module
    rule: GramRule
    params: dict[str, nn.Parameter]
    pending: int = 0
    calls: int = 0
    factors: list[dict[str, GradFactor]] = field(default_factory=list)
    methods: dict[str, str] = field(default_factory=dict)
    candidates: dict[str, nn.Parameter] = field(default_factory=dict)
    shared: dict[str, nn.Parameter] = field(default_factory=dict)
    active_shared: tuple[str, ...] = ()
    activated: bool = False
    flags: list[bool] = field(default_factory=list)
    recorded_ids: list[int] = field(default_factory=list)
    shared_params: list[nn.Parameter] = field(default_factory=list)
    everything: list[nn.Parameter] = field(default_factory=list)
    default_capture: bool = field(init=False)
    leading_batch: bool = field(init=False)
    backprop_hook: Callable[..., None] | None = None
    plan: dict[str, tuple[Any, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.candidates = dict(self.params)
        rule = self.rule
        self.leading_batch = rule.batch_size is leading_batch_size
        self.default_capture = rule.capture is capture_input and self.leading_batch


class GramCollector:
    """Exact B×B Gram matrix of per-sample gradients, G[i, j] = ⟨∇ℓ_i, ∇ℓ_j⟩, from one backward.

    G is seed 004's approximate Fisher matrix F̃_k = J_kᵀ J_k (``004_e5d92837cb57ce8a.txt`` §3,
    eq. 6), computed as Σ_l J_(k,l)ᵀ J_(k,l) over layers l (§4). Hooks capture each parameterised
    layer's input in the forward and its output gradient in the ordinary backward; a per-layer
    rule (:mod:`~lightning_tricks.gradients.gram.rules`) turns the two into that layer's (B, B)
    contribution, inside the backward, so per-sample gradients of more than one layer are never
    held (but those of small same-shaped layers, computed together; see *Host cost* below). There is no second backward and no loop over samples. Per layer and parameter the
    cheaper of two exact methods is used: *ghost* (inner products of activations and of output
    gradients, cost ∝ B²·T²·(d_in + d_out) for T positions) or *materialised* (that layer's
    per-sample gradients, then their Gram, cost ∝ B·T·d_in·d_out + B²·d_in·d_out).

    Columns and reductions: with ``loss_reduction="sum"`` (loss Σ_i ℓ_i) the captured gradients are
    the per-sample ones; with ``"mean"`` (loss (1/B)·Σ_i ℓ_i) they are scaled by B, so column i is
    ∇ℓ_i as in eq. 6 either way. B is the leading dimension of the layers' inputs.

    BatchNorm in training mode couples the samples of a batch (batch statistics), so no per-sample
    loss gradient exists. Column i is then sample i's *contribution* to the batch gradient: each
    layer's weight gradient Σ_t δ_t a_tᵀ restricted to sample i's terms, with δ the gradient of
    the whole batch loss — what seed 004's per-sample calls inside the backward computed (§4).
    The columns add up to the batch gradient: Σ_i col_i = B·∇L for ``"mean"`` (∇L for ``"sum"``),
    hence 1ᵀG1 = B²‖∇L‖². The same holds for ``nn.Embedding(scale_grad_by_freq=True)``.

    Supported layers. Closed-form rules (``methods`` "ghost"/"materialize"): Linear (any leading
    dims), Conv1d/2d/3d and ConvTranspose1d/2d/3d (stride, padding incl. ``"same"`` and padding
    modes, dilation, groups, bias), BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d, GroupNorm, LayerNorm,
    RMSNorm, Embedding (``padding_idx``, ``scale_grad_by_freq``), EmbeddingBag (sum/mean/max,
    offsets or 2-D input, ``per_sample_weights``, ``padding_idx``), PReLU, Bilinear; the batch
    dimension comes first in their inputs. Per-sample vector-Jacobian products ("vjp",
    :mod:`~lightning_tricks.gradients.gram.rules.attention`,
    :mod:`~lightning_tricks.gradients.gram.rules.recurrent`): MultiheadAttention (with ``out_proj``),
    RNN/LSTM/GRU (multi-layer, bidirectional, ``proj_size``, initial states), both
    ``batch_first`` settings; sequence-first TransformerEncoderLayer/DecoderLayer as a whole (batch
    first, their children's rules serve them). Subclasses use the rule of their nearest registered
    base if they inherit its ``forward``. Any other module owning parameters gets the generic
    fallback ("fallback": per-sample VJPs of the module recomputed on its captured inputs, batch
    in dim 0 of the inputs and outputs whose leading size is B); it refuses, with an error, modules
    that couple samples. Modules that draw random numbers (dropout in training mode: in
    MultiheadAttention, in Transformer layers, in any module the fallback serves) are measured
    from the step's own graph, dropout masks included: one backward of the module's part of the
    graph per sample, batched inside the step's backward (:func:`.fallback.graph_factors`; B
    times that module's backward). Units (:mod:`~lightning_tricks.gradients.gram.units`):
    a module whose forward uses a child's weights functionally instead of calling the child
    (torchvision's Swin attention: ``F.linear(x, self.qkv.weight)``), or runs a parameterised
    child on its own attributes (tensors without a sample dimension, Swin v2's ``cpb_mlp`` on a
    position table), is measured whole, by the fallback's per-sample VJPs over its subtree.
    Dropout between RNN layers in training mode is refused (the error names the module, and
    ``unsupported="skip"`` leaves such modules out); unbatched inputs and ``PackedSequence`` too.
    Modules compiled with ``torch.compile`` (wrappers, ``module.compile()``, a compiled
    ``forward``) are refused at construction: a compiled graph runs without module hooks, and
    one cached by an earlier run even without a visible wrapper (:meth:`check_outside_use` then
    names the modules whose hooks did not fire). ``exclude=`` leaves any of these out and measures
    the rest. Register rules with
    :func:`~lightning_tricks.gradients.gram.registry.register_gram_rule` or override them per
    collector with ``rules=``. A module with several tensor outputs (LSTM, attention) must not
    have them modified in place (they pass through one identity node that collects their gradients).

    Several forwards of one module in a collection (weight sharing, siamese branches) are handled
    exactly: that module's per-sample gradients are the sums over its calls, cross terms included;
    all forwards of a collection are treated as parts of the same B samples. A forward after a
    module's backward was completed is refused (call :meth:`reset` between steps, e.g. between
    accumulated micro-batches; activation checkpointing, which re-runs forwards inside the
    backward, is not supported).

    Trainable set: the parameters that enter G are re-read at the first captured forward after
    :meth:`reset`: one with ``requires_grad=False`` then (frozen by the user) is left out and
    never touched; one unfrozen later enters G. A parameter registered in several captured modules
    (tied weights, e.g. an embedding and an output Linear) is measured exactly: its per-sample
    gradients are materialised per module and added (cross terms included), and its block appears
    in ``matrix(per_layer=True)`` as ``"<first module>.<parameter>"``. A parameter that feeds the
    loss other than through its module's captured forwards (used functionally, e.g.
    ``F.linear(h, emb.weight)``) cannot be measured: :meth:`check_outside_use` finds every such use
    in the loss's autograd graph, and :meth:`matrix` raises where it sees one (a gradient reaching a
    parameter whose captured forwards did not record it); leave its module out (``exclude=``) or
    call it through a module. A frozen parameter of a module without a rule that
    is unfrozen later makes :meth:`matrix` raise (``unsupported="raise"``) or warn once.

    Batch gradients: autograd computes every ``.grad`` as without the collector, which only reads
    the activations and output gradients, so ``.grad``, parameters and buffers are bit-for-bit
    those of a plain step (``tests/test_gram_invariance.py``).

    Accumulation and precision: each layer's (B, B) block is computed in the promoted dtype of its
    activations and gradients (at least float32; float16/bfloat16 are upcast) and kept so; when G
    is read the blocks are cast to float64 together and summed there, on the model's device;
    nothing syncs with the host. On CPU a materialised block is computed from its upper block
    triangle (3/4 of the multiply-adds, from B = 64), and each convolution picks the fastest exact
    way to its per-sample gradients (:meth:`ConvFactor.per_sample_method
    <lightning_tricks.gradients.gram.factors.ConvFactor.per_sample_method>`). G is that of the loss
    actually backpropagated: with a gradient scaler (16-bit AMP) divide it by the scale squared.

    Host cost (where a GPU's step waits for Python): hooks are registered once and put in and out
    of torch's hook dicts by :meth:`attach`/:meth:`detach` (no Python call per hook); a layer has
    one forward hook and no pre-hook; an output's gradient hook goes in without a removable
    handle; :meth:`forward_done` takes the parameter hooks that would return at once out for the
    backward (at most two hook calls a layer and step remain); the method of each parameter is
    planned at its first collection; normalisation layers and materialised convolutions with small
    operands (at most ``GROUP_MAX_ENTRIES`` entries) keep their captured operands until G is read,
    when the layers of one shape get their blocks from one batched computation (larger layers are
    computed in the backward, so no large activation is held).

    Args:
        model: the module whose parameters' per-sample gradients are wanted.
        loss_reduction: ``"mean"`` if the backpropagated loss is (1/B)·Σ_i ℓ_i, ``"sum"`` if Σ_i ℓ_i.
        params: restrict to these parameters (default: all with ``requires_grad``).
        modules: restrict to parameters of modules for which ``modules(name, module)`` is true.
        method: ``"auto"`` (cheaper per layer), ``"ghost"`` or ``"materialize"`` forced where the
            layer has that form (normalisation layers and biases are always materialised).
        unsupported: with ``fallback=False``, ``"raise"`` on selected parameters whose module has
            no rule (one error listing them all) or ``"skip"`` them with one warning, leaving them
            out of G.
        fallback: serve modules without a rule by the generic fallback (default); ``False`` makes
            them unsupported.
        rules: ``{module type: GramRule or None}`` overriding the registry for this collector
            (``None``: no rule for that type, so the fallback or ``unsupported`` applies).
        exclude: modules to leave out, by name (as in ``model.named_modules()``) or as module
            objects; the parameters of their subtrees are not measured (their gradients are still
            computed and trained as usual). Unknown names raise ``ValueError``.

    Raises:
        ValueError: bad argument values, unsupported trainable layers with ``unsupported="raise"``,
            a compiled module owning measured parameters, or no parameter selected; from
            :meth:`check_outside_use`, a parameter used outside its module; from a captured
            forward, a module refused in training mode.
        TypeError: ``model`` not a module, ``params`` not parameters, ``modules`` not callable,
            ``exclude`` not a list of names or modules.
        RuntimeError: from :meth:`matrix` if no backward was captured, a parameter received a
            gradient outside its module's forward, or an unsupported layer was unfrozen; in the
            backward if a layer's input was modified in place, the batch size differs between
            layers, or a module runs again after its contribution was completed.

    Example::

        import torch
        from torch import nn
        from lightning_tricks.gradients import GramCollector

        model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
        x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
        with GramCollector(model, loss_reduction="mean") as gram:
            torch.nn.functional.cross_entropy(model(x), y).backward()
        G = gram.matrix()                      # (8, 8) float64, G[i, j] = <grad l_i, grad l_j>
        blocks = gram.matrix(per_layer=True)   # {"0": (8, 8), "2": (8, 8)}, summing to G

        # from a callback: hooks on measured steps only (an unmeasured step runs none of this code)
        collector = GramCollector(model)
        ...                                    # unmeasured steps: nothing attached
        collector.reset()
        collector.attach()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        collector.detach()                     # what was captured stays readable
        eigenvalues = torch.linalg.eigvalsh(collector.matrix())

    Memory: hooks reach the collector through a weak reference and :meth:`detach` drops the
    recorded graph nodes, so after the context (or :meth:`detach`, or an exception) nothing keeps
    the model, the collector or its captures alive; a collector dropped while attached removes its
    hooks.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_reduction: str = "mean",
        *,
        params: Iterable[nn.Parameter] | None = None,
        modules: Callable[[str, nn.Module], bool] | None = None,
        method: str = "auto",
        unsupported: str = "raise",
        fallback: bool = True,
        rules: Mapping[type[nn.Module], GramRule | None] | None = None,
        exclude: Iterable[str | nn.Module] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        checks.choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
        checks.choice("method", method, METHODS)
        checks.choice("unsupported", unsupported, UNSUPPORTED_POLICIES)
        if not isinstance(fallback, bool):
            raise TypeError(f"fallback must be True or False, got {fallback!r}")
        if modules is not None and not callable(modules):
            raise TypeError("modules must be a callable (name, module) -> bool")
        self.model = model
        self.loss_reduction = loss_reduction
        self.method = method
        self.unsupported = unsupported
        candidates = _selected_params(model, params) - excluded_parameters(model, exclude)
        _check_not_compiled(model, candidates)
        self._layers = _select_layers(
            model, candidates, modules, unsupported, fallback, _checked_rules(rules)
        )
        self._owners = _share_tied_params(self._layers)
        for layer in self._layers:
            layer.everything = [*layer.candidates.values(), *layer.shared.values()]
        self._unmeasured = _frozen_unmeasured(model, candidates, modules, self._owners)
        self._plugs = _Plugs()
        weakref.finalize(self, self._plugs.remove)  # a collector collected while attached
        self._unhooked = False
        for layer in self._layers:
            layer.backprop_hook = _WeakHook(self._on_backprop, layer)
        self._params = list({id(p): p for layer in self._layers for p in layer.everything}.values())
        self._flags: list[bool] = []  # requires_grad of _params at the last collection's first forward
        self._enabled = True
        self._batch_size: int | None = None
        self._blocks: dict[str, Tensor] = {}
        self._grouped: dict[tuple, list[tuple[str, GradFactor]]] = {}  # block parts computed when read
        self._missed: set[str] = set()
        self._visible: set[int] = set()  # ids of parameters recorded by a captured call
        self._consumers: dict[nn.Parameter, set[Any]] = {}
        self._shared_grads: dict[nn.Parameter, Tensor] = {}
        self._warned_unmeasured = False
        self.track_outside_use = True
        """Record, at each captured forward, the autograd nodes that use the measured parameters
        (a walk over that call's part of the graph), which :meth:`check_outside_use` needs; set it
        ``False`` for collections that will not be checked."""

    # -- public API ------------------------------------------------------------------------

    def attach(self) -> GramCollector:
        """Register the hooks (idempotent). Capture happens while :attr:`enabled`.

        The hooks are registered through torch's API at the first attach; :meth:`detach` takes them
        out of torch's hook dicts and a later attach puts them back (dict operations, no Python
        call per hook), so attaching for one measured step costs what one function call costs."""
        if self._plugs.attached:
            return self
        self._unhooked = False
        if not self._plugs.plug_modules():
            self._register_module_hooks()
        self._hook_leaves(self._params)
        return self

    def detach(self) -> None:
        """Remove every hook (module and tensor hooks); safe to call at any point, also from an
        exception handler. Results of a completed collection stay readable."""
        self._consumers.clear()  # autograd nodes of the last forward (they hold its graph)
        self._plugs.unplug()

    @property
    def attached(self) -> bool:
        """Whether the hooks are on the model (between :meth:`attach` and :meth:`detach`)."""
        return self._plugs.attached

    def reset(self) -> None:
        """Forget everything captured, to start a new collection (one forward/backward)."""
        self._plugs.wake_leaves()
        for layer in self._layers:  # layer.clear(), inline (one Python call per reset, not per layer)
            layer.pending = layer.calls = 0
            layer.activated = False
            layer.factors.clear()
            layer.methods.clear()
        self._batch_size = None
        self._blocks = {}
        self._missed.clear()
        self._visible.clear()
        self._consumers.clear()
        self._shared_grads.clear()
        self._grouped.clear()

    @property
    def enabled(self) -> bool:
        """Whether forwards are captured; the hooks return at once while ``False``."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)

    @property
    def batch_size(self) -> int | None:
        """B of the current collection, or ``None`` before any captured forward."""
        return self._batch_size

    @property
    def captured(self) -> bool:
        """Whether a backward delivered at least one layer's output gradient since :meth:`reset`."""
        if self._blocks or self._shared_grads or self._grouped:
            return True
        return any(layer.factors for layer in self._layers)

    @property
    def methods(self) -> dict[str, str]:
        """``"<module>.<param>" -> "ghost" | "materialize" | "vjp" | "fallback"`` in the current collection."""
        return {
            f"{layer.name}.{p}" if layer.name else p: layer.rule.method or m
            for layer in self._layers
            for p, m in layer.methods.items()
        }

    @property
    def layer_names(self) -> list[str]:
        """Names of the modules whose parameters enter G, in ``named_modules`` order."""
        return [layer.name for layer in self._layers]

    def matrix(self, per_layer: bool = False) -> Tensor | dict[str, Tensor]:
        """G = Σ_l G_l (B, B) float64 (seed 004 eq. 6 and §4), or ``{module name: G_l}`` if ``per_layer``.

        Layers whose output never received a gradient contribute zero blocks.
        """
        self._finish_pending()
        if not self.captured:
            raise RuntimeError(
                "GramCollector captured no backward: run the forward and loss.backward() while the "
                "collector is attached and enabled (and grad mode is on), after reset()"
            )
        if self._missed:
            raise RuntimeError(
                f"parameters {sorted(self._missed)} received gradients, but their modules' forward was "
                "not captured (parameter used outside its module's forward, or capture enabled after "
                "the forward, or a compiled forward that bypasses module hooks); G would miss their "
                "contribution. Call the weight through its module, or leave its module out with exclude=[...]"
            )
        self._check_unmeasured()
        scale = float(self._batch_size) ** 2 if self.loss_reduction == "mean" else 1.0
        names = [*self.layer_names, *(_param_name(*self._owners[p][0]) for p in self._shared_grads)]
        blocks = {name: self._blocks[name] for name in names if name in self._blocks}
        if per_layer:
            return {name: block.to(torch.float64) * scale for name, block in blocks.items()}
        dtype = functools.reduce(torch.promote_types, {block.dtype for block in blocks.values()})
        stacked = torch.stack([b if b.dtype == dtype else b.to(dtype) for b in blocks.values()])
        return cast(stacked, torch.float64).sum(0) * scale

    def forward_done(self) -> None:
        """The collection's forward is complete: the leaf hooks of the parameters its captured calls
        recorded come out of torch's hook dicts until the next :meth:`reset` (a gradient reaching
        them is expected, so they would return at once); those of the others stay, to spot a use
        outside their modules. Optional: a driver that knows where the backward starts saves the
        hook calls (``StepCapture``)."""
        self._plugs.quiet_leaves(self._visible)

    def check_outside_use(self, loss: Tensor) -> None:
        """Raise ``ValueError`` if a parameter entering G feeds ``loss`` other than through its
        module's captured forwards (e.g. ``F.linear(h, emb.weight)``): G would miss that use.

        Walks ``loss``'s autograd graph once (call it after the forward, before the backward): every
        graph edge into a measured parameter must come from inside one of its module's captured
        calls, whose own edges are recorded at the end of each captured forward (only while
        :attr:`track_outside_use`: otherwise it raises ``RuntimeError``).
        """
        if not self.track_outside_use:
            raise RuntimeError(
                "check_outside_use needs the forward captured with track_outside_use=True (the default)"
            )
        tracked = {p for layer in self._layers for p in layer.params.values()}
        tracked.update(p for layer in self._layers for p in map(layer.shared.get, layer.active_shared))
        if not tracked:
            return
        outside = {
            param
            for node, param in leaf_uses(loss)
            if param in tracked and node not in self._consumers.get(param, ())
        }
        if outside:
            raise ValueError(self._outside_use_message(outside))

    def _outside_use_message(self, outside: set[nn.Parameter]) -> str:
        """Parameters of modules whose captured forward ran are used functionally elsewhere; those
        of modules without a captured forward were used by an enclosing module, or their module
        ran without hooks (a compiled graph)."""
        owners = {p: self._owners[p][0][0] for p in outside}
        names = sorted(_param_name(*self._owners[p][0]) for p in outside)
        silent = sorted({layer.name or "<root>" for layer in owners.values() if layer.calls == 0})
        if not silent:
            return (
                f"parameters {names} are used outside their module's forward (functionally, e.g. "
                "F.linear(x, module.weight)), so their per-sample gradients cannot be measured. Call "
                "them through a module (tied weights shared by two modules are measured exactly), or "
                "leave their modules out of the measurement: exclude=[...] (GramCollector, FisherSpectrum)"
            )
        return (
            f"parameters {names} received gradients, but the forward of their modules {silent} ran "
            "without GramCollector's hooks: either the module runs compiled (torch.compile, or a "
            "compiled graph cached by an earlier run, bypasses module hooks; measure the uncompiled "
            "model), or an enclosing module uses their weights functionally (F.linear(x, "
            "self.child.weight)) in a way its source does not show." + _exclude_hint(silent)
        )

    @staticmethod
    def check_loss(loss: Any) -> None:
        """Raise ``TypeError`` unless ``loss`` is a floating-point scalar tensor that requires grad."""
        if not isinstance(loss, Tensor) or not loss.is_floating_point():
            kind = loss.dtype if isinstance(loss, Tensor) else type(loss).__name__
            raise TypeError(f"the loss must be a floating-point tensor, got {kind}")
        if loss.dim() != 0 or not loss.requires_grad:
            raise TypeError(
                f"the loss must be a scalar that requires grad, got shape {tuple(loss.shape)} "
                f"with requires_grad={loss.requires_grad}"
            )

    def __enter__(self) -> GramCollector:
        self.attach()
        self.reset()
        self.enabled = True
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        self.detach()
        if exc_type is not None:
            self.reset()  # drop what a failed step captured

    # -- hooks ------------------------------------------------------------------------------

    def _after_forward(self, layer: _Layer, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Read the trainable set at the collection's first captured call, keep the layer's input
        and hook its output gradient (several outputs: see :func:`_hook_output_grads`, which may
        return the output to use instead)."""
        if not (self._enabled and torch.is_grad_enabled()) or RECOMPUTING.depth:
            return None
        if not layer.activated:  # the collection's first captured call
            self._activate_all(layer)
        inputs = args[0] if args and isinstance(args[0], Tensor) else first_tensor(args, kwargs)
        if not isinstance(inputs, Tensor):
            return None
        if layer.pending == 0 and layer.calls > 0:
            raise RuntimeError(
                f"module {layer.name!r} ran forward again after its backward was captured; call "
                "GramCollector.reset() between training steps (e.g. between accumulated micro-batches)"
            )
        single = isinstance(output, Tensor)
        if not (output.requires_grad if single else _requires_grad(output)):
            return None
        if not (layer.params or layer.active_shared):
            return None
        self._visible.update(layer.recorded_ids)
        if self.track_outside_use:
            self._record_consumers(layer, output, args, kwargs)
        if inputs.shape[:1] == (0,):  # an empty batch: nothing to measure
            return None
        if layer.leading_batch and inputs.dim() > 0:
            batch_size = inputs.shape[0]
            activations = (
                inputs if layer.default_capture else layer.rule.capture(module, args, kwargs, output)
            )
        else:
            batch_size = layer.rule.batch_size(module, args, kwargs)
            activations = layer.rule.capture(module, args, kwargs, output)
        if batch_size != self._batch_size:
            self._check_batch_size(layer, batch_size)
        layer.pending += 1
        layer.calls += 1
        hook = functools.partial(layer.backprop_hook, activations, inputs, inputs._version)
        if single:
            _register_grad_hook(output, hook)
            return None
        return _hook_output_grads(output, hook)

    def _on_backprop(
        self,
        layer: _Layer,
        activations: Any,
        inputs: Tensor,
        version: int,
        backprops: Tensor | tuple[Tensor | None, ...],
    ) -> None:
        """Turn one call's captured ``activations`` and output gradient into factors; finish the
        layer on its last call. ``inputs`` must still be at ``version`` (no in-place change since
        the forward). Off during a per-sample backward of the rules' own
        (:func:`.fallback.graph_factors`), which passes through this hook again."""
        if RECOMPUTING.depth:
            return
        if inputs._version != version:
            raise RuntimeError(
                f"the input of module {layer.name!r} was modified in place after its forward; "
                "GramCollector needs it unchanged until the backward (avoid in-place ops on it)"
            )
        if torch.is_grad_enabled():  # a backward with create_graph=True: again, without grad mode
            with torch.no_grad():
                return self._on_backprop(layer, activations, inputs, version, backprops)
        factors = layer.rule.factorize(layer.module, activations, backprops)
        if layer.active_shared:
            self._add_shared(layer, factors)
        layer.pending -= 1
        if not layer.params:
            return None
        layer.factors.append(factors)
        if layer.pending == 0:
            self._finish_layer(layer)
        return None

    def _on_param_grad(self, param: nn.Parameter, grad: Tensor) -> None:
        """A parameter got a gradient although none of its captured forwards recorded it (none was
        captured): it was used outside its module."""
        if self._enabled and id(param) not in self._visible:
            self._missed.add(_param_name(*self._owners[param][0]))

    # -- trainable set, tied weights, outside use ---------------------------------------------

    def _activate_all(self, layer: _Layer) -> None:
        """At a collection's first captured forward (``layer``'s), the flags of all candidates in
        one pass: the same as at the last collection (the usual case), every layer keeps its
        trainable set without a call per layer; else every layer derives its own
        (:meth:`_activate`)."""
        flags = [p.requires_grad for p in self._params]
        unchanged = flags == self._flags and not self._unhooked
        self._flags = flags
        for other in self._layers:
            if unchanged:
                other.activated = True
            else:
                self._activate(other)

    def _activate(self, layer: _Layer) -> None:
        """The layer's parameters that require grad now (the user's flags) enter this collection
        (derived again only if a flag changed since the last collection); each gets a leaf hook
        (once) that spots a gradient from outside its module."""
        layer.activated = True
        everything = layer.everything
        flags = [p.requires_grad for p in everything]
        if flags != layer.flags:
            layer.flags = flags
            active = {id(p) for p, flag in zip(everything, flags) if flag}
            layer.params = {n: p for n, p in layer.candidates.items() if id(p) in active}
            layer.active_shared = tuple(n for n, p in layer.shared.items() if id(p) in active)
            layer.shared_params = [layer.shared[n] for n in layer.active_shared]
            layer.recorded_ids = [id(p) for p in (*layer.params.values(), *layer.shared_params)]
        if self._unhooked:  # some parameter was frozen at attach
            unhooked = [p for p, flag in zip(everything, flags) if flag and not self._plugs.plugged(id(p))]
            if unhooked:
                self._hook_leaves(unhooked)

    def _register_module_hooks(self) -> None:
        """Each layer's forward hook, through torch's API; it reaches the collector through a weak
        proxy (one Python frame per call), so the model never keeps it alive, and it is removed
        when the collector is collected."""
        owner = weakref.proxy(self)
        after = type(self)._after_forward
        handles = [
            layer.module.register_forward_hook(
                partial(after, owner, layer), with_kwargs=True, always_call=True
            )
            for layer in self._layers
        ]
        self._plugs.add_modules(handles)

    def _hook_leaves(self, params: list[nn.Parameter]) -> None:
        """A hook (registered once, then plugged back) on each parameter that requires grad,
        spotting gradients from outside; :attr:`_unhooked` says whether one was left out (frozen)."""
        missing, frozen = self._plugs.plug_leaves(params)
        self._unhooked = self._unhooked or frozen
        for param in missing:
            hook = partial(type(self)._on_param_grad, weakref.proxy(self), param)
            self._plugs.add_leaf(id(param), param.register_hook(hook))

    def _record_consumers(self, layer: _Layer, output: Any, args: tuple, kwargs: dict) -> None:
        """Remember the autograd nodes that use the parameters this call recorded in the graph (the
        nodes between its outputs and its inputs ``args``, ``kwargs``), for :meth:`check_outside_use`."""
        own_ids = set(layer.recorded_ids)
        inputs = (*args, *kwargs.values())
        stops = {t.grad_fn for t in inputs if isinstance(t, Tensor) and t.grad_fn is not None}
        leaves = (output,) if isinstance(output, Tensor) else output_leaves(output)
        stack = [leaf.grad_fn for leaf in leaves if isinstance(leaf, Tensor) and leaf.grad_fn]
        seen = stops | set(stack)
        while stack:
            node = stack.pop()
            for child, _ in node.next_functions:
                param = getattr(child, "variable", None)
                if param is not None and id(param) in own_ids:
                    self._consumers.setdefault(param, set()).add(node)
                elif child is not None and param is None and child not in seen:
                    seen.add(child)
                    stack.append(child)

    def _add_shared(self, layer: _Layer, factors: dict[str, GradFactor]) -> None:
        """Tied weights: add this call's per-sample gradients to the parameter's running sum."""
        for name in layer.active_shared:
            param = layer.shared[name]
            grads = factors[name].per_sample()
            previous = self._shared_grads.get(param)
            self._shared_grads[param] = grads if previous is None else previous + grads

    def _finish_shared(self) -> None:
        """G of each tied weight from its summed per-sample gradients (materialised)."""
        for param, grads in self._shared_grads.items():
            flat = grads.reshape(grads.shape[0], -1)
            self._blocks[_param_name(*self._owners[param][0])] = flat @ flat.T

    def _check_unmeasured(self) -> None:
        """A parameter of a module without rule, frozen at construction, is trainable now."""
        late = sorted(name for param, name in self._unmeasured.items() if param.requires_grad)
        if not late:
            return
        message = (
            f"parameters {late} were frozen when the GramCollector was built and are trainable now, "
            "but their modules have no Gram rule"
        )
        if self.unsupported == "raise":
            raise RuntimeError(
                message
                + "; register a rule, leave their modules out with exclude=[...], or pass unsupported='skip'"
            )
        if not self._warned_unmeasured:
            self._warned_unmeasured = True
            warnings.warn(message + "; G leaves them out", stacklevel=3)

    # -- computation ------------------------------------------------------------------------

    def _finish_layer(self, layer: _Layer) -> None:
        """G_l = Σ_params Gram of the layer's (combined) factors. The materialised parameters of a
        layer share one matmul: [g_i(θ₁), g_i(θ₂), …] stacked per sample."""
        calls = layer.factors
        if len(calls) == 1 and self._grouped_layer(layer, calls[0]):
            return
        blocks: list[Tensor] = []
        per_sample: list[Tensor] = []
        for name in layer.params:
            factor = calls[0][name] if len(calls) == 1 else concat_factors([call[name] for call in calls])
            if type(factor) is PerSampleFactor:  # materialised only, rows at hand
                layer.methods[name] = "materialize"
                grads = factor.grads
                per_sample.append(grads if grads.dim() == 2 else grads.reshape(grads.shape[0], -1))
                continue
            method = self._planned_method(layer, name, factor)
            layer.methods[name] = method
            if type(factor) is ConvFactor and _groupable_conv(factor):
                self._grouped.setdefault((method, *_conv_group_key(factor)), []).append((layer.name, factor))
            elif method == "ghost":
                blocks.append(factor.ghost_gram())
            else:
                per_sample.append(_rows(factor))
        if len(per_sample) > 1:
            ordered = [  # (n, B, P_n) column blocks back to per-sample order (B, P)
                rows.transpose(0, 1).reshape(rows.shape[1], -1) if rows.dim() == 3 else rows
                for rows in per_sample
            ]
            blocks.append(_gram(torch.cat(ordered, dim=1)))
        elif per_sample:
            blocks.append(_gram(per_sample[0]))
        calls.clear()
        if blocks:  # else every part of the block waits in a group
            self._blocks[layer.name] = blocks[0] if len(blocks) == 1 else torch.stack(blocks).sum(0)

    def _planned_method(self, layer: _Layer, name: str, factor: GradFactor) -> str:
        """:func:`_choose_method`, decided at the parameter's first collection and reused while
        its factor's type and operand shapes (which the costs depend on) stay the same."""
        shaped = (
            type(factor) in _SHAPED_FACTORS
            and isinstance(factor[0], Tensor)
            and isinstance(factor[1], Tensor)
        )
        key = (type(factor), factor[0].shape, factor[1].shape) if shaped else None  # what the costs depend on
        planned = layer.plan.get(name)
        if key is not None and planned is not None and planned[0] == key:
            return planned[1]
        method = _choose_method(factor, self.method)
        layer.plan[name] = (key, method)
        return method

    def _grouped_layer(self, layer: _Layer, factors: dict[str, GradFactor]) -> bool:
        """A normalisation layer whose factor covers all its active parameters: its block waits,
        with those of the layers of the same shape, for one batched computation when G is read
        (:meth:`_flush_groups`); a layer above ``GROUP_MAX_ENTRIES`` gets its block now. ``False``
        for any other layer."""
        factor = next(iter(factors.values()))
        if type(factor) is not ChannelAffineFactor or factor.names != tuple(layer.params):
            return False
        layer.factors.clear()
        for name in factor.names:
            layer.methods[name] = "materialize"
        inputs = factor.inputs
        if inputs.numel() > GROUP_MAX_ENTRIES:
            self._blocks[layer.name] = _gram(factor.rows())
        else:
            key = (
                ChannelAffineFactor,
                inputs.shape,
                inputs.dtype,
                inputs.device,
                factor.mean.shape,
                factor.names,
            )
            self._grouped.setdefault(key, []).append((layer.name, factor))
        return True

    def _flush_groups(self) -> None:
        """The block parts that wait in groups of one shape (the factor's ``grams``: one batched
        computation per group), added to their layers' blocks."""
        if self._grouped:
            with torch.no_grad():
                self._flush_grouped()

    def _flush_grouped(self) -> None:
        blocks = self._blocks
        for key, group in self._grouped.items():
            first = group[0][1]
            ghost = key[0] == "ghost"  # a convolution's method (a normalisation layer's key: its type)
            if len(group) == 1:
                parts = [first.ghost_gram() if ghost else _gram(_rows(first))]
            elif ghost:
                parts = ConvFactor.grams([factor for _, factor in group], ghost=True).unbind(0)
            else:
                parts = type(first).grams([factor for _, factor in group]).unbind(0)
            for (name, _), part in zip(group, parts):
                blocks[name] = part if name not in blocks else blocks[name] + part
        self._grouped.clear()

    def _finish_pending(self) -> None:
        """Layers with a call whose output got no gradient: finish with the calls that did."""
        for layer in self._layers:
            if layer.factors:
                layer.pending = 0
                self._finish_layer(layer)
        self._flush_groups()
        self._finish_shared()

    def _check_batch_size(self, layer: _Layer, batch_size: int) -> None:
        if self._batch_size is None:
            self._batch_size = batch_size
        elif batch_size != self._batch_size:
            raise RuntimeError(
                f"module {layer.name!r} got a batch of {batch_size} samples, other layers {self._batch_size}; "
                "GramCollector needs the batch dimension first in every layer's input"
            )


class _WeakHook:
    """``method(*args, *hook_args)`` through a weak reference to the collector (``method``'s
    object): a hook held by a module, a parameter or an autograd node (in C++, out of the garbage
    collector's sight) never keeps the collector, its model or what it captured alive; once the
    collector is gone it does nothing. One Python frame per call besides the method's own."""

    __slots__ = ("_owner", "_function", "_args")

    def __init__(self, method: Callable[..., Any], *args: Any) -> None:
        self._owner = weakref.ref(method.__self__)
        self._function = method.__func__
        self._args = args

    def __call__(self, *hook_args: Any) -> Any:
        owner = self._owner()
        return None if owner is None else self._function(owner, *self._args, *hook_args)


class _Plugs:
    """The collector's hooks, registered once through torch's API and then taken out of torch's
    hook dicts (``detach``) and put back (``attach``) by dict operations on the dicts their
    handles refer to: no Python call per hook. A hook whose dict is gone (replaced by someone) is
    registered again. :meth:`remove` removes every hook through its handle (the collector is
    collected)."""

    def __init__(self) -> None:
        self.attached = False
        self._modules: list[tuple[RemovableHandle, Any, tuple]] = []
        self._leaves: dict[int, tuple[RemovableHandle, Any, tuple]] = {}  # by id(parameter)
        self._plugged_leaves: list[tuple[RemovableHandle, Any, tuple]] = []
        self._plugged_ids: set[int] = set()
        self._quiet: dict[int, tuple[RemovableHandle, Any, tuple]] = {}  # plugged, out until woken

    def add_modules(self, handles: list[RemovableHandle]) -> None:
        """Plugs for freshly registered (plugged) module hooks."""
        self._remove(self._modules)
        self._modules = [_plug_of(handle) for handle in handles]
        self.attached = True

    def plug_modules(self) -> bool:
        """Put the module hooks back; ``False`` if there are none yet or a dict is gone."""
        if not self._modules or not _plug_all(self._modules):
            return False
        self.attached = True
        return True

    def add_leaf(self, key: int, handle: RemovableHandle) -> None:
        self._leaves[key] = plug = _plug_of(handle)
        self._plugged_leaves.append(plug)
        self._plugged_ids.add(key)
        self.attached = True

    def plug_leaves(self, params: list[nn.Parameter]) -> tuple[list[nn.Parameter], bool]:
        """Put back the hooks of the parameters that require grad (one loop of dict operations);
        return those that have none yet (or whose dict is gone), and whether one was frozen."""
        missing: list[nn.Parameter] = []
        frozen = False
        plugged, plugged_ids, leaves = self._plugged_leaves, self._plugged_ids, self._leaves
        for param in params:
            key = id(param)
            if not param.requires_grad:
                frozen = True
                continue
            if key in plugged_ids:
                continue
            plug = leaves.get(key)
            hooks = None if plug is None else plug[0].hooks_dict_ref()
            if hooks is None:
                missing.append(param)
                continue
            hooks[plug[0].id] = plug[1]
            plugged.append(plug)
            plugged_ids.add(key)
        if params:
            self.attached = True
        return missing, frozen

    def plugged(self, key: int) -> bool:
        return key in self._plugged_ids

    def quiet_leaves(self, keys: Iterable[int]) -> None:
        """Take the plugged leaf hooks of these parameters (by id) out of torch's dicts, until
        :meth:`wake_leaves` (or :meth:`unplug`)."""
        leaves, quiet = self._leaves, self._quiet
        for key in self._plugged_ids.intersection(keys).difference(quiet):
            quiet[key] = plug = leaves[key]
            hooks = plug[0].hooks_dict_ref()
            if hooks is not None:
                hooks.pop(plug[0].id, None)

    def wake_leaves(self) -> None:
        """Put the quieted leaf hooks back."""
        if self._quiet:
            _plug_all(self._quiet.values())
            self._quiet.clear()

    def unplug(self) -> None:
        """Take every hook out of torch's dicts (they stay registered here)."""
        self.attached = False
        _unplug_all(self._modules)
        _unplug_all(self._plugged_leaves)
        self._plugged_leaves = []
        self._plugged_ids.clear()
        self._quiet.clear()

    def remove(self) -> None:
        """Remove every hook through its handle, for good."""
        self.unplug()
        self._remove(self._modules)
        self._remove(self._leaves.values())
        self._modules, self._leaves = [], {}

    @staticmethod
    def _remove(plugs: Iterable[tuple[RemovableHandle, Any, tuple]]) -> None:
        for handle, _, _ in plugs:
            handle.remove()


def _plug_of(handle: RemovableHandle) -> tuple[RemovableHandle, Any, tuple]:
    """(handle, hook, the flag dicts holding its id: with_kwargs, always_call) of a registered hook."""
    key = handle.id
    hooks = handle.hooks_dict_ref()
    flags = tuple(ref for ref in handle.extra_dict_ref if key in (ref() or ()))
    return handle, hooks[key], flags


def _plug_all(plugs: Iterable[tuple[RemovableHandle, Any, tuple]]) -> bool:
    """Put the hooks back into their dicts (with their flags); ``False`` if a dict is gone."""
    for handle, hook, flags in plugs:
        hooks = handle.hooks_dict_ref()
        if hooks is None:
            return False
        key = handle.id
        hooks[key] = hook
        for ref in flags:
            flag_dict = ref()
            if flag_dict is not None:
                flag_dict[key] = True
    return True


def _unplug_all(plugs: Iterable[tuple[RemovableHandle, Any, tuple]]) -> None:
    for handle, _, flags in plugs:
        key = handle.id
        hooks = handle.hooks_dict_ref()
        if hooks is not None:
            hooks.pop(key, None)
        for ref in flags:
            flag_dict = ref()
            if flag_dict is not None:
                flag_dict.pop(key, None)


_OUTPUT_HOOK_KEY = -1
"""The key of the collector's hook in a module output's hook dict (a handle's id is never negative)."""


def _register_grad_hook(tensor: Tensor, hook: Callable[[Tensor], None]) -> None:
    """``tensor.register_hook(hook)`` for a captured output, without that method's Python frames
    (four a layer) where the tensor is a plain tensor with a node and no hook yet: what the method
    does then — a fresh hook dict handed to the tensor's node — without the removable handle, which
    nobody needs (the hook goes with the step's graph)."""
    if type(tensor) is Tensor and tensor._backward_hooks is None and tensor.grad_fn is not None:
        tensor._backward_hooks = hooks = OrderedDict()
        tensor.grad_fn._register_hook_dict(tensor)
        hooks[_OUTPUT_HOOK_KEY] = hook
    else:
        tensor.register_hook(hook)


def _requires_grad(output: Any) -> bool:
    if isinstance(output, Tensor):
        return output.requires_grad
    return any(isinstance(leaf, Tensor) and leaf.requires_grad for leaf in output_leaves(output))


def _hook_output_grads(output: Any, callback: Callable[[Any], None]) -> Any:
    """``callback(grad)`` for a tensor output. For several outputs that require grad, they pass
    through one identity node whose backward calls ``callback(grads)`` once, one entry per output
    leaf (``None`` where none arrived), with only the gradient from outside the module (a tensor
    hook would also count paths from one output through another, e.g. h → tanh(h)); the output
    made of the node's results is returned, to replace the module's."""
    if isinstance(output, Tensor):
        _register_grad_hook(output, callback)
        return None
    leaves, spec = tree_flatten(output)
    hooked = [k for k, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf.requires_grad]
    if len(hooked) == 1:
        _register_grad_hook(leaves[hooked[0]], callback)
        return None

    count = len(leaves)  # not the list itself: it ends up holding the node's own outputs (a cycle)

    def join(grads: Sequence[Tensor | None]) -> None:
        joined: list[Tensor | None] = [None] * count
        for k, g in zip(hooked, grads):
            joined[k] = g
        callback(tuple(joined))

    for k, leaf in zip(hooked, _JoinOutputs.apply(join, *(leaves[k] for k in hooked))):
        leaves[k] = leaf
    return tree_unflatten(leaves, spec)


class _JoinOutputs(torch.autograd.Function):
    """Identity on a module's outputs whose backward hands their gradients to a callback."""

    @staticmethod
    def forward(ctx: Any, callback: Callable[[Sequence[Tensor | None]], None], *tensors: Tensor) -> tuple:
        ctx.callback = callback
        ctx.set_materialize_grads(False)
        return tensors

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple:
        ctx.callback(grads)
        return (None, *grads)


def _checked_rules(rules: Any) -> dict[type[nn.Module], GramRule | None]:
    if rules is None:
        return {}
    if not isinstance(rules, Mapping) or not all(
        isinstance(t, type) and issubclass(t, nn.Module) and (r is None or isinstance(r, GramRule))
        for t, r in rules.items()
    ):
        raise TypeError(
            f"rules must map torch.nn.Module subclasses to GramRule (or None for no rule), got {rules!r}"
        )
    return dict(rules)


def _groupable_conv(factor: ConvFactor) -> bool:
    """A convolution whose per-sample gradients may wait for those of the same-shaped ones: small
    operands (at most ``GROUP_MAX_ENTRIES`` entries each)."""
    return factor.inputs.numel() <= GROUP_MAX_ENTRIES and factor.backprops.numel() <= GROUP_MAX_ENTRIES


def _conv_group_key(factor: ConvFactor) -> tuple:
    """What convolutions computed together must share: operand shapes, dtypes, device, geometry."""
    layer, inputs = factor.layer, factor.inputs
    return (
        ConvFactor, type(layer), inputs.shape, factor.backprops.shape, inputs.dtype, factor.backprops.dtype,
        factor.dtype, inputs.device, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
        layer.groups, layer.padding_mode, layer.transposed,
    )  # fmt: skip


_SHAPED_FACTORS = (OuterFactor, ConvFactor, EmbeddingFactor)
"""Factors whose method costs depend on nothing but their type, their layer and the shapes of their
first two fields (tensors)."""


def _choose_method(factor: GradFactor, method: str) -> str:
    """The forced method where the factor has it, else the one with fewer multiply-adds."""
    if not hasattr(factor, "ghost_gram"):
        return "materialize"
    if method != "auto":
        return method
    costs = factor.costs()
    return "ghost" if costs.ghost < costs.materialize else "materialize"


GROUP_MAX_ENTRIES = 2**16
"""Normalisation layers and materialised convolutions whose operands have at most this many
entries (small maps and batches: a host-bound step) have their blocks computed when G is read,
together with the layers of the same shape (one batched computation); larger ones at their
backward, so no large activation is held longer."""

SYMMETRIC_MIN_BATCH = 64

SYMMETRIC_MIN_ENTRIES = 1024
"""From this batch size and this many entries per row on, ``_gram`` computes only the upper
block triangle (below, the three products cost more than the multiply-adds they save)."""

GRAM_SPLITS = 4
"""Rows (B, P) with P divisible by this are split into this many column blocks for ``_gram``."""


def _gram(rows: Tensor) -> Tensor:
    """G = Σ_n R_n R_nᵀ for rows split into column blocks R_n, (n, B, P_n) (on CPU, 2-D rows (B, P)
    are viewed so, ``GRAM_SPLITS`` blocks): one batched product, whose independent blocks keep
    every thread busy, then a sum. With 3/4 of the multiply-adds: the rows split into halves R₀, R₁,
    the top half of G is R₀ Rᵀ, the bottom right R₁ R₁ᵀ, the bottom left (R₀ R₁ᵀ)ᵀ (G is symmetric).
    Below ``SYMMETRIC_MIN_BATCH`` rows or ``SYMMETRIC_MIN_ENTRIES`` entries, and off the CPU
    (where extra kernel launches cost more than the multiply-adds saved), one product; 2-D rows
    that would not be split for the threads' sake (off the CPU, or one thread) then go through one
    plain matrix product, without views."""
    cpu = rows.device.type == "cpu"
    if rows.dim() == 2 and not (cpu and torch.get_num_threads() > 1) and not _symmetric(rows, cpu):
        return torch.mm(rows, rows.t())
    if rows.dim() == 2 and cpu and rows.shape[1] % GRAM_SPLITS == 0:
        rows = rows.view(rows.shape[0], GRAM_SPLITS, -1).transpose(0, 1)
    elif rows.dim() == 2:
        rows = rows[None]
    splits, batch, entries = rows.shape
    if not _symmetric(rows, cpu):
        return torch.bmm(rows, rows.transpose(1, 2)).sum(0) if splits > 1 else rows[0] @ rows[0].T
    half = batch // 2
    gram = rows.new_empty(batch, batch)
    gram[:half] = torch.bmm(rows[:, :half], rows.transpose(1, 2)).sum(0)
    gram[half:, half:] = torch.bmm(rows[:, half:], rows[:, half:].transpose(1, 2)).sum(0)
    gram[half:, :half] = gram[:half, half:].T
    return gram


def _symmetric(rows: Tensor, cpu: bool) -> bool:
    """Whether ``_gram`` computes only the upper block triangle of the rows' Gram."""
    batch = rows.shape[-2]  # rows (B, P) or (n, B, P_n): P entries per sample either way
    return cpu and batch >= SYMMETRIC_MIN_BATCH and rows.numel() >= SYMMETRIC_MIN_ENTRIES * batch


def _rows(factor: GradFactor) -> Tensor:
    """Per-sample gradients, flattened: the factor's own ``rows()`` where it has one ((B, P), entries
    in an order of its choosing, the same for every sample, or (n, B, P_n) split into column
    blocks), else ``per_sample()`` reshaped to (B, P)."""
    rows = getattr(factor, "rows", None)
    if rows is not None:
        return rows()
    grads = factor.per_sample()
    return grads.reshape(grads.shape[0], -1)


def _param_name(layer: _Layer, name: str) -> str:
    return f"{layer.name}.{name}" if layer.name else name


def _selected_params(model: nn.Module, params: Iterable[nn.Parameter] | None) -> set[nn.Parameter]:
    """The candidates: ``params``, or every parameter (the trainable ones are read at capture)."""
    if params is None:
        return set(model.parameters())
    selected = set(params)
    if not all(isinstance(p, nn.Parameter) for p in selected):
        raise TypeError("params must be an iterable of torch.nn.Parameter")
    return selected


def _select_layers(
    model: nn.Module,
    params: set[nn.Parameter],
    modules: Callable[[str, nn.Module], bool] | None,
    unsupported: str,
    fallback: bool = True,
    rules: Mapping[type[nn.Module], GramRule | None] | None = None,
) -> list[_Layer]:
    """One capture state per module owning selected parameters (with those of its subtree for a
    composite rule or a unit measured whole, whose descendants are then not captured on their
    own); modules without a rule get the fallback, or raise or warn; modules refused in training
    mode (:func:`.units.training_refusal`) are left out with ``unsupported="skip"``."""
    layers: list[_Layer] = []
    missing: list[str] = []
    claimed: set[nn.Module] = set()
    for name, module in model.named_modules():
        if module in claimed:
            continue
        rule = _rule_for(module, rules, fallback)
        if fallback and (rule is None or rule is FALLBACK_RULE) and is_unit(module):
            rule = UNIT_RULE
        composite = rule is not None and rule.composite
        if composite:
            claimed.update(module.modules())
        own = {n: p for n, p in module.named_parameters(recurse=composite) if p in params}
        if not own or (modules is not None and not modules(name, module)):
            continue
        uncovered = [p for p in own if rule is None or not rule.covers(p)]
        if uncovered and fallback and not composite:
            rule, uncovered = FALLBACK_RULE, []
        refusal = training_refusal(module) if rule is not None else None
        if refusal is not None and unsupported == "skip":
            claimed.update(module.modules())
            missing.append(f"{name or '<root>'} ({type(module).__name__}: {refusal} in training mode)")
            continue
        if uncovered:
            if any(own[p].requires_grad for p in uncovered):  # frozen ones: checked if unfrozen
                missing.append(f"{name or '<root>'} ({type(module).__name__}: {', '.join(uncovered)})")
            continue
        if refusal is not None:
            rule = rule._replace(capture=_refusing_capture(rule.capture, name or "<root>", refusal))
        layers.append(_Layer(name, module, rule, own))
    if missing and unsupported == "raise":
        raise ValueError(
            "GramCollector has no rule for these parameterised modules: "
            + "; ".join(missing)
            + ". Register one with lightning_tricks.gradients.register_gram_rule, "
            "leave them out with exclude=[...] (module names), pass fallback=True or unsupported='skip'"
        )
    if missing:
        warnings.warn("GramCollector leaves out of G the parameters of: " + "; ".join(missing), stacklevel=3)
    if not layers:
        raise ValueError("GramCollector found no trainable parameter in a supported module")
    return layers


def _refusing_capture(capture: Callable[..., Any], name: str, refusal: str) -> Callable[..., Any]:
    """``capture`` that first refuses a call in training mode, naming the module and the ways out."""

    def refusing(layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if layer.training:
            raise ValueError(
                f"{type(layer).__name__} {name!r} has {refusal} in training mode; GramCollector cannot "
                "reproduce its dropout masks per sample. Set that dropout to 0, or leave the module out of "
                f"the measurement: exclude=[{name!r}] (GramCollector, FisherSpectrum), or "
                "unsupported='skip' to leave out every module refused so"
            )
        return capture(layer, args, kwargs, output)

    return refusing


def _check_not_compiled(model: nn.Module, candidates: set[nn.Parameter]) -> None:
    """Refuse compiled modules owning measured parameters (:func:`.units.compiled_modules`)."""
    names = dict(model.named_modules())
    compiled = [
        name
        for name in compiled_modules(model)
        if any(p in candidates for p in names["" if name == "<root>" else name].parameters())
    ]
    if compiled:
        raise ValueError(
            f"GramCollector cannot measure modules compiled with torch.compile: {compiled}. A compiled "
            "forward runs a cached graph without the collector's module hooks, so per-sample gradients "
            "cannot be captured (and measuring through the uncompiled module would change the numerics "
            "that train). Measure the uncompiled model (compile it after the diagnostic run)."
            + _exclude_hint(compiled)
        )


def _exclude_hint(names: list[str]) -> str:
    """`` Or leave them out of the measurement: exclude=[...]`` for the named submodules (not the root)."""
    names = [name for name in names if name != "<root>"]
    if not names:
        return ""
    return f" Or leave them out of the measurement: exclude={names} (GramCollector, FisherSpectrum)"


def _rule_for(
    module: nn.Module, rules: Mapping[type[nn.Module], GramRule | None] | None, fallback: bool
) -> GramRule | None:
    """The module's rule (``rules`` first, then the registry, by type hierarchy), else the
    fallback if allowed and the module owns parameters."""
    rule = gram_rule_for(module, rules)
    if rule is None and fallback and next(module.parameters(recurse=False), None) is not None:
        return FALLBACK_RULE
    return rule


def _share_tied_params(layers: list[_Layer]) -> dict[nn.Parameter, list[tuple[_Layer, str]]]:
    """Owners of each candidate; a parameter of several layers moves to their ``shared``."""
    owners: dict[nn.Parameter, list[tuple[_Layer, str]]] = {}
    for layer in layers:
        for name, param in layer.candidates.items():
            owners.setdefault(param, []).append((layer, name))
    for owned in owners.values():
        if len(owned) > 1:
            for layer, name in owned:
                layer.shared[name] = layer.candidates.pop(name)
                del layer.params[name]
    return owners


def _frozen_unmeasured(
    model: nn.Module,
    candidates: set[nn.Parameter],
    modules: Callable[[str, nn.Module], bool] | None,
    owners: dict[nn.Parameter, list[tuple[_Layer, str]]],
) -> dict[nn.Parameter, str]:
    """Frozen candidates of selected modules that no rule covers (they must stay frozen)."""
    unmeasured: dict[nn.Parameter, str] = {}
    for name, module in model.named_modules():
        if modules is not None and not modules(name, module):
            continue
        for pname, param in module.named_parameters(recurse=False):
            if param in candidates and param not in owners and not param.requires_grad:
                unmeasured[param] = f"{name}.{pname}" if name else pname
    return unmeasured
