"""RandomGradient against the seed's hand-written loop (seed 000_e58e526c3e6fcb5b.txt §4).

The references are plain torch, float64: ``(loss * r).backward(); optimizer.step()`` with the r
sequence read back from the callback's ``.history``.
"""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import AtenOpsPerStep
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_tricks.callbacks.random_gradient import HISTORY_FILE, METRIC_NAME, RandomGradient
from lightning_tricks.gradients.random_weights import BLOCK_DRAWS, BackwardScaling, RandomWeightStream

IN_FEATURES, OUT_FEATURES = 6, 3

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------------
# Small modules, data and the seed's loop
# ---------------------------------------------------------------------------------------------


def make_net(arch: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    if arch == "mlp":
        net = nn.Sequential(nn.Linear(IN_FEATURES, 16), nn.Tanh(), nn.Linear(16, OUT_FEATURES))
    else:
        net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, OUT_FEATURES))
    return net.to(dtype)


def make_data(arch: str, n: int, dtype: torch.dtype = torch.float64) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    shape = (n, IN_FEATURES) if arch == "mlp" else (n, 2, 6, 6)
    x = torch.randn(shape, generator=generator, dtype=dtype)
    y = torch.randn(n, OUT_FEATURES, generator=generator, dtype=dtype)
    return TensorDataset(x, y)


def make_optimizer(name: str, parameters) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=0.1, momentum=0.5)
    return torch.optim.Adam(parameters, lr=0.01, betas=(0.5, 0.999))


class AutoModule(pl.LightningModule):
    def __init__(self, net: nn.Module, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = net
        self.optimizer_name = optimizer
        self.losses: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.losses.append(loss.detach().clone())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y))

    test_step = validation_step

    def configure_optimizers(self):
        return make_optimizer(self.optimizer_name, self.net.parameters())


def batches_of(dataset: TensorDataset, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    x, y = dataset.tensors
    return list(zip(x.split(batch_size), y.split(batch_size)))


def seed_loop(net, optimizer, batches, rs, accumulate=1, clip=None, autocast=None, scaler=None):
    """Seed 000 §4 by hand: ``(loss / accumulate * r).backward()`` per micro-batch, then one step."""
    rs, losses = iter(rs), []
    for start in range(0, len(batches), accumulate):
        optimizer.zero_grad()
        for x, y in batches[start : start + accumulate]:
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                loss = F.mse_loss(net(x), y)
            losses.append(loss.detach().clone())
            loss_random = loss / accumulate * next(rs)
            (loss_random if scaler is None else scaler.scale(loss_random)).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        if clip is not None:
            clip(list(net.parameters()))
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
    return losses


def rs_of(callback: RandomGradient) -> list[float]:
    return [record["r"] for record in callback.history]


def read_history_csv(path: Path) -> list[tuple[int, int, float]]:
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    return [(int(row["step"]), int(row["backward"]), float(row["r"])) for row in rows]


def assert_same_parameters(module: nn.Module, reference: nn.Module) -> None:
    for (name, p), q in zip(module.named_parameters(), reference.parameters()):
        assert torch.equal(p.detach(), q.detach()), name


def assert_parameters_differ(module: nn.Module, reference: nn.Module) -> None:
    assert any(
        not torch.equal(p.detach(), q.detach()) for p, q in zip(module.parameters(), reference.parameters())
    )


# ---------------------------------------------------------------------------------------------
# Arguments and the r stream
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(low=-0.1), ValueError, "low"),
        (dict(high=-1.0), ValueError, "high"),
        (dict(low=0.8, high=0.2), ValueError, "low <= high"),
        (dict(high=0.0), ValueError, "high"),
        (dict(low=float("nan")), ValueError, "low"),
        (dict(high=float("inf")), ValueError, "high"),
        (dict(low="0"), TypeError, "low"),
        (dict(high=True), TypeError, "high"),
        (dict(schedule="gaussian"), ValueError, "schedule"),
        (dict(schedule="cyclical"), ValueError, "period"),
        (dict(schedule="cyclical", period=1), ValueError, "period"),
        (dict(schedule="cyclical", period=2.5), TypeError, "period"),
        (dict(period=10), ValueError, "period"),
        (dict(optimizers=[]), ValueError, "optimizers"),
        (dict(optimizers=[0, 0]), ValueError, "duplicates"),
        (dict(optimizers=[-1]), ValueError, "optimizers"),
        (dict(optimizers=0), TypeError, "optimizers"),
        (dict(optimizers=["0"]), TypeError, "optimizers"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=2**64), ValueError, "seed"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(log_every_n_steps=0), ValueError, "log_every_n_steps"),
    ],
)
def test_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        RandomGradient(**kwargs)


