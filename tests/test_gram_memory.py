"""GramCollector keeps nothing alive: after the context exits (normally, by an exception, or with no
backward), after ``detach()``, or when an attached collector is dropped, the model, the collector
and what it captured are collectable, and repeated use leaves the number of live tensors flat."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lightning_tricks.gradients import GramCollector

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py: one torch thread


def conv_bn() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )
    return model, torch.randn(4, 3, 6, 6)


def mlp() -> tuple[nn.Module, torch.Tensor]:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), torch.randn(4, 6)


def resnet18() -> tuple[nn.Module, torch.Tensor]:
    return torchvision.models.resnet18(num_classes=3), torch.randn(2, 3, 16, 16)


NETS = {"conv_bn": conv_bn, "mlp": mlp, "resnet18": resnet18}


class Boom(Exception):
    pass


def use(model: nn.Module, x: torch.Tensor, ending: str) -> GramCollector:
    """One collection ending as ``ending`` says; returns the collector (the caller drops it)."""
    y = torch.arange(len(x)) % 3
    gram = GramCollector(model)
    if ending == "detach":
        gram.attach()
        F.cross_entropy(model(x), y).backward()
        gram.matrix()
        gram.detach()
        return gram
    try:
        with gram:
            loss = F.cross_entropy(model(x), y)
            if ending == "exception":
                raise Boom
            if ending == "backward":
                loss.backward()
    except Boom:
        pass
    if ending == "backward":
        gram.matrix()
    return gram


def references(make: Callable[[], tuple[nn.Module, torch.Tensor]], ending: str) -> list[weakref.ref]:
    torch.manual_seed(0)
    model, x = make()
    gram = use(model, x, ending)
    return [weakref.ref(model), weakref.ref(gram)]


@pytest.mark.parametrize("ending", ["backward", "exception", "no_backward", "detach"])
@pytest.mark.parametrize("net", list(NETS))
def test_model_and_collector_are_collectable_after_use(net: str, ending: str) -> None:
    refs = references(NETS[net], ending)
    gc.collect()
    assert [ref() for ref in refs] == [None, None]


def test_attached_collector_dropped_removes_its_hooks() -> None:
    model, x = mlp()
    gram = GramCollector(model).attach()
    ref = weakref.ref(gram)
    del gram
    gc.collect()
    assert ref() is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(not p._backward_hooks for p in model.parameters())
    model(x).sum().backward()  # nothing left to call


def live_tensors() -> int:
    gc.collect()
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


@pytest.mark.parametrize("ending", ["backward", "no_backward", "exception"])
def test_repeated_use_keeps_live_tensors_flat(ending: str) -> None:
    torch.manual_seed(0)
    model, x = conv_bn()
    use(model, x, ending)  # first use: lazily created state (autograd, BatchNorm) settles
    before = live_tensors()
    for _ in range(5):
        use(model, x, ending)
    assert live_tensors() == before


def hooked(model: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()) or any(
        p._backward_hooks for p in model.parameters()
    )


def test_hooks_registered_once_then_put_back_and_taken_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first attach registers the hooks through torch's API; detach takes them out of torch's
    hook dicts and a later attach puts the same hooks back (no new registration), with the same G."""
    torch.manual_seed(0)
    model, x = conv_bn()
    gram = GramCollector(model)
    registrations = []
    init = torch.utils.hooks.RemovableHandle.__init__

    def counting_init(self, *args, **kwargs):
        registrations.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(torch.utils.hooks.RemovableHandle, "__init__", counting_init)
    results = []
    for cycle in range(3):
        before = len(registrations)
        gram.reset()
        gram.attach()
        attached = len(registrations) - before
        assert hooked(model) and gram.attached
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        gram.detach()
        assert not hooked(model) and not gram.attached
        results.append(gram.matrix())
        # forward hooks of 3 layers, 6 parameters (no forward pre-hook)
        expected = 3 + 6 if cycle == 0 else 0
        assert attached == expected, cycle
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    torch.testing.assert_close(results[2], results[0], rtol=0, atol=0)


def test_a_hook_dict_replaced_is_registered_again() -> None:
    """A module whose hook dicts were replaced (and the old ones dropped) gets its hooks registered
    again at the next attach."""
    model, x = mlp()
    gram = GramCollector(model)
    gram.attach()
    gram.detach()
    layer = model[0]
    layer._forward_hooks, layer._forward_pre_hooks = (
        type(layer._forward_hooks)(),
        type(layer._forward_pre_hooks)(),
    )
    gc.collect()
    gram.reset()
    gram.attach()
    assert layer._forward_hooks and not layer._forward_pre_hooks
    model(x).sum().backward()
    gram.detach()
    assert set(gram.matrix(per_layer=True)) == {"0", "2"}
