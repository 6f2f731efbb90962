"""Cost of the exact per-sample Gram matrix F̃ = JᵀJ (seed 004_e5d92837cb57ce8a.txt §3, eq. 6).

CIFAR ResNet-20 (``lightning_tricks.models.build_net("resnet20", 10)``), random 3×32×32 images,
SGD, on CPU, one process. Configurations (each a full training step; ratios are to the plain one):

- plain step: forward, backward, SGD step.
- GramCollector: the same step inside the collector (autograd computes every gradient, the
  collector only reads activations and output gradients), then ``torch.linalg.eigvalsh(G)``.
- vmap(grad) pass: the plain step, then per-sample gradients from ``torch.func.vmap(grad(...))``
  in a separate pass, their Gram and its eigenvalues.
- per-sample loop (seed 004): the plain step, then one forward and ``torch.autograd.grad`` per
  sample (what seed 004 §4 did inside Torch), the Gram and its eigenvalues. To keep the run short
  only ``--loop-samples`` rows of J are computed and their time is scaled to B rows.
- Opacus GradSampleModule / BackPACK BatchGrad: per-sample gradients from hooks during the step,
  then the Gram and eigenvalues — only if the package imports (they are not dependencies of the
  project: ``pip install opacus backpack-for-pytorch``); skipped with a note otherwise. Opacus
  refuses trainable layers with buffers (BatchNorm), so its copy of the net has the BatchNorm
  affine parameters frozen (1,504 of 269,850 parameters, left out of its J) and runs in training
  mode, like the collector; BackPACK runs on the net as it is (no converter), BatchNorm in eval mode.

The separate passes (vmap, loop, BackPACK) run BatchNorm with its running statistics, since
per-sample gradients through batch statistics are undefined for them; the collector (and Opacus)
measure the training-mode step itself (columns = each sample's contribution to the batch
gradient). Costs are comparable; the matrices differ by the BatchNorm mode.

Timing: each round runs every configuration once, in an order that rotates between rounds, each
right after a plain step; the table gives the median time, the median of the paired ratios
(configuration / the plain step just before it), which cancels slow drifts of machine load, and
their range over the rounds. Peak memory is the growth of the process's peak resident set during one
step (Linux: VmHWM reset through ``/proc/self/clear_refs`` after returning freed heap memory to
the system with ``malloc_trim``), i.e. what the step allocated beyond the model, optimizer state
and batch that were already alive, also as a ratio to the plain step's; "nan" where that
interface is missing. The header names the CPU and thread count: ratios depend on both.

``--profile N`` adds, per batch size, the N operators whose self CPU time grows most from the plain
step to the collector's step (``torch.profiler``, shapes kept apart, mean over 3 × 2 steps of
each): where the remaining overhead goes.

    python benchmarks/bench_fisher.py [--batch-sizes 32 128 256] [--rounds 5] [--slow-rounds 3]
                                      [--loop-samples 16] [--threads 2] [--profile 20]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import machine_description
from torch import nn

from lightning_tricks.gradients import GramCollector
from lightning_tricks.models import build_net

Step = Callable[[], "float | None"]
"""A configuration; one that returns a float reports its own (extrapolated) duration."""


def gram_and_spectrum(jacobian: torch.Tensor) -> torch.Tensor:
    """F̃ = J Jᵀ for J (B, P) and its eigenvalues (seed 004 eq. 6–7)."""
    gram = (jacobian @ jacobian.T).to(torch.float64)
    return torch.linalg.eigvalsh(gram)


class Workload:
    """A ResNet-20, its SGD optimizer and one batch."""

    def __init__(self, batch_size: int) -> None:
        torch.manual_seed(0)
        self.net = build_net("resnet20", 10)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9)
        self.images = torch.randn(batch_size, 3, 32, 32)
        self.labels = torch.randint(0, 10, (batch_size,))
        self.params = [p for p in self.net.parameters() if p.requires_grad]

    def plain_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.net(self.images), self.labels).backward()
        self.optimizer.step()

    def collector_step(self, collector: GramCollector) -> Step:
        collector.attach()
        collector.enabled = False  # both collectors stay attached; each captures only in its own step

        def step() -> None:
            collector.reset()
            collector.enabled = True
            self.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(self.net(self.images), self.labels).backward()
            collector.enabled = False
            torch.linalg.eigvalsh(collector.matrix())
            self.optimizer.step()

        return step

    def vmap_step(self) -> None:
        self.plain_step()
        params = {name: p.detach() for name, p in self.net.named_parameters()}
        buffers = dict(self.net.named_buffers())

        def sample_loss(params: dict, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            logits = torch.func.functional_call(self.net, (params, buffers), (image[None],))
            return F.cross_entropy(logits, label[None])

        with _eval_mode(self.net):
            per_sample_grad = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))
            grads = per_sample_grad(params, self.images, self.labels)
        gram_and_spectrum(torch.cat([g.reshape(len(self.images), -1) for g in grads.values()], dim=1))

    def loop_step(self, samples: int) -> Step:
        """The plain step, then J row by row: one forward and autograd.grad per sample. Only the
        first ``samples`` rows are computed; their time is scaled to B rows (J is allocated full)."""

        def step() -> float:
            start = time.perf_counter()
            self.plain_step()
            jacobian = torch.zeros(len(self.images), sum(p.numel() for p in self.params))
            loop_start = time.perf_counter()
            with _eval_mode(self.net):
                for i in range(min(samples, len(self.images))):
                    loss = F.cross_entropy(self.net(self.images[i : i + 1]), self.labels[i : i + 1])
                    torch.cat(
                        [g.reshape(-1) for g in torch.autograd.grad(loss, self.params)], out=jacobian[i]
                    )
            loop = time.perf_counter() - loop_start
            gram_start = time.perf_counter()
            gram_and_spectrum(jacobian)
            done = time.perf_counter()
            rows = min(samples, len(self.images))
            return (loop_start - start) + loop * len(self.images) / rows + (done - gram_start)

        return step


@contextlib.contextmanager
def _eval_mode(net: nn.Module):
    net.eval()
    try:
        yield
    finally:
        net.train()


def opacus_step(work: Workload) -> Step | str:
    try:
        from opacus import GradSampleModule
    except ImportError:
        return "opacus not installed"
    net = copy.deepcopy(work.net)
    for layer in net.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.requires_grad_(False)  # Opacus refuses trainable layers with buffers
    try:
        module = GradSampleModule(net, loss_reduction="mean", strict=False)
    except Exception as error:  # an unsupported layer or version: report, do not fail the table
        return f"opacus failed: {type(error).__name__}: {str(error)[:60]}"
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    params = [p for p in net.parameters() if p.requires_grad]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(module(work.images), work.labels).backward()
        jacobian = torch.cat([p.grad_sample.reshape(len(work.images), -1) for p in params], dim=1)
        for p in params:
            p.grad_sample = None
        gram_and_spectrum(jacobian * len(work.images))
        optimizer.step()

    try:
        step()
    except Exception as error:
        return f"opacus failed: {type(error).__name__}: {str(error)[:60]}"
    return step


def backpack_step(work: Workload) -> Step | str:
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad
    except ImportError:
        return "backpack not installed"
    try:
        net = extend(copy.deepcopy(work.net))
        loss_fn = extend(nn.CrossEntropyLoss())
        # learning rate 0: trained in eval mode (initial running statistics) the copy diverges; an
        # SGD step still runs, so the cost is the same
        optimizer = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9)
    except Exception as error:
        return f"backpack failed: {type(error).__name__}: {str(error)[:60]}"

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _eval_mode(net), backpack(BatchGrad()):
            loss_fn(net(work.images), work.labels).backward()
        params = [p for p in net.parameters() if p.requires_grad]
        jacobian = torch.cat([p.grad_batch.reshape(len(work.images), -1) for p in params], dim=1)
        for p in params:
            del p.grad_batch
        gram_and_spectrum(jacobian * len(work.images))
        optimizer.step()

    try:
        step()
    except Exception as error:
        return f"backpack failed: {type(error).__name__}: {str(error)[:60]}"
    return step


def peak_memory_mib(step: Step) -> float:
    """Growth of the peak resident set during ``step`` (MiB), NaN where unsupported."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        step()
        return float("nan")
    step()
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def configurations(work: Workload, loop_samples: int) -> tuple[dict[str, Step], dict[str, str]]:
    steps: dict[str, Step] = {
        "plain step": work.plain_step,
        "GramCollector": work.collector_step(GramCollector(work.net)),
        "vmap(grad) pass": work.vmap_step,
        "per-sample loop (seed 004)": work.loop_step(loop_samples),
    }
    skipped: dict[str, str] = {}
    for name, factory in (("Opacus GradSampleModule", opacus_step), ("BackPACK BatchGrad", backpack_step)):
        result = factory(work)
        if isinstance(result, str):
            skipped[name] = result
        else:
            steps[name] = result
    return steps, skipped