def test_optimizer_index_without_optimizer_is_reported_at_fit_start(trainer_for, tiny_module):
    callback = RandomGradient(optimizers=[1], seed=0)
    with pytest.raises(ValueError, match=r"optimizers=\[1\].*1 optimiser"):
        trainer_for([callback]).fit(tiny_module(samples=8))


def uniform_reference(seed: int, n: int, low: float, high: float) -> list[float]:
    """One float64 U[0, 1) draw per backward from a CPU generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return [
        low + (high - low) * torch.rand((), dtype=torch.float64, generator=generator).item() for _ in range(n)
    ]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(low=0.2, high=0.6, seed=11), uniform_reference(11, 10, 0.2, 0.6)),
        (dict(low=0.5, high=3.0, schedule="constant"), [3.0] * 10),
        (
            dict(low=0.2, high=1.0, schedule="cyclical", period=4),
            [0.2, 0.6, 1.0, 0.6, 0.2, 0.6, 1.0, 0.6, 0.2, 0.6],
        ),
    ],
)
def test_schedules_draw_one_documented_r_per_backward(kwargs, expected, trainer_for):
    callback = RandomGradient(**kwargs)
    module = AutoModule(make_net("mlp"))
    trainer_for([callback], accumulate_grad_batches=2).fit(
        module, DataLoader(make_data("mlp", 20), batch_size=2)
    )
    assert [record["step"] for record in callback.history] == [i // 2 for i in range(10)]
    assert [record["backward"] for record in callback.history] == list(range(10))
    assert rs_of(callback) == pytest.approx(expected, abs=1e-15)


def test_stream_drawn_in_blocks_equals_one_draw_at_a_time_and_saves_that_generator_state():
    """Reference: a generator drawing one float64 at a time, as the seed's ``random()`` per step."""
    stream = RandomWeightStream(0.0, 1.0, seed=3)
    reference = torch.Generator().manual_seed(3)
    saved_at = {0, 7, BLOCK_DRAWS - 1, BLOCK_DRAWS, 2 * BLOCK_DRAWS + 4}
    for t in range(2 * BLOCK_DRAWS + 5):
        assert stream.next() == torch.rand((), dtype=torch.float64, generator=reference).item()
        if t in saved_at:
            state = stream.state_dict()
            assert state["draws"] == t + 1 and torch.equal(state["generator"], reference.get_state())
            resumed = RandomWeightStream(0.0, 1.0, seed=99)
            resumed.load_state_dict(state)
            peek = torch.Generator()
            peek.set_state(reference.get_state())
            assert resumed.next() == torch.rand((), dtype=torch.float64, generator=peek).item()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(low=2.0, high=1.0), ValueError, "low <= high"),
        (dict(schedule="cyclical", period=1), ValueError, "period"),
        (dict(seed=None), TypeError, "seed"),
        (dict(seed=2**64), ValueError, "seed"),
    ],
)
def test_stream_rejects_bad_arguments_naming_them(kwargs, error, match):
    with pytest.raises(error, match=match):
        RandomWeightStream(**kwargs)


