"""Exact per-step counts of a FisherSpectrum-measured step on the CPU proxy of a host-bound GPU step.

ResNet-20, B = 8, 3×8×8 images, one thread, SGD: top-level aten ops (torch.profiler, ops not called
by another aten op) and Python calls (a profile hook) of a plain step, and of a step measured by
:class:`GramCollector` + ``fisher_statistics`` as FisherSpectrum does (attach, forward, backward,
G, statistics, detach), at a later measured step and at the first one (which also walks the graph
for parameters used outside their modules). Counts, not times: they are exact on a shared
machine.

    python benchmarks/bench_fisher_ops.py
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lightning_tricks.gradients import GramCollector, fisher_statistics
from lightning_tricks.models import build_net

BATCH, SIZE, WARMUP = 8, 8, 3


def counted(step: Callable[[], None]) -> dict[str, object]:
    calls = 0

    def profile(frame, event, arg) -> None:
        nonlocal calls
        calls += event == "call"

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        sys.setprofile(profile)
        step()
        sys.setprofile(None)
    events = profiler.events()

    def aten(e) -> bool:
        return e.name.startswith("aten::")

    top = Counter(e.name for e in events if aten(e) and not (e.cpu_parent and aten(e.cpu_parent)))
    return {"ops": sum(top.values()), "python_calls": calls, "by_op": top}


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_net("resnet20", 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(BATCH, 3, SIZE, SIZE), torch.randint(0, 10, (BATCH,))
    collector = GramCollector(model)

    def plain() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    def measured(first: bool = False) -> None:
        collector.reset()
        collector.track_outside_use = first
        collector.attach()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if first:
            collector.check_outside_use(loss)
        loss.backward()
        collector.detach()
        stats = fisher_statistics(collector.matrix())
        optimizer.step()
        torch.stack([stats.trace, stats.condition]).tolist()

    for _ in range(WARMUP):
        plain()
        measured()
    base, fisher, first = counted(plain), counted(measured), counted(lambda: measured(first=True))
    for key in ("ops", "python_calls"):
        print(
            f"{key:>13}: plain {base[key]:>6}  measured {fisher[key]:>6} (+{fisher[key] - base[key]})"
            f"  first measured {first[key]:>6} (+{first[key] - base[key]})"
        )
    extra = fisher["by_op"] - base["by_op"]
    print("extra ops:", ", ".join(f"{name[6:]} {n}" for name, n in extra.most_common(16)))


if __name__ == "__main__":
    main()