SLOW = ("vmap(grad) pass", "per-sample loop (seed 004)", "Opacus GradSampleModule", "BackPACK BatchGrad")


def measure(
    batch_size: int, rounds: int, slow_rounds: int, loop_samples: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, float], dict[str, str]]:
    """Per configuration: step times (s), ratios to the plain step run just before it, peak memory
    growth (MiB); and the configurations skipped with the reason."""
    work = Workload(batch_size)
    steps, skipped = configurations(work, loop_samples)
    for step in steps.values():  # warm-up: one-time allocations and kernel selection
        step()
    memory = {name: peak_memory_mib(step) for name, step in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    ratios: dict[str, list[float]] = {name: [] for name in steps}
    others = [name for name in steps if name != "plain step"]
    for r in range(rounds):
        for name in others[r % len(others) :] + others[: r % len(others)]:
            if name in SLOW and len(times[name]) >= slow_rounds:
                continue
            plain, seconds = _timed(steps["plain step"]), _timed(steps[name])
            times["plain step"].append(plain)
            times[name].append(seconds)
            ratios[name].append(seconds / plain)
    ratios["plain step"] = [1.0]
    return times, ratios, memory, skipped


def profile_overhead(batch_size: int, rows: int) -> None:
    """Print the ``rows`` operators (name, input shapes) whose self CPU time per step grows most from
    the plain step to the collector's step, with both times."""
    from torch.profiler import profile

    work = Workload(batch_size)
    steps = {"plain": work.plain_step, "collector": work.collector_step(GramCollector(work.net))}
    per_step: dict[str, dict[tuple[str, str], float]] = {}
    for name, step in steps.items():
        step()
        totals: dict[tuple[str, str], float] = defaultdict(float)
        for _ in range(3):
            with profile(record_shapes=True) as prof:
                step()
                step()
            for event in prof.key_averages(group_by_input_shape=True):
                totals[(event.key, str(event.input_shapes))] += event.self_cpu_time_total / 6e3
        per_step[name] = totals
    plain, measured = per_step["plain"], per_step["collector"]
    keys = sorted(set(plain) | set(measured), key=lambda k: plain.get(k, 0.0) - measured.get(k, 0.0))
    print(f"\nB = {batch_size}: self CPU ms per step (profiler on), largest growth first")
    print(f"{'plain':>8} {'measured':>8}  operator, input shapes")
    for key in keys[:rows]:
        print(f"{plain.get(key, 0.0):8.2f} {measured.get(key, 0.0):8.2f}  {key[0]} {key[1][:90]}")
    print(f"{sum(plain.values()):8.2f} {sum(measured.values()):8.2f}  total")


def _timed(step: Step) -> float:
    start = time.perf_counter()
    reported = step()
    return time.perf_counter() - start if reported is None else reported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slow-rounds", type=int, default=3, help="rounds for the separate-pass baselines")
    parser.add_argument(
        "--loop-samples", type=int, default=16, help="rows of J the loop computes (time scaled to B)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="also list the N operators that grow most"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"ResNet-20, 3x32x32, one process; {machine_description()}")
    print("median step time; median ratio to a plain step run just before (paired, so load drift cancels)")
    print(
        "and its range over the rounds; peak resident memory growth during one step, and its ratio to plain"
    )
    for batch_size in args.batch_sizes:
        times, ratios, memory, skipped = measure(batch_size, args.rounds, args.slow_rounds, args.loop_samples)
        print(f"\nB = {batch_size}")
        print(
            f"{'configuration':<30} {'runs':>4} {'median s':>9} {'ratio':>7} {'range':>13} {'peak MiB':>9} {'mem':>6}"
        )
        for name, samples in times.items():
            median, ratio = statistics.median(samples), statistics.median(ratios[name])
            spread = f"{min(ratios[name]):.2f}-{max(ratios[name]):.2f}"
            growth = memory[name] / memory["plain step"]
            print(
                f"{name:<30} {len(samples):>4} {median:>9.3f} {ratio:>6.2f}x {spread:>13} "
                f"{memory[name]:>9.0f} {growth:>5.2f}x"
            )
        for name, reason in skipped.items():
            print(f"{name:<30} skipped: {reason}")
        if args.profile:
            profile_overhead(batch_size, args.profile)


if __name__ == "__main__":
    main()