def test_backward_scaling_equals_loss_times_r_or_scales_only_the_selected_parameters():
    """Without Lightning: a backward between ``begin`` and ``end`` gives the gradients of
    ``(loss * r).backward()`` bit for bit; with optimiser 0 selected and a backward reaching both
    optimisers' parameters, only optimiser 0's gradients are multiplied by r (up to rounding)."""
    torch.manual_seed(0)
    first, second = nn.Linear(3, 4).double(), nn.Linear(4, 1).double()
    parameters = [*first.parameters(), *second.parameters()]
    optimizers = [torch.optim.SGD(first.parameters(), lr=0.1), torch.optim.SGD(second.parameters(), lr=0.1)]
    x, r = torch.randn(5, 3, dtype=torch.float64), 0.37

    def gradients(scaling: BackwardScaling | None = None, times: float = 1.0) -> list[torch.Tensor]:
        for p in parameters:
            p.grad = None
        loss = second(torch.tanh(first(x))).square().mean()
        if scaling is not None:
            scaling.begin(loss, r)
        (loss * times).backward()
        if scaling is not None:
            scaling.end()
        return [p.grad.clone() for p in parameters]

    scaling = BackwardScaling()
    assert all(map(torch.equal, gradients(scaling), gradients(times=r)))
    plain = gradients()
    assert scaling.select(optimizers, [0]) == 0
    selected = gradients(scaling)
    for got, want, scaled in zip(selected, plain, [True, True, False, False], strict=True):
        torch.testing.assert_close(got, want * r if scaled else want, rtol=1e-15, atol=0.0)
    assert all(map(torch.equal, gradients(), plain)), "no scaling outside begin/end"
    scaling.remove()
    assert all(map(torch.equal, gradients(scaling), gradients(times=r))), "hooks removed: at the loss again"


def test_a_step_costs_one_aten_op_the_scaling_of_the_loss_gradient(trainer_for, tiny_module):
    """r comes from a block drawn ahead (no ``rand``/``item`` per step; it was three ops) and
    the loss hook is ``torch.mul`` itself."""
    counts = []
    for callbacks in ([], [RandomGradient(seed=0)]):
        profile = AtenOpsPerStep()
        trainer_for([*callbacks, profile]).fit(tiny_module(samples=24, batch_size=4))  # 6 steps
        counts.append(profile.counts)
    assert [b - a for a, b in zip(*counts, strict=True)][1:] == [1] * 5


def test_seed_none_is_reproducible_under_seed_everything(trainer_for, tiny_module):
    streams = []
    for seed in (5, 5, 6):
        module = tiny_module(samples=8, batch_size=2)
        pl.seed_everything(seed)
        callback = RandomGradient()
        trainer_for([callback]).fit(module)
        streams.append(rs_of(callback))
    assert streams[0] == streams[1]
    assert streams[0] != streams[2]
    assert all(0.0 <= r < 1.0 for r in streams[0])


# ---------------------------------------------------------------------------------------------
# Bit-for-bit against the seed's loop
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "optimizer", "accumulate", "batch_size"),
    [("mlp", "sgd", 1, 4), ("conv", "adam", 1, 5), ("mlp", "adam", 2, 3), ("conv", "sgd", 2, 4)],
)
def test_automatic_optimisation_matches_seed_loop(arch, optimizer, accumulate, batch_size, trainer_for):
    dataset = make_data(arch, 8 * batch_size)
    module = AutoModule(make_net(arch), optimizer)
    initial = copy.deepcopy(module.net)
    callback = RandomGradient(seed=3)
    trainer_for([callback], accumulate_grad_batches=accumulate).fit(module, DataLoader(dataset, batch_size))

    assert len(callback.history) == 8
    reference = copy.deepcopy(initial)
    losses = seed_loop(
        reference,
        make_optimizer(optimizer, reference.parameters()),
        batches_of(dataset, batch_size),
        rs_of(callback),
        accumulate,
    )
    assert_same_parameters(module.net, reference)
    assert torch.equal(torch.stack(module.losses), torch.stack(losses)), (
        "the loss the module sees is unscaled"
    )

    unscaled = copy.deepcopy(initial)
    seed_loop(
        unscaled,
        make_optimizer(optimizer, unscaled.parameters()),
        batches_of(dataset, batch_size),
        [1.0] * 8,
        accumulate,
    )
    assert_parameters_differ(module.net, unscaled)


def generator_loss(discriminator: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-discriminator(fake)).mean()


def discriminator_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-discriminator(real)).mean() + F.softplus(discriminator(fake)).mean()


def make_gan() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(2)
    generator = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    discriminator = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    return generator, discriminator


def gan_optimizers(generator: nn.Module, discriminator: nn.Module) -> list[torch.optim.Optimizer]:
    return [
        torch.optim.Adam(generator.parameters(), lr=0.01, betas=(0.5, 0.999)),
        torch.optim.SGD(discriminator.parameters(), lr=0.05, momentum=0.9),
    ]


def gan_data(n: int = 24) -> TensorDataset:
    generator = torch.Generator().manual_seed(4)
    real = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    return TensorDataset(real, torch.randn(n, 3, generator=generator, dtype=torch.float64))


