"""Per-layer gradient statistics: the "gradient flow" of seed ``001_0184062a2e770d9a.txt``.

Seed 001 (§2, Fig. 1–2) diagnoses vanishing gradients by plotting, for every layer in depth
order, the mean absolute value of the loss gradient over the layer's parameters. This module is
the pure-torch engine behind :class:`lightning_tricks.callbacks.gradient_flow.GradientFlow`:

- :func:`find_layers` groups parameters into layers (every module that owns parameters directly,
  weights and biases together, or weights only with ``include_bias=False``, seed 001's quantity);
- :class:`LayerFilter` keeps the layers a user asks for (name regexes or module types);
- :func:`first_uses` and :func:`sort_by_first_use` put layers in the order the forward pass first
  used their parameters (read off the autograd graph), :class:`ForwardOrderRecorder` and
  :func:`sort_by_forward_order` in the order their modules first ran (for layers the graph
  does not reach);
- :class:`LayerGradientStats` computes, in a constant number of batched passes over all gradients
  (``torch._foreach_norm``) and without a host synchronisation, per layer the mean ``|g|``, the L2
  norm and the max ``|g|``, plus the global gradient norm.
"""

from __future__ import annotations

import importlib
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .autograd_graph import leaf_uses

ROOT_NAME = "<root>"
MAX_CACHED_PLANS = 32
LayerPattern = str | type
LayerPatterns = LayerPattern | Sequence[LayerPattern] | None


@dataclass(frozen=True)
class Layer:
    """A module that owns parameters directly, with those parameters (weight and bias together).

    Attributes:
        name: qualified name of the module in the model (``"<root>"`` for the model itself).
        module: the module.
        parameters: the parameters it owns directly, in registration order.
    """

    name: str
    module: nn.Module
    parameters: tuple[nn.Parameter, ...]


def is_bias(parameter_name: str) -> bool:
    """Whether a parameter registered as ``parameter_name`` is a bias: ``"bias"`` is one of its
    ``_``-separated words (``bias``, ``in_proj_bias``, ``bias_hh_l0``, ``bias_k``)."""
    return "bias" in parameter_name.split("_")


def find_layers(
    model: nn.Module, parameters: Iterable[nn.Parameter] | None = None, include_bias: bool = True
) -> list[Layer]:
    """The leaf-most owners of ``model``'s parameters, in registration order.

    A layer is every module that owns at least one parameter directly (``recurse=False``), so a
    ``Conv2d``'s weight and bias form one layer and a container owns only its own parameters. A
    parameter shared by several modules belongs to the first that registers it. With
    ``parameters`` given (e.g. one optimiser's), only those parameters are kept and modules left
    with none are dropped. With ``include_bias=False`` biases (:func:`is_bias`) are left out too:
    a layer is then its weights only, and a module owning only biases is no layer.
    """
    wanted = None if parameters is None else {id(p) for p in parameters}
    assigned: set[int] = set()
    layers = []
    for name, module in model.named_modules():
        owned = []
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in assigned or (wanted is not None and id(param) not in wanted):
                continue
            assigned.add(id(param))
            if include_bias or not is_bias(param_name):
                owned.append(param)
        if owned:
            layers.append(Layer(name or ROOT_NAME, module, tuple(owned)))
    return layers


CLASS_PATH = re.compile(r"^(?:[A-Za-z_]\w*\.)+[A-Z]\w*$")


def _module_type_at(path: str) -> type | None:
    """The ``nn.Module`` subclass at dotted import ``path`` (e.g. ``"torch.nn.Conv2d"``, as a
    YAML config spells a type), or None when ``path`` is not such a path (it is then a regex).
    Only paths whose last part is capitalised, as class names are, are imported."""
    if not CLASS_PATH.match(path):
        return None
    module_name, _, attribute = path.rpartition(".")
    try:
        candidate = getattr(importlib.import_module(module_name), attribute, None)
    except ImportError:
        return None
    return candidate if isinstance(candidate, type) and issubclass(candidate, nn.Module) else None


def _compile_patterns(argument: str, patterns: LayerPatterns) -> tuple[list[re.Pattern], tuple[type, ...]]:
    """Split ``patterns`` into compiled name regexes and module types, validating each item."""
    if patterns is None:
        return [], ()
    items = [patterns] if isinstance(patterns, (str, type)) else patterns
    if not isinstance(items, Sequence):
        raise TypeError(
            f"`{argument}` must be None, a regex string, an nn.Module subclass or a sequence of "
            f"those, got {patterns!r}"
        )
    regexes, types = [], []
    for item in items:
        module_type = _module_type_at(item) if isinstance(item, str) else None
        if module_type is not None:
            types.append(module_type)
        elif isinstance(item, str):
            try:
                regexes.append(re.compile(item))
            except re.error as err:
                raise ValueError(f"`{argument}` has an invalid regex {item!r}: {err}") from err
        elif isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        else:
            raise TypeError(f"`{argument}` items must be regex strings or nn.Module subclasses, got {item!r}")
    return regexes, tuple(types)


