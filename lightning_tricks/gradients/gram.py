"""Exact Gram matrix of per-sample gradients from the training step's own backward (seed 004 §3, eq. 6).

Seed 004_e5d92837cb57ce8a.txt characterises training by the spectrum of F̃_k = J_kᵀ J_k (B×B), where
column i of J_k is sample i's loss gradient over all trainable parameters (§3, eq. 6), and builds it
layer by layer, F̃_k = Σ_l J_(k,l)ᵀ J_(k,l) (§4). The authors looped over samples inside modified
Torch/cuDNN layers and could afford it every 50 mini-batches; :class:`GramCollector` gets the same
matrix exactly from the activations and output gradients of one ordinary batched forward/backward.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .gram_rules import GradFactor, GramRule, concat_factors, gram_rule_for

LOSS_REDUCTIONS = ("mean", "sum")
METHODS = ("auto", "ghost", "materialize")
UNSUPPORTED_POLICIES = ("raise", "skip")


@dataclass
class _Call:
    """One captured forward of a layer: what its rule's capture kept, the input and its version
    then, and the weights hidden from autograd for it (whose batch gradient the collector writes)."""

    activations: Any
    inputs: Tensor
    version: int
    fused: tuple[str, ...]


@dataclass
class _Layer:
    """Capture state of one parameterised module."""

    name: str
    module: nn.Module
    rule: GramRule
    params: dict[str, nn.Parameter]
    pending: int = 0
    calls: int = 0
    factors: list[dict[str, GradFactor]] = field(default_factory=list)
    hidden: tuple[str, ...] = ()
    methods: dict[str, str] = field(default_factory=dict)

    def clear(self) -> None:
        self.pending, self.calls, self.hidden = 0, 0, ()
        self.factors.clear()
        self.methods.clear()


class GramCollector:
    """Exact B×B Gram matrix of per-sample gradients, G[i, j] = ⟨∇ℓ_i, ∇ℓ_j⟩, from one backward.

    G is seed 004's approximate Fisher matrix F̃_k = J_kᵀ J_k (``004_e5d92837cb57ce8a.txt`` §3,
    eq. 6), computed as Σ_l J_(k,l)ᵀ J_(k,l) over layers l (§4). Hooks capture each parameterised
    layer's input in the forward and its output gradient in the ordinary backward; a per-layer
    rule (:mod:`~lightning_tricks.gradients.gram_rules`) turns the two into that layer's (B, B)
    contribution, inside the backward, so per-sample gradients of more than one layer are never
    held. There is no second backward and no loop over samples. Per layer and parameter the
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

    Supported layers (exact type; register more with
    :func:`~lightning_tricks.gradients.gram_rules.register_gram_rule`): Linear (any leading
    dims), Conv1d/2d/3d and ConvTranspose1d/2d/3d (stride, padding incl. ``"same"`` and padding
    modes, dilation, groups, bias), BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d, GroupNorm, LayerNorm,
    RMSNorm, Embedding (``padding_idx``, ``scale_grad_by_freq``). The batch dimension must come
    first in every captured layer's input.

    Several forwards of one module in a collection (weight sharing, siamese branches) are handled
    exactly: that module's per-sample gradients are the sums over its calls, cross terms included;
    all forwards of a collection are treated as parts of the same B samples. A forward after a
    module's backward was completed is refused (call :meth:`reset` between steps, e.g. between
    accumulated micro-batches; activation checkpointing, which re-runs forwards inside the
    backward, is not supported). A parameter registered in two modules is refused at construction;
    one that receives a gradient while its module's forward was not captured (used functionally
    outside its module) makes :meth:`matrix` raise instead of returning a matrix without it.

    Fused weight gradients (``fuse_weight_grad``): during a captured forward the weights of Linear,
    ConvNd and ConvTransposeNd layers whose input requires grad are set to ``requires_grad=False``, so autograd
    skips their weight-gradient kernels; the collector writes ``param.grad`` itself (``+=``, or a
    new tensor where it is ``None``) with the very kernel autograd would have called (same op,
    operands and layout), and restores ``requires_grad`` when that layer's backward is done (at the
    latest at :meth:`matrix`, :meth:`reset`, ``enabled = False`` or :meth:`detach`). ``.grad`` is
    bit-for-bit autograd's (``tests/test_gram_fused.py``). It must be off when something else needs autograd's own gradient of those weights:
    DistributedDataParallel's reducer (``"auto"`` switches it off when ``torch.distributed`` runs
    with more than one process), ``register_post_accumulate_grad_hook`` users, or a weight used
    outside its module's forward (functional weight tying).

    Accumulation and precision: each layer's (B, B) block is computed in the promoted dtype of its
    activations and gradients (at least float32; float16/bfloat16 are upcast) and cast once to
    float64, where the blocks are stored and summed, on the model's device; nothing syncs with the
    host. G is that of the loss actually backpropagated: with a gradient scaler (16-bit AMP) divide
    it by the scale squared.

    Args:
        model: the module whose parameters' per-sample gradients are wanted.
        loss_reduction: ``"mean"`` if the backpropagated loss is (1/B)·Σ_i ℓ_i, ``"sum"`` if Σ_i ℓ_i.
        params: restrict to these parameters (default: all with ``requires_grad``).
        modules: restrict to parameters of modules for which ``modules(name, module)`` is true.
        method: ``"auto"`` (cheaper per layer), ``"ghost"`` or ``"materialize"`` forced where the
            layer has that form (normalisation layers and biases are always materialised).
        fuse_weight_grad: ``True``, ``False`` or ``"auto"`` (on unless ``torch.distributed`` is
            initialised with world size > 1); see above.
        unsupported: ``"raise"`` on selected parameters whose module has no rule (one error listing
            them all) or ``"skip"`` them with one warning, leaving them out of G.

    Raises:
        ValueError: bad argument values, unsupported layers with ``unsupported="raise"``, a
            parameter registered in two modules, or no parameter selected.
        TypeError: ``model`` not a module, ``params`` not parameters, ``modules`` not callable.
        RuntimeError: from :meth:`matrix` if no backward was captured; in the backward if a layer's
            input was modified in place, the batch size differs between layers, or a module runs
            again after its contribution was completed.

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

        # from a callback: attach once, capture only on measured steps
        collector = GramCollector(model).attach()
        collector.enabled = False
        ...                                    # unmeasured steps: hooks return at once
        collector.reset()
        collector.enabled = True
        torch.nn.functional.cross_entropy(model(x), y).backward()
        collector.enabled = False
        eigenvalues = torch.linalg.eigvalsh(collector.matrix())
        collector.detach()
    """

    def __init__(
        self,
        model: nn.Module,
        loss_reduction: str = "mean",
        *,
        params: Iterable[nn.Parameter] | None = None,
        modules: Callable[[str, nn.Module], bool] | None = None,
        method: str = "auto",
        fuse_weight_grad: bool | str = "auto",
        unsupported: str = "raise",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
        _check_choice("method", method, METHODS)
        _check_choice("unsupported", unsupported, UNSUPPORTED_POLICIES)
        if fuse_weight_grad not in (True, False, "auto"):
            raise ValueError(f"fuse_weight_grad must be True, False or 'auto', got {fuse_weight_grad!r}")
        if modules is not None and not callable(modules):
            raise TypeError("modules must be a callable (name, module) -> bool")
        self.model = model
        self.loss_reduction = loss_reduction
        self.method = method
        self.fuse_weight_grad = fuse_weight_grad
        self.unsupported = unsupported
        self._layers = _select_layers(model, _selected_params(model, params), modules, unsupported)
        self._handles: list[RemovableHandle] = []
        self._enabled = True
        self._fuse = False
        self._batch_size: int | None = None
        self._blocks: dict[str, Tensor] = {}
        self._missed: set[str] = set()
        self._hidden: set[nn.Parameter] = set()

    # -- public API ------------------------------------------------------------------------

    def attach(self) -> GramCollector:
        """Register the hooks (idempotent). Capture happens while :attr:`enabled`."""
        if self._handles:
            return self
        self._fuse = self.fuse_weight_grad is True or (self.fuse_weight_grad == "auto" and not _distributed())
        for layer in self._layers:
            module = layer.module
            self._handles.append(
                module.register_forward_pre_hook(partial(self._before_forward, layer), with_kwargs=True)
            )
            self._handles.append(
                module.register_forward_hook(partial(self._after_forward, layer), with_kwargs=True)
            )
            for name, param in layer.params.items():
                self._handles.append(param.register_hook(partial(self._on_param_grad, layer, name)))
        return self

    def detach(self) -> None:
        """Remove the hooks and restore ``requires_grad`` of fused weights; results stay readable."""
        self._restore_requires_grad()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Forget everything captured, to start a new collection (one forward/backward)."""
        self._restore_requires_grad()
        for layer in self._layers:
            layer.clear()
        self._batch_size = None
        self._blocks = {}
        self._missed.clear()

    @property
    def enabled(self) -> bool:
        """Whether forwards are captured; the hooks return at once while ``False``."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        if not self._enabled:
            self._restore_requires_grad()

    @property
    def batch_size(self) -> int | None:
        """B of the current collection, or ``None`` before any captured forward."""
        return self._batch_size

    @property
    def captured(self) -> bool:
        """Whether a backward delivered at least one layer's output gradient since :meth:`reset`."""
        return bool(self._blocks) or any(layer.factors for layer in self._layers)

    @property
    def methods(self) -> dict[str, str]:
        """``"<module>.<param>" -> "ghost" | "materialize"`` chosen in the current collection."""
        return {f"{layer.name}.{p}": m for layer in self._layers for p, m in layer.methods.items()}

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
                "the forward); G would miss their contribution"
            )
        scale = float(self._batch_size) ** 2 if self.loss_reduction == "mean" else 1.0
        blocks = {name: self._blocks[name] * scale for name in self.layer_names if name in self._blocks}
        return blocks if per_layer else torch.stack(list(blocks.values())).sum(0)

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

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    # -- hooks ------------------------------------------------------------------------------

    def _capturing(self) -> bool:
        return self._enabled and torch.is_grad_enabled()

    def _before_forward(self, layer: _Layer, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Fused mode: hide the fusable weights from autograd for this call if its input needs grad
        (else its output might need no grad at all), and show them again otherwise."""
        if not (self._fuse and self._capturing()):
            return
        inputs = _first_input(args, kwargs)
        hide = isinstance(inputs, Tensor) and inputs.requires_grad
        hidden = []
        for name in layer.rule.fusable:
            param = layer.params.get(name)
            if param is None:
                continue
            if hide:
                self._hidden.add(param)
                param.requires_grad_(False)
                hidden.append(name)
            elif param in self._hidden:
                self._hidden.discard(param)
                param.requires_grad_(True)
        layer.hidden = tuple(hidden)

    def _after_forward(
        self, layer: _Layer, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> None:
        """Keep the layer's input and hook its output gradient."""
        hidden, layer.hidden = layer.hidden, ()
        if not self._capturing():
            return
        if layer.pending == 0 and layer.calls > 0:
            raise RuntimeError(
                f"module {layer.name!r} ran forward again after its backward was captured; call "
                "GramCollector.reset() between training steps (e.g. between accumulated micro-batches)"
            )
        inputs = _first_input(args, kwargs)
        if not isinstance(output, Tensor) or not output.requires_grad or not isinstance(inputs, Tensor):
            return
        self._check_batch_size(layer, len(inputs))
        layer.pending += 1
        layer.calls += 1
        call = _Call(layer.rule.capture(module, inputs, output), inputs, inputs._version, hidden)
        output.register_hook(partial(self._on_backprop, layer, call))

    def _on_backprop(self, layer: _Layer, call: _Call, backprops: Tensor) -> None:
        """Turn one call's input and output gradient into factors; finish the layer on its last call."""
        if call.inputs._version != call.version:
            raise RuntimeError(
                f"the input of module {layer.name!r} was modified in place after its forward; "
                "GramCollector needs it unchanged until the backward (avoid in-place ops on it)"
            )
        with torch.no_grad():
            factors = layer.rule.factorize(layer.module, call.activations, backprops)
            factors = {name: factors[name] for name in layer.params}
            layer.factors.append(factors)
            layer.pending -= 1
            several_calls = layer.pending > 0 or len(layer.factors) > 1
            if several_calls:
                self._write_fused_grads(layer, {name: factors[name].batch_gradient() for name in call.fused})
            if layer.pending == 0:
                self._finish_layer(layer, fused=() if several_calls else call.fused)

    def _on_param_grad(self, layer: _Layer, name: str, grad: Tensor) -> None:
        """A parameter got a gradient while its module's forward was not captured: remember it."""
        if self._enabled and layer.calls == 0:
            self._missed.add(f"{layer.name}.{name}" if layer.name else name)

    # -- computation ------------------------------------------------------------------------

    def _finish_layer(self, layer: _Layer, fused: tuple[str, ...]) -> None:
        """G_l = Σ_params Gram of the layer's (combined) factors, and the batch gradients of the
        ``fused`` weights with autograd's own kernels (bit-identical to a plain backward). The
        materialised parameters of a layer share one matmul: [g_i(θ₁), g_i(θ₂), …] stacked per sample."""
        blocks: list[Tensor] = []
        per_sample: list[Tensor] = []
        fused_grads: dict[str, Tensor] = {}
        for name in layer.params:
            factor = concat_factors([factors[name] for factors in layer.factors])
            if name in fused:
                fused_grads[name] = factor.batch_gradient()
            method = _choose_method(factor, self.method)
            layer.methods[name] = method
            if method == "ghost":
                blocks.append(factor.ghost_gram())
            else:
                grads = factor.per_sample()
                per_sample.append(grads.reshape(len(grads), -1))
        if per_sample:
            flat = torch.cat(per_sample, dim=1) if len(per_sample) > 1 else per_sample[0]
            blocks.append(flat @ flat.T)
        layer.factors.clear()
        self._write_fused_grads(layer, fused_grads)
        self._blocks[layer.name] = (blocks[0] if len(blocks) == 1 else torch.stack(blocks).sum(0)).to(
            torch.float64
        )
        self._restore_layer(layer)

    def _finish_pending(self) -> None:
        """Layers with a call whose output got no gradient: finish with the calls that did."""
        for layer in self._layers:
            if layer.factors:
                layer.pending = 0
                self._finish_layer(layer, fused=())
        self._restore_requires_grad()

    @staticmethod
    def _write_fused_grads(layer: _Layer, grads: dict[str, Tensor]) -> None:
        """param.grad += Σ_i g_i (a new tensor where ``.grad`` is None), in the parameter's dtype."""
        for name, grad in grads.items():
            param = layer.params[name]
            grad = grad.to(param.dtype)
            if param.grad is None:
                param.grad = grad.contiguous()
            else:
                param.grad.add_(grad)

    def _restore_layer(self, layer: _Layer) -> None:
        for param in layer.params.values():
            if param in self._hidden:
                self._hidden.discard(param)
                param.requires_grad_(True)

    def _restore_requires_grad(self) -> None:
        for param in self._hidden:
            param.requires_grad_(True)
        self._hidden.clear()

    def _check_batch_size(self, layer: _Layer, batch_size: int) -> None:
        if self._batch_size is None:
            self._batch_size = batch_size
        elif batch_size != self._batch_size:
            raise RuntimeError(
                f"module {layer.name!r} got a batch of {batch_size} samples, other layers {self._batch_size}; "
                "GramCollector needs the batch dimension first in every layer's input"
            )


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _first_input(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _choose_method(factor: GradFactor, method: str) -> str:
    """The forced method where the factor has it, else the one with fewer multiply-adds."""
    if not hasattr(factor, "ghost_gram"):
        return "materialize"
    if method != "auto":
        return method
    costs = factor.costs()
    return "ghost" if costs.ghost < costs.materialize else "materialize"


def _selected_params(model: nn.Module, params: Iterable[nn.Parameter] | None) -> set[nn.Parameter]:
    if params is None:
        return {p for p in model.parameters() if p.requires_grad}
    selected = set(params)
    if not all(isinstance(p, nn.Parameter) for p in selected):
        raise TypeError("params must be an iterable of torch.nn.Parameter")
    return selected


def _select_layers(
    model: nn.Module,
    params: set[nn.Parameter],
    modules: Callable[[str, nn.Module], bool] | None,
    unsupported: str,
) -> list[_Layer]:
    """One capture state per module owning selected parameters; unsupported ones raise or warn."""
    layers: list[_Layer] = []
    owners: dict[nn.Parameter, str] = {}
    missing: list[str] = []
    for name, module in model.named_modules():
        own = {n: p for n, p in module.named_parameters(recurse=False) if p in params}
        if not own or (modules is not None and not modules(name, module)):
            continue
        for pname, param in own.items():
            if param in owners:
                raise ValueError(
                    f"parameter {name}.{pname} is also registered as {owners[param]}; GramCollector cannot "
                    "split a parameter shared between modules (exclude it with params= or modules=)"
                )
            owners[param] = f"{name}.{pname}"
        rule = gram_rule_for(module)
        uncovered = [p for p in own if rule is None or p not in rule.param_names]
        if uncovered:
            missing.append(f"{name or '<root>'} ({type(module).__name__}: {', '.join(uncovered)})")
            continue
        layers.append(_Layer(name, module, rule, own))
    if missing and unsupported == "raise":
        raise ValueError(
            "GramCollector has no rule for these parameterised modules: "
            + "; ".join(missing)
            + ". Register one with lightning_tricks.gradients.gram_rules.register_gram_rule, "
            "exclude them with params=/modules=, or pass unsupported='skip'"
        )
    if missing:
        warnings.warn("GramCollector leaves out of G the parameters of: " + "; ".join(missing), stacklevel=3)
    if not layers:
        raise ValueError("GramCollector found no trainable parameter in a supported module")
    return layers