class Pix2PixShapedGAN(pl.LightningModule):
    """pix2pix's update order (seed 000 §5.2): discriminator step, then generator step with D frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator, self.discriminator = make_gan()

    def training_step(self, batch, batch_idx):
        real, z = batch
        opt_g, opt_d = self.optimizers()
        fake = self.generator(z)
        self.toggle_optimizer(opt_d)
        opt_d.zero_grad()
        self.manual_backward(discriminator_loss(self.discriminator, real, fake.detach()))
        opt_d.step()
        self.untoggle_optimizer(opt_d)
        self.toggle_optimizer(opt_g)
        opt_g.zero_grad()
        self.manual_backward(generator_loss(self.discriminator, fake))
        opt_g.step()
        self.untoggle_optimizer(opt_g)

    def configure_optimizers(self):
        return gan_optimizers(self.generator, self.discriminator)


def seed_gan_loop(generator, discriminator, batches, rs, scaled: set[int]) -> None:
    """The seed's pix2pix loop by hand: ``loss * r`` only for the chosen networks (0: G, 1: D)."""
    opt_g, opt_d = gan_optimizers(generator, discriminator)
    for (real, z), r_d, r_g in zip(batches, rs[0::2], rs[1::2]):
        fake = generator(z)
        discriminator.requires_grad_(True)
        opt_d.zero_grad()
        d_loss = discriminator_loss(discriminator, real, fake.detach())
        (d_loss * r_d if 1 in scaled else d_loss).backward()
        opt_d.step()
        discriminator.requires_grad_(False)
        opt_g.zero_grad()
        g_loss = generator_loss(discriminator, fake)
        (g_loss * r_g if 0 in scaled else g_loss).backward()
        opt_g.step()
    discriminator.requires_grad_(True)


@pytest.mark.parametrize("optimizers", [None, [0], [1], [0, 1]])
def test_manual_gan_matches_seed_loop(optimizers, trainer_for):
    dataset = gan_data()
    module = Pix2PixShapedGAN()
    callback = RandomGradient(optimizers=optimizers, seed=8)
    trainer_for([callback]).fit(module, DataLoader(dataset, batch_size=4))

    assert rs_of(callback) == uniform_reference(8, 12, 0.0, 1.0), (
        "one draw per backward, whatever is selected"
    )
    scaled = {0, 1} if optimizers is None else set(optimizers)
    reference = make_gan()
    seed_gan_loop(*reference, batches_of(dataset, 4), rs_of(callback), scaled)
    assert_same_parameters(module.generator, reference[0])
    assert_same_parameters(module.discriminator, reference[1])

    for other in ({0, 1}, {0}, {1}, set()):
        if other != scaled:
            unlike = make_gan()
            seed_gan_loop(*unlike, batches_of(dataset, 4), rs_of(callback), other)
            assert_parameters_differ(
                nn.ModuleList([module.generator, module.discriminator]), nn.ModuleList(unlike)
            )