class LayerFilter:
    """Keeps layers matching ``include`` (all when None) and not matching ``exclude``.

    A layer matches a pattern list when ``re.search`` finds one regex in its qualified name or its
    module is an instance of one of the types. A string that is the import path of an ``nn.Module``
    subclass (``"torch.nn.Conv2d"``, the way a LightningCLI YAML file names a type) is that type.

    Args:
        include: None, a regex string, an ``nn.Module`` subclass, or a sequence of those.
        exclude: same forms as ``include``.

    Raises:
        TypeError: a pattern is neither a string nor an ``nn.Module`` subclass.
        ValueError: a string is not a valid regular expression.
    """

    def __init__(self, include: LayerPatterns = None, exclude: LayerPatterns = None) -> None:
        self._include_all = include is None
        self._include = _compile_patterns("include", include)
        self._exclude = _compile_patterns("exclude", exclude)

    @staticmethod
    def _matches(layer: Layer, patterns: tuple[list[re.Pattern], tuple[type, ...]]) -> bool:
        regexes, types = patterns
        return isinstance(layer.module, types) or any(r.search(layer.name) for r in regexes)

    def __call__(self, layer: Layer) -> bool:
        included = self._include_all or self._matches(layer, self._include)
        return included and not self._matches(layer, self._exclude)


class ForwardOrderRecorder:
    """Records the order in which named modules first run, with forward pre-hooks.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> recorder = ForwardOrderRecorder()
        >>> recorder.start(net.named_children())
        >>> _ = net(torch.zeros(1, 2))
        >>> recorder.stop()
        >>> recorder.order
        ['0', '1']
    """

    def __init__(self) -> None:
        self.order: list[str] = []
        self._seen: set[str] = set()
        self._handles: list[RemovableHandle] = []

    def start(self, named_modules: Iterable[tuple[str, nn.Module]]) -> None:
        """Hook every module; a module's name is recorded the first time it is called."""
        for name, module in named_modules:
            self._handles.append(module.register_forward_pre_hook(partial(self._record, name)))

    def _record(self, name: str, module: nn.Module, args: tuple) -> None:
        if name not in self._seen:
            self._seen.add(name)
            self.order.append(name)

    def stop(self) -> None:
        """Remove all hooks; the recorded order is kept."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def recording(self) -> bool:
        return bool(self._handles)


def sort_by_forward_order(layers: Sequence[Layer], order: Sequence[str]) -> list[Layer]:
    """Layers in the order their names appear in ``order``; layers not in it follow, in their
    given (registration) order."""
    rank = {name: i for i, name in enumerate(order)}
    seen = sorted((layer for layer in layers if layer.name in rank), key=lambda layer: rank[layer.name])
    return seen + [layer for layer in layers if layer.name not in rank]


def first_uses(loss: Tensor) -> dict[int, int]:
    """``{id(leaf): n}`` for every leaf tensor a backward from ``loss`` reaches, ``n`` the autograd
    sequence number of the first forward op that used it (sequence numbers grow with each op
    recorded, so they give the order in which the forward used the parameters, also where a
    module uses a child's weight functionally, as ``nn.MultiheadAttention`` does ``out_proj``'s).
    Walks the graph once, visiting each node once; reads it only."""
    uses: dict[int, int] = {}
    for node, leaf in leaf_uses(loss):
        number = node._sequence_nr()
        uses[id(leaf)] = min(uses.get(id(leaf), number), number)
    return uses


def sort_by_first_use(layers: Sequence[Layer], uses: dict[int, int], order: Sequence[str]) -> list[Layer]:
    """Layers in the order the forward first used one of their parameters (``uses`` from
    :func:`first_uses`). A layer none of whose parameters was reached (frozen then) but whose
    module ran (``order``, :class:`ForwardOrderRecorder`'s) goes before the first reached layer
    that ran after it; the others follow in registration order."""
    first = {
        layer.name: min((uses[id(p)] for p in layer.parameters if id(p) in uses), default=None)
        for layer in layers
    }
    rank = {name: i for i, name in enumerate(order)}
    reached = [layer for layer in layers if first[layer.name] is not None]
    reached.sort(key=lambda layer: first[layer.name])
    ran = [layer for layer in layers if first[layer.name] is None and layer.name in rank]
    waiting = deque(sorted(ran, key=lambda layer: rank[layer.name]))
    ordered = []
    for layer in reached:
        while waiting and layer.name in rank and rank[waiting[0].name] < rank[layer.name]:
            ordered.append(waiting.popleft())
        ordered.append(layer)
    unseen = [layer for layer in layers if first[layer.name] is None and layer.name not in rank]
    return ordered + list(waiting) + unseen


class GradientStats(NamedTuple):
    """Per-layer statistics of gradients, all on the gradients' device; ``(L,)`` for one gradient,
    ``(W, L)`` for a window of W (:meth:`LayerGradientStats.reduce`).

    Attributes:
        mean_abs: ``(..., L)`` mean ``|g|`` over each layer's parameters (0 where ``present`` is False).
        l2: ``(..., L)`` L2 norm of each layer's gradient.
        max_abs: ``(..., L)`` max ``|g|`` in each layer.
        present: ``(L,)`` bool, whether any parameter of the layer has a gradient.
        global_norm: ``(...)`` L2 norm of the whole gradient (selected layers and other parameters).
        last_present: index of the deepest layer with a gradient (-1 when none has one).
    """

    mean_abs: Tensor
    l2: Tensor
    max_abs: Tensor
    present: Tensor
    global_norm: Tensor
    last_present: int


class Gradients(NamedTuple):
    """The ``.grad`` fields present at one step: their positions among the parameters, the
    tensors, the dtype and device the norms are computed in and kept on, and whether one
    ``torch._foreach_norm`` takes them all (dense, on one device)."""

    present: tuple[int, ...]
    grads: list[Tensor]
    dtype: torch.dtype
    device: torch.device
    fused: bool


class _Plan(NamedTuple):
    """Index tensors for one set of present gradients: owner bin of each, elements per layer."""

    owner: Tensor
    layer_numel: Tensor
    present: Tensor
    last_present: int


class LayerGradientStats:
    """Batched per-layer gradient statistics (seed ``001_0184062a2e770d9a.txt`` §2, Fig. 1–2).

    For layer ℓ with parameters θ_ℓ and gradient g = ∂L/∂θ (the ``.grad`` fields),

    - ``mean_abs[ℓ] = Σ_{θ∈θ_ℓ} Σ_i |g_i| / Σ_{θ∈θ_ℓ} numel(θ)`` — seed 001's "mean absolute value
      of the gradient" of a layer, over the parameters the layer is given (weights only from
      ``find_layers(..., include_bias=False)``, as the seed's §2; weights and biases pooled otherwise);
    - ``l2[ℓ] = sqrt(Σ_{θ∈θ_ℓ} ‖g_θ‖²)``, ``max_abs[ℓ] = max_{θ∈θ_ℓ} ‖g_θ‖_∞``;
    - ``global_norm = sqrt(Σ_θ ‖g_θ‖²)`` over the layers' and ``other_parameters``' gradients
      (the norm that ``clip_grad_norm_`` clips).

    Two stages, so that a training step costs a constant number of device ops whatever the number
    of layers: :meth:`norms` gives every gradient's ``‖g‖₁, ‖g‖₂, ‖g‖_∞`` (one
    ``torch._foreach_norm`` per order and one ``stack``, optionally into a caller's buffer row);
    :meth:`reduce` turns a window of such rows into the per-layer statistics (one scatter per
    statistic). Nothing leaves the device. Parameters whose ``.grad`` is None count in no sum; a
    layer with no gradient at all has ``present`` False. Norms accumulate in float32 (float64 when
    a gradient is float64), so half-precision gradients are summed accurately.

    Args:
        layers: the layers, in the order of the output rows.
        other_parameters: further parameters counted only in ``global_norm``.

    Example::

        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> net(torch.randn(8, 3)).sum().backward()
        >>> stats = LayerGradientStats(find_layers(net)).compute()
        >>> stats.mean_abs.shape
        torch.Size([2])
    """

    def __init__(self, layers: Sequence[Layer], other_parameters: Iterable[nn.Parameter] = ()) -> None:
        self.names = [layer.name for layer in layers]
        params = [p for layer in layers for p in layer.parameters]
        owners = [i for i, layer in enumerate(layers) for _ in layer.parameters]
        listed = {id(p) for p in params}
        others = [p for p in dict.fromkeys(other_parameters) if id(p) not in listed]
        self._params = params + others
        self._owners = owners + [len(layers)] * len(others)
        self._everything = tuple(range(len(self._params)))
        self._plans: dict[tuple, _Plan] = {}

    @property
    def num_layers(self) -> int:
        return len(self.names)

    @property
    def num_parameters(self) -> int:
        return len(self._params)

    def gradients(self) -> Gradients | None:
        """The current ``.grad`` fields (None when no parameter has one); host work only."""
        grads = [p.grad for p in self._params]
        missing = [i for i, g in enumerate(grads) if g is None]
        present = self._everything
        if missing:
            present = tuple(sorted(set(present) - set(missing)))
            grads = [grads[i] for i in present]
        if not grads:
            return None
        kinds = {(g.dtype, g.device, g.is_sparse) for g in grads}
        dtype = torch.float64 if torch.float64 in {kind[0] for kind in kinds} else torch.float32
        fused = len({kind[1:] for kind in kinds}) == 1 and not grads[0].is_sparse
        return Gradients(present, grads, dtype, grads[0].device, fused)

    @staticmethod
    def norms(gradients: Gradients, out: Tensor | None = None) -> Tensor:
        """``(3·P,)``: ``‖g‖₁`` of the P present gradients, then their ``‖g‖₂``, then ``‖g‖_∞``
        (written into ``out`` when given): a ``torch._foreach_norm`` per order and one ``stack``;
        on the CPU ``‖g‖_∞`` is ``_foreach_max`` of ``_foreach_abs`` (the same values, 5x faster
        there than the ∞-norm, for a transient copy of the gradients)."""
        grads, dtype, device = gradients.grads, gradients.dtype, gradients.device
        if not gradients.fused:
            return _per_tensor_norms(grads, dtype, device, out)
        l1 = torch._foreach_norm(grads, 1, dtype=dtype)
        l2 = torch._foreach_norm(grads, 2, dtype=dtype)
        if device.type == "cpu" and hasattr(torch, "_foreach_max"):  # torch >= 2.4
            linf = torch._foreach_max(torch._foreach_abs(grads))
        else:
            linf = torch._foreach_norm(grads, float("inf"), dtype=dtype)
        return torch.stack([*l1, *l2, *linf], out=out)

    def reduce(self, norms: Tensor, present: tuple[int, ...]) -> GradientStats:
        """The per-layer statistics of a window of W steps from their :meth:`norms` rows ``(W, 3·P)``
        (the same ``present`` gradients at every step): ``(W, L)`` statistics, ``(W,)`` global norm."""
        plan = self._plan(present, norms.device)
        steps, num_bins = norms.shape[0], self.num_layers + 1
        l1, l2, linf = norms.view(steps, 3, -1).unbind(1)
        sum_abs = norms.new_zeros(steps, num_bins).index_add_(1, plan.owner, l1)
        sum_sq = norms.new_zeros(steps, num_bins).index_add_(1, plan.owner, l2 * l2)
        owner = plan.owner.expand(steps, -1)
        max_abs = norms.new_zeros(steps, num_bins).scatter_reduce_(1, owner, linf, reduce="amax")
        return GradientStats(
            mean_abs=sum_abs[:, :-1] / plan.layer_numel.to(norms.dtype).clamp_min(1.0),
            l2=sum_sq[:, :-1].sqrt(),
            max_abs=max_abs[:, :-1],
            present=plan.present,
            global_norm=sum_sq.sum(1).sqrt(),
            last_present=plan.last_present,
        )

    def compute(self) -> GradientStats | None:
        """The ``(L,)`` statistics of the current ``.grad`` fields, or None when no parameter has one."""
        gradients = self.gradients()
        if gradients is None:
            return None
        window = self.reduce(self.norms(gradients).view(1, -1), gradients.present)
        return window._replace(
            mean_abs=window.mean_abs[0],
            l2=window.l2[0],
            max_abs=window.max_abs[0],
            global_norm=window.global_norm[0],
        )

    def _plan(self, present: tuple[int, ...], device: torch.device) -> _Plan:
        """Owner index and per-layer element count for the gradients at ``present`` (cached; the
        cache is emptied when it holds ``MAX_CACHED_PLANS``, e.g. under stochastic depth)."""
        key = (present, device)
        if key not in self._plans:
            if len(self._plans) >= MAX_CACHED_PLANS:
                self._plans.clear()
            num_bins = self.num_layers + 1
            owner = [self._owners[i] for i in present]
            numel = [0] * num_bins
            for i, bin_index in zip(present, owner, strict=True):
                numel[bin_index] += self._params[i].numel()
            layer_numel = torch.tensor(numel[:-1], dtype=torch.long, device=device)
            self._plans[key] = _Plan(
                owner=torch.tensor(owner, dtype=torch.long, device=device),
                layer_numel=layer_numel,
                present=layer_numel > 0,
                last_present=max((i for i, n in enumerate(numel[:-1]) if n > 0), default=-1),
            )
        return self._plans[key]


def _per_tensor_norms(
    grads: list[Tensor], dtype: torch.dtype, device: torch.device, out: Tensor | None
) -> Tensor:
    """:meth:`LayerGradientStats.norms` for sparse gradients or gradients on several devices: one
    norm per tensor and order, each brought to ``device``."""
    dense = [g.coalesce().values() if g.is_sparse else g for g in grads]
    norms = [
        torch.linalg.vector_norm(g, order, dtype=dtype).to(device)
        for order in (1, 2, float("inf"))
        for g in dense
    ]
    return torch.stack(norms, out=out)