class SharedBackwardGAN(pl.LightningModule):
    """One backward feeds both optimisers: the generator loss flows through a trainable discriminator."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator, self.discriminator = make_gan()
        self.gradients: list[list[torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        _, z = batch
        optimizers = self.optimizers()
        for half in z.chunk(2):
            self.manual_backward(generator_loss(self.discriminator, self.generator(half)))
        self.gradients.append([p.grad.clone() for p in self.parameters()])
        for optimizer in optimizers:
            optimizer.zero_grad()

    def configure_optimizers(self):
        return gan_optimizers(self.generator, self.discriminator)


@pytest.mark.parametrize("selected", [0, 1])
def test_backward_feeding_both_optimisers_scales_only_the_selected_parameters(selected, trainer_for):
    dataset = gan_data(12)
    module = SharedBackwardGAN()
    callback = RandomGradient(optimizers=[selected], seed=5)
    trainer_for([callback]).fit(module, DataLoader(dataset, batch_size=4))

    rs = iter(rs_of(callback))
    generator, discriminator = make_gan()
    selected_ids = {id(p) for p in (generator, discriminator)[selected].parameters()}
    parameters = [*generator.parameters(), *discriminator.parameters()]
    for (_, z), observed in zip(batches_of(dataset, 4), module.gradients):
        expected = [torch.zeros_like(p) for p in parameters]
        for half in z.chunk(2):
            r = next(rs)
            grads = torch.autograd.grad(generator_loss(discriminator, generator(half)), parameters)
            expected = [
                e + (g * r if id(p) in selected_ids else g) for e, g, p in zip(expected, grads, parameters)
            ]
        for got, want in zip(observed, expected):
            assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# Precision and clipping
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed-scaler"])
def test_mixed_precision_scales_like_seed_loop(precision, trainer_for):
    dataset = make_data("conv", 24, torch.float32)
    module = AutoModule(make_net("conv", torch.float32), "sgd")
    initial = copy.deepcopy(module.net)
    callback = RandomGradient(seed=9)
    if precision == "bf16-mixed":
        autocast, scaler, options = torch.bfloat16, None, dict(precision="bf16-mixed")
    else:
        autocast, scaler = torch.float16, torch.amp.GradScaler("cpu", init_scale=2.0**12)
        options = dict(plugins=[MixedPrecision("16-mixed", "cpu", copy.deepcopy(scaler))])
    trainer_for([callback], **options).fit(module, DataLoader(dataset, batch_size=4))

    reference = copy.deepcopy(initial)
    seed_loop(
        reference,
        make_optimizer("sgd", reference.parameters()),
        batches_of(dataset, 4),
        rs_of(callback),
        autocast=autocast,
        scaler=scaler,
    )
    assert_same_parameters(module.net, reference)
    unscaled = copy.deepcopy(initial)
    seed_loop(
        unscaled,
        make_optimizer("sgd", unscaled.parameters()),
        batches_of(dataset, 4),
        [1.0] * 6,
        autocast=autocast,
    )
    assert_parameters_differ(module.net, unscaled)


@pytest.mark.parametrize(("algorithm", "value"), [("norm", 0.05), ("value", 0.02)])
def test_gradient_clipping_sees_scaled_gradient(algorithm, value, trainer_for):
    def clip(parameters):
        if algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(parameters, value)
        else:
            torch.nn.utils.clip_grad_value_(parameters, value)

    dataset = make_data("mlp", 24)
    module = AutoModule(make_net("mlp"), "sgd")
    initial = copy.deepcopy(module.net)
    callback = RandomGradient(seed=12)
    clipping = dict(gradient_clip_val=value, gradient_clip_algorithm=algorithm)
    trainer_for([callback], **clipping).fit(module, DataLoader(dataset, batch_size=4))

    reference = copy.deepcopy(initial)
    seed_loop(
        reference,
        make_optimizer("sgd", reference.parameters()),
        batches_of(dataset, 4),
        rs_of(callback),
        clip=clip,
    )
    assert_same_parameters(module.net, reference)

    clip_then_scale = copy.deepcopy(initial)
    optimizer = make_optimizer("sgd", clip_then_scale.parameters())
    for (x, y), r in zip(batches_of(dataset, 4), rs_of(callback)):
        optimizer.zero_grad()
        F.mse_loss(clip_then_scale(x), y).backward()
        clip(list(clip_then_scale.parameters()))
        torch._foreach_mul_([p.grad for p in clip_then_scale.parameters()], r)
        optimizer.step()
    assert_parameters_differ(module.net, clip_then_scale)


# ---------------------------------------------------------------------------------------------
# Logging, validation, resume, DDP
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("callback_every", "trainer_every"), [(2, 50), (None, 2)])
def test_logs_first_r_of_logged_steps_and_leaves_evaluation_alone(
    callback_every, trainer_every, trainer_for, memory_logger
):
    dataset = make_data("mlp", 16)
    logger = memory_logger()
    callback = RandomGradient(seed=1, log_every_n_steps=callback_every)
    options = dict(logger=logger, log_every_n_steps=trainer_every, accumulate_grad_batches=2)
    trainer = trainer_for([callback], **options)
    module = AutoModule(make_net("mlp"))
    loader = DataLoader(dataset, batch_size=2)
    trainer.fit(module, loader, val_dataloaders=loader)
    monitored = trainer.callback_metrics[METRIC_NAME].item()
    trainer.validate(module, loader)
    trainer.test(module, loader)

    assert len(callback.history) == 8, "validation and test draw nothing"
    logged = [(step, m[METRIC_NAME]) for step, m in logger.logged if METRIC_NAME in m]
    first_r_of_step = {}
    for record in callback.history:
        first_r_of_step.setdefault(record["step"], record["r"])
    assert logged == [(0, first_r_of_step[0]), (2, first_r_of_step[2])], "steps with step % n == 0"
    assert monitored == first_r_of_step[2], "the latest logged r is in callback_metrics"


def test_resume_continues_the_r_stream(tmp_path, trainer_for):
    dataset = make_data("mlp", 16)
    uninterrupted = AutoModule(make_net("mlp"), "adam")
    full = RandomGradient(seed=21)
    loader = DataLoader(dataset, batch_size=4)
    trainer_for([full], default_root_dir=tmp_path / "full", max_epochs=2).fit(uninterrupted, loader)

    first = RandomGradient(seed=21)
    trainer = trainer_for([first], default_root_dir=tmp_path / "first")
    trainer.fit(AutoModule(make_net("mlp"), "adam"), loader)
    checkpoint = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(checkpoint)

    resumed_callback = RandomGradient(seed=999)
    resumed = AutoModule(make_net("mlp"), "adam")
    trainer = trainer_for([resumed_callback], default_root_dir=tmp_path / "resumed", max_epochs=2)
    trainer.fit(resumed, loader, ckpt_path=checkpoint)

    assert first.history + resumed_callback.history == full.history, "the stream continues exactly"
    assert resumed_callback.state_dict()["draws"] == 8
    assert set(resumed_callback.state_dict()) == {"hyperparameters", "run_dir", "seed", "draws", "generator"}
    assert_same_parameters(resumed.net, uninterrupted.net)
    written = [read_history_csv(path) for path in sorted((tmp_path / "resumed").rglob(HISTORY_FILE))]
    assert written == [[(r["step"], r["backward"], r["r"]) for r in resumed_callback.history]]


class ReseedPerRank(Callback):
    """Gives each rank its own ``torch.initial_seed()``, so agreeing on r needs the broadcast."""

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(100 + trainer.global_rank)


class SaveRankResults(Callback):
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        callback = next(c for c in trainer.callbacks if isinstance(c, RandomGradient))
        parameters = [p.detach().clone() for p in pl_module.net.parameters()]
        torch.save(
            {"rs": rs_of(callback), "parameters": parameters},
            self.directory / f"rank{trainer.global_rank}.pt",
        )


class ShardedModule(AutoModule):
    """Rank k reads samples k, k + 2, ...: the two per-rank batches of step t form global batch t."""

    def __init__(self, net: nn.Module, dataset: TensorDataset, per_rank_batch: int) -> None:
        super().__init__(net, "sgd")
        self.dataset, self.per_rank_batch = dataset, per_rank_batch

    def train_dataloader(self):
        sampler = DistributedSampler(
            self.dataset, self.trainer.world_size, self.trainer.global_rank, shuffle=False
        )
        return DataLoader(self.dataset, batch_size=self.per_rank_batch, sampler=sampler)


def test_ddp_two_ranks_agree_and_match_single_process_global_batch(tmp_path, trainer_for):
    per_rank_batch, steps = 3, 4
    dataset = make_data("mlp", 2 * per_rank_batch * steps)
    module = ShardedModule(make_net("mlp"), dataset, per_rank_batch)
    initial = copy.deepcopy(module.net)
    callbacks = [ReseedPerRank(), RandomGradient(), SaveRankResults(tmp_path)]
    trainer = trainer_for(callbacks, strategy="ddp_fork", devices=2, use_distributed_sampler=False)
    trainer.fit(module)

    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert len(rank0["rs"]) == steps
    assert rank0["rs"] == rank1["rs"]
    reference = copy.deepcopy(initial)
    seed_loop(
        reference,
        make_optimizer("sgd", reference.parameters()),
        batches_of(dataset, 2 * per_rank_batch),
        rank0["rs"],
    )
    for p, q in zip(rank0["parameters"], reference.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=1e-12, atol=1e-14)
    unscaled = copy.deepcopy(initial)
    seed_loop(
        unscaled,
        make_optimizer("sgd", unscaled.parameters()),
        batches_of(dataset, 2 * per_rank_batch),
        [1.0] * steps,
    )
    assert not torch.allclose(rank0["parameters"][0], next(unscaled.parameters()).detach())
