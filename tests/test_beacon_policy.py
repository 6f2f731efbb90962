"""BeaconGuidedPolicy: seed 004's closed loop (Fig. 1d) on the batch-size policy protocol.

Two kinds of landscapes. The *synthetic* one (as in test_beacons.py: C̄_K constant 10·√(s/16) and
L_K = K·lr/√s for a beacon at size s, lowest error at s = 64) checks the rule's direction and
bounds exactly, on hand-made contexts. The *real* one is written by short fits of the tiny
regression module (tests/conftest.py) with FisherSpectrum, a CSVLogger and a ``test/acc`` we set
(lowest error at size 16): a guided fit with a real FisherSpectrum is then checked against
``decide_batch_size`` on the point FisherSpectrum's own history gives (no synthetic metrics are fed
to the Trainer anywhere).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_tricks import BatchSizeScheduler, FisherSpectrum
from lightning_tricks.batch_size_policies import BatchSizePolicy, PolicyContext
from lightning_tricks.beacon_policy import BeaconGuidedPolicy, landscape_from_runs
from lightning_tricks.beacons import (
    FisherPoint,
    Landscape,
    beacon_from_records,
    decide_batch_size,
    target_region,
)
from lightning_tricks.cli import CLI_OPTIONS, TricksCLI
from lightning_tricks.results import load_fisher_spectrum
from lightning_tricks.sweep import format_value, load_grid

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py: one torch thread

# -- a synthetic landscape (exact geometry) ----------------------------------------------------

SAMPLES, EPOCHS = 1024, 10
SIZES = [16, 32, 64, 128, 256]


def level(size: int) -> float:
    return 10 * math.sqrt(size / 16)


def rows(size: int, lr: float = 0.1) -> list[dict]:
    steps = SAMPLES // size
    return [
        {"epoch": e, "step": (e + 1) * steps - 1, "C_bar": level(size), "L": (e + 1) * steps * lr / math.sqrt(size),
         "lr": lr, "batch_size": size}
        for e in range(EPOCHS)
    ]  # fmt: skip


def synthetic(sizes=SIZES) -> Landscape:
    beacons = [
        beacon_from_records(f"s{s}", rows(s), error=0.05 + 0.01 * abs(math.log2(s / 64)), max_epochs=EPOCHS)
        for s in sizes
    ]
    return Landscape(tuple(beacons), max_epochs=EPOCHS, every_n_steps=1)


def followed(history: list[tuple[int, int]]) -> tuple[int, dict[str, float]]:
    """(step, live metrics) after training ``[(size, epochs), ...]`` exactly as each size's beacon."""
    step, c_sum, total = 0, 0.0, 0.0
    for size, epochs in history:
        steps = SAMPLES // size * epochs
        step, c_sum, total = step + steps, c_sum + steps * level(size), total + steps * 0.1 / math.sqrt(size)
    return step, {"fisher/C_bar": c_sum / step, "fisher/L": total}


FISHER_EVERY_STEP = {"fisher": {"every_n_steps": 1}}
"""``PolicyContext.callbacks`` of a run with ``FisherSpectrum(every_n_steps=1)``, the synthetic beacons' setting."""


def context(size: int | None, metrics=None, max_epochs: int = EPOCHS, initial: int = 16) -> PolicyContext:
    return PolicyContext(
        max_epochs=max_epochs,
        initial_size=initial,
        size=size,
        metrics=metrics or {},
        callbacks=FISHER_EVERY_STEP,
    )


def drive(policy: BeaconGuidedPolicy, initial: int, epochs: int = EPOCHS) -> list[int]:
    """The sizes a run trains when it moves exactly like the beacon of each epoch's size."""
    sizes: list[int] = []
    for epoch in range(epochs):
        step, metrics = followed([(s, 1) for s in sizes]) if sizes else (0, {})
        sizes.append(
            policy.size_for(epoch, step, context(sizes[-1] if sizes else None, metrics, initial=initial))
        )
    return sizes


def test_the_policy_follows_the_protocol_and_decides_as_decide_batch_size():
    policy = BeaconGuidedPolicy(synthetic(), top_k=1)
    assert isinstance(policy, BatchSizePolicy)
    assert policy.sizes == tuple(SIZES) and policy.known_sizes() == {
        f"sizes[{i}]": s for i, s in enumerate(SIZES)
    }
    step, metrics = followed([(16, 2)])
    size = policy.size_for(2, step, context(16, metrics))
    point = FisherPoint(level(16), metrics["fisher/L"], step)  # every step measured: K = step
    expected = decide_batch_size(synthetic(), point, 2, SIZES, 16, 2.0, max_epochs=EPOCHS, top_k=1)
    assert size == expected.size == 32
    assert policy.decisions == [
        {"epoch": 2, "step": step, "size": 32, "C_bar": level(16), "L": metrics["fisher/L"], "K": step}
    ]


def distances(policy: BeaconGuidedPolicy, sizes: list[int]) -> list[float]:
    """The run's distance to the region (top_k=1) at the end of each epoch."""
    result = []
    for epoch in range(1, len(sizes) + 1):
        step, metrics = followed([(s, 1) for s in sizes[:epoch]])
        region = target_region(policy.landscape, epoch / EPOCHS, policy.top_k)
        result.append(region.distance(FisherPoint(metrics["fisher/C_bar"], metrics["fisher/L"], step)))
    return result


@pytest.mark.parametrize(
    ("initial", "max_change", "expected"),
    [
        # C̄_K and L_K are running measures: a run that started small has gathered too much L_K and too
        # little C̄_K, and reaches the region by going past the best beacon's size (64), one doubling
        # an epoch; from above it undershoots (32) once, then stays
        (16, 2.0, [16, 32, 64, 128, 256, 256, 256, 256, 256, 256]),
        (256, 2.0, [256, 128, 64, 32, 64, 64, 64, 64, 64, 64]),
        (16, 4.0, [16, 64, 256, 256, 256, 256, 256, 256, 256, 256]),  # a wider bound: faster
        (64, 2.0, [64] * 10),  # in the region from the start: it stays
        (16, 1.0, [16] * 10),  # max_change 1: never changes
    ],
)
def test_the_run_moves_toward_the_region_within_the_bound(initial, max_change, expected):
    policy = BeaconGuidedPolicy(synthetic(), max_change=max_change, top_k=1)
    sizes = drive(policy, initial)
    assert sizes == expected
    assert all(max(a, b) / min(a, b) <= max_change for a, b in zip(sizes, sizes[1:]))
    path = distances(policy, sizes)
    if max_change > 1 and initial != 64:
        assert all(later < earlier for earlier, later in zip(path, path[1:])), path
        assert path[-1] < path[0] / 5
    else:
        assert path == pytest.approx([path[0]] * 10)


def test_stages_decide_every_stage_epochs_and_keep_the_size_inside():
    policy = BeaconGuidedPolicy(synthetic(), stage_epochs=2, top_k=1)
    assert drive(policy, 16, epochs=6) == [16, 16, 32, 32, 64, 64]
    assert [d["epoch"] for d in policy.decisions] == [2, 4]


def test_before_the_first_measurement_and_after_training_the_size_stays():
    policy = BeaconGuidedPolicy(synthetic(), top_k=1)
    assert policy.size_for(0, 0, context(None)) == 16  # the loader's own size
    step, metrics = followed([(16, EPOCHS)])
    assert policy.size_for(EPOCHS, step, context(16, metrics)) == 16  # the "epoch" after the last
    nan = {"fisher/C_bar": math.nan, "fisher/L": 0.5}  # every c_k so far non-finite
    assert policy.size_for(1, 64, context(16, nan)) == 16 and math.isnan(policy.decisions[-1]["C_bar"])


def test_a_decided_epoch_is_replayed_and_the_state_round_trips():
    policy = BeaconGuidedPolicy(synthetic(), top_k=1)
    drive(policy, 16, epochs=4)
    state = json.loads(json.dumps(policy.state_dict()))  # plain data, as in a checkpoint
    resumed = BeaconGuidedPolicy(synthetic(), top_k=1)
    resumed.load_state_dict(state)
    assert resumed.decisions == policy.decisions
    assert resumed.size_for(2, 0, context(32)) == policy.decisions[1]["size"] == 64  # replayed, not re-read
    # right after a resume, a decision without a reading (the checkpoint preceded it) keeps the size
    assert resumed.size_for(4, 10, context(64)) == 64
    with pytest.raises(ValueError, match=r"attach FisherSpectrum"):  # but only that one
        resumed.size_for(5, 12, context(64))
    other = BeaconGuidedPolicy(synthetic(SIZES[:-1]), top_k=1)
    with pytest.raises(ValueError, match=r"steered by beacons \['s16'.*'s256'\].*same beacon runs"):
        other.load_state_dict(state)


def test_validate_refuses_what_the_beacons_cannot_guide():
    policy = BeaconGuidedPolicy(synthetic(), top_k=1)
    policy.validate(context(None))
    with pytest.raises(ValueError, match=r"beacons trained 10 epochs but this run trains max_epochs=20"):
        policy.validate(context(None, max_epochs=20))
    with pytest.raises(ValueError, match=r"set Trainer\(max_epochs"):
        policy.validate(PolicyContext(max_epochs=None, initial_size=16, callbacks=FISHER_EVERY_STEP))
    with pytest.raises(ValueError, match=r"attach FisherSpectrum\(every_n_steps=1\)"):
        policy.validate(PolicyContext(max_epochs=EPOCHS, initial_size=16))
    with pytest.raises(
        ValueError, match=r"measured every 1 steps but this run's FisherSpectrum measures every 5"
    ):
        policy.validate(
            PolicyContext(max_epochs=EPOCHS, initial_size=16, callbacks={"fisher": {"every_n_steps": 5}})
        )
    with pytest.raises(ValueError, match=r"needs the 6 lowest-error beacons but only 5"):
        BeaconGuidedPolicy(synthetic(), top_k=6).validate(context(None))
    with pytest.raises(ValueError, match=r"candidate size 48 has no beacon"):
        BeaconGuidedPolicy(synthetic(), sizes=[16, 48], top_k=1).validate(context(None))
    with pytest.raises(
        ValueError, match=r"no candidate size \[16, 32\] is within ×2.0 of the initial batch size 128"
    ):
        BeaconGuidedPolicy(synthetic(), sizes=[16, 32], top_k=1).validate(context(None, initial=128))
    unfinished = Landscape(
        tuple(beacon_from_records(f"s{s}", rows(s)[:5], error=0.1, max_epochs=EPOCHS) for s in SIZES),
        max_epochs=EPOCHS,
    )
    with pytest.raises(ValueError, match=r"recorded up to 50% of training.*must have finished"):
        BeaconGuidedPolicy(unfinished, top_k=1).validate(context(None))


def test_several_learning_rates_need_lr():
    both = Landscape(
        tuple(
            beacon_from_records(f"s{s}-lr{lr}", rows(s, lr), error=lr + s / 1000, max_epochs=EPOCHS)
            for s in SIZES
            for lr in (0.1, 0.2)
        ),
        max_epochs=EPOCHS,
    )
    with pytest.raises(ValueError, match=r"several beacons ran at batch size 16.*pass `lr`"):
        BeaconGuidedPolicy(both, top_k=1).validate(context(None))
    BeaconGuidedPolicy(both, top_k=1, lr=0.2).validate(context(None))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_change": 0.5}, ValueError, "max_change"),
        ({"max_change": math.inf}, ValueError, "max_change"),
        ({"stage_epochs": 0}, ValueError, "stage_epochs"),
        ({"top_k": 1.5}, TypeError, "top_k"),
        ({"sizes": []}, ValueError, "sizes"),
        ({"sizes": [16, 0]}, ValueError, r"sizes\[1\]"),
        ({"lr": -0.1}, ValueError, "lr"),
        ({"metric": None}, TypeError, "metric"),
    ],
)
def test_bad_arguments_are_refused_naming_them(kwargs, error, match):
    with pytest.raises(error, match=match):
        BeaconGuidedPolicy(synthetic(), **kwargs)


def test_the_landscape_knows_its_layout():
    with pytest.raises(ValueError, match="`every_n_steps` must be None or an int >= 1"):
        Landscape(synthetic().beacons, every_n_steps=0)


# -- real beacon runs, written by short fits ---------------------------------------------------

TINY_SAMPLES, TINY_EPOCHS = 32, 4
ACCURACY = {4: 0.6, 8: 0.8, 16: 0.9}
"""The ``test/acc`` each beacon run logs: the region (top_k=1) is the size-16 beacon."""


def fit_beacon(
    trainer_for, tiny_module, root: Path, size: int, every_n_steps: int = 1, fisher: bool = True
) -> Path:
    """A beacon run: the tiny module at ``size`` for 4 epochs with FisherSpectrum; its run folder."""
    logger = CSVLogger(root, name=f"s{size}")
    callbacks = [FisherSpectrum(every_n_steps=every_n_steps)] if fisher else []
    trainer = trainer_for(callbacks, max_epochs=TINY_EPOCHS, logger=logger)
    trainer.fit(tiny_module(samples=TINY_SAMPLES, batch_size=size))
    logger.log_metrics({"test/acc": ACCURACY[size]}, step=trainer.global_step)
    logger.save()
    return Path(logger.log_dir)


@pytest.fixture
def beacon_runs(trainer_for, tiny_module, tmp_path) -> dict[int, Path]:
    return {size: fit_beacon(trainer_for, tiny_module, tmp_path / "beacons", size) for size in ACCURACY}


def test_the_landscape_is_read_from_run_folders_and_from_a_sweep_folder(beacon_runs, tmp_path):
    landscape = landscape_from_runs([str(p) for p in beacon_runs.values()], max_epochs=TINY_EPOCHS)
    assert (landscape.max_epochs, landscape.every_n_steps) == (TINY_EPOCHS, 1)
    for (size, folder), beacon in zip(beacon_runs.items(), landscape.beacons):
        table = load_fisher_spectrum(folder)
        assert (beacon.name, beacon.batch_size, beacon.lr) == (str(folder), size, 0.05)
        assert beacon.error == pytest.approx(1 - ACCURACY[size])
        np.testing.assert_array_equal(beacon.C_bar, [row["C_bar"] for row in table])
        np.testing.assert_array_equal(
            beacon.count, [(e + 1) * TINY_SAMPLES // size for e in range(TINY_EPOCHS)]
        )
    # the sweep layout: <out>/<run name>/<run folder>; each run named by its sweep folder
    sweep = landscape_from_runs(tmp_path / "beacons", max_epochs=TINY_EPOCHS)
    assert [b.name for b in sweep.beacons] == ["s16", "s4", "s8"]
    by_loss = landscape_from_runs(
        tmp_path / "beacons", metric="val_loss", higher_is_better=False, max_epochs=4
    )
    assert all(0 < b.error < 10 for b in by_loss.beacons)
    (beacon_runs[8] / "config.yaml").write_text("trainer:\n  max_epochs: 4\n")  # LightningCLI's copy
    assert landscape_from_runs(beacon_runs[8]).max_epochs == 4


def test_bad_beacon_folders_are_refused_clearly(beacon_runs, trainer_for, tiny_module, tmp_path):
    folder = beacon_runs[8]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        landscape_from_runs(tmp_path / "nowhere", max_epochs=4)
    with pytest.raises(ValueError, match=r"no trainer.max_epochs in its config.yaml; pass `max_epochs`"):
        landscape_from_runs(folder)
    with pytest.raises(
        ValueError, match=r"recorded epochs up to 3 of max_epochs=5; a beacon must have finished"
    ):
        landscape_from_runs(folder, max_epochs=5)
    with pytest.raises(ValueError, match=r"No scalar 'val/acc'.*tags: \[.*'test/acc'"):
        landscape_from_runs(folder, metric="val/acc", max_epochs=4)
    with pytest.raises(ValueError, match="at least one"):
        landscape_from_runs([], max_epochs=4)
    without = fit_beacon(trainer_for, tiny_module, tmp_path / "sweep", 4, fisher=False)
    with pytest.raises(ValueError, match=r"'.*s4' has no FisherSpectrum records.*attach FisherSpectrum"):
        landscape_from_runs(tmp_path / "sweep", max_epochs=4)
    (without / "fisher_spectrum.csv").write_text("epoch,step,C_bar,L,lr,batch_size\n")  # an empty table
    with pytest.raises(ValueError, match=r"has no FisherSpectrum records"):
        landscape_from_runs(without, max_epochs=4)
    every_two = fit_beacon(trainer_for, tiny_module, tmp_path / "two", 4, every_n_steps=2)
    with pytest.raises(
        ValueError, match=r"disagree on max_epochs or FisherSpectrum's every_n_steps.*every_n_steps=2"
    ):
        landscape_from_runs([folder, every_two], max_epochs=4)
    copied = shutil.copytree(folder, tmp_path / "copy")
    (copied / "lightning_tricks.json").unlink()
    with pytest.raises(ValueError, match="records no FisherSpectrum every_n_steps"):
        landscape_from_runs(copied, max_epochs=4)


class DecisionProbe(pl.Callback):
    """Saves this rank's scheduler history, policy decisions and batch lengths at the end of training."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.lengths: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lengths.append((trainer.current_epoch, len(batch[0])))

    def on_train_end(self, trainer, pl_module):
        scheduler = next(c for c in trainer.callbacks if isinstance(c, BatchSizeScheduler))
        record = {
            "history": scheduler.history,
            "decisions": scheduler.policy.decisions,
            "lengths": self.lengths,
        }
        torch.save(record, self.directory / f"decisions{trainer.global_rank}.pt")


def guided_fit(trainer_for, tiny_module, landscape, root: Path, **overrides):
    policy = BeaconGuidedPolicy(landscape, top_k=1)
    fisher, scheduler = FisherSpectrum(), BatchSizeScheduler(policy)
    callbacks = [fisher, scheduler, *overrides.pop("callbacks", [])]
    ckpt_path, batch_size = overrides.pop("ckpt_path", None), overrides.pop("batch_size", 4)
    options = {"max_epochs": TINY_EPOCHS, "default_root_dir": root, "limit_val_batches": 0, **overrides}
    trainer = trainer_for(callbacks, **options)
    trainer.fit(tiny_module(samples=TINY_SAMPLES, batch_size=batch_size), ckpt_path=ckpt_path)
    return policy, fisher, scheduler


def test_a_guided_fit_decides_from_fisher_spectrums_live_point(
    beacon_runs, trainer_for, tiny_module, tmp_path
):
    """Each decision is decide_batch_size at the point FisherSpectrum's history gives: C̄_K and L_K of the
    last measurement before the stage and K the measurements so far, counted here independently."""
    landscape = landscape_from_runs(list(beacon_runs.values()), max_epochs=TINY_EPOCHS)
    policy, fisher, scheduler = guided_fit(trainer_for, tiny_module, landscape, tmp_path / "guided")
    assert [d["epoch"] for d in policy.decisions] == [1, 2, 3]
    current = 4
    for decision in policy.decisions:
        before = [r for r in fisher.history if r["step"] < decision["step"]]
        point = FisherPoint(before[-1]["C_bar"], before[-1]["L"], len(before))
        assert (decision["C_bar"], decision["L"], decision["K"]) == (point.C_bar, point.L, point.count)
        expected = decide_batch_size(
            landscape, point, decision["epoch"], [4, 8, 16], current, max_epochs=TINY_EPOCHS, top_k=1
        )
        assert (
            decision["size"] == expected.size
            and max(current, expected.size) / min(current, expected.size) <= 2
        )
        current = expected.size
    sizes = [size for _, size, _ in scheduler.epochs]
    assert sizes == [4] + [d["size"] for d in policy.decisions]
    assert sizes[-1] > sizes[0], "the run moves toward the size-16 beacon's region"
    assert {(r["epoch"], r["batch_size"]) for r in fisher.history} == set(enumerate(sizes))


def test_a_fit_without_fisher_spectrum_is_refused_at_fit_start(trainer_for, tiny_module):
    scheduler = BatchSizeScheduler(BeaconGuidedPolicy(synthetic_tiny(), top_k=1))
    with pytest.raises(ValueError, match=r"attach FisherSpectrum\(every_n_steps=1\)"):
        trainer_for([scheduler], max_epochs=TINY_EPOCHS).fit(tiny_module(samples=TINY_SAMPLES, batch_size=4))


def test_a_fit_of_another_length_is_refused_at_fit_start(trainer_for, tiny_module):
    scheduler = BatchSizeScheduler(BeaconGuidedPolicy(synthetic_tiny(), top_k=1))
    with pytest.raises(ValueError, match=r"beacons trained 4 epochs but this run trains max_epochs=6"):
        trainer_for([FisherSpectrum(), scheduler], max_epochs=6).fit(
            tiny_module(samples=TINY_SAMPLES, batch_size=4)
        )


def synthetic_tiny() -> Landscape:
    """Beacons at 4, 8, 16 over the tiny module's 32 samples and 4 epochs (lowest error at 16)."""

    def table(size: int) -> list[dict]:
        steps = TINY_SAMPLES // size
        return [
            {"epoch": e, "step": (e + 1) * steps - 1, "C_bar": 2.0 * size, "L": (e + 1) * steps / size, "lr": 0.05,
             "batch_size": size}
            for e in range(TINY_EPOCHS)
        ]  # fmt: skip

    beacons = [
        beacon_from_records(f"s{s}", table(s), error=1 / s, max_epochs=TINY_EPOCHS) for s in (4, 8, 16)
    ]
    return Landscape(tuple(beacons), max_epochs=TINY_EPOCHS, every_n_steps=1)


def test_resume_replays_the_decisions_and_trains_the_same_sizes(
    beacon_runs, trainer_for, tiny_module, tmp_path
):
    """A checkpoint saved at epoch 1's end (after the scheduler decided epoch 2) resumes with the same
    decisions, read back from the checkpoint, and the same sizes as the uninterrupted fit."""
    landscape = landscape_from_runs(list(beacon_runs.values()), max_epochs=TINY_EPOCHS)
    full_policy, _, full = guided_fit(trainer_for, tiny_module, landscape, tmp_path / "full")
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True
    )
    guided_fit(
        trainer_for, tiny_module, landscape, tmp_path / "a", callbacks=[checkpoint], enable_checkpointing=True
    )
    path = next((tmp_path / "ckpt").glob("epoch=1-*.ckpt"))
    policy, _, resumed = guided_fit(trainer_for, tiny_module, landscape, tmp_path / "b", ckpt_path=path)
    assert resumed.history == full.history and resumed.epochs == full.epochs
    assert policy.decisions == full_policy.decisions
    assert len({size for _, size, _ in full.epochs}) > 1, "the schedule changes, so the replay is tested"


def test_a_checkpoint_saved_before_the_decision_resumes_deciding_as_the_uninterrupted_fit(
    trainer_for, tiny_module, tmp_path
):
    """A checkpoint saved on epoch 0's last batch precedes the scheduler's epoch-end decision; the resumed
    fit reads the C̄_K and L_K FisherSpectrum restored from the checkpoint (callback_metrics are not
    checkpointed) and makes the uninterrupted fit's decisions, point for point."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=8)
    policy, _, first = guided_fit(
        trainer_for,
        tiny_module,
        synthetic_tiny(),
        tmp_path / "a",
        callbacks=[checkpoint],
        enable_checkpointing=True,
    )
    assert [d["size"] for d in policy.decisions] == [8, 16, 16]
    path = next((tmp_path / "ckpt").glob("*step=8.ckpt"))
    resumed_policy, _, resumed = guided_fit(
        trainer_for, tiny_module, synthetic_tiny(), tmp_path / "b", ckpt_path=path
    )
    assert resumed_policy.decisions == policy.decisions
    assert resumed.epochs == first.epochs


def test_ddp_every_rank_trains_rank_zeros_decisions(trainer_for, tiny_module, tmp_path):
    """2 processes (gloo), 2 samples each per batch (a global 4): FisherSpectrum's live point is reduced
    over the ranks, so both decide alike, and both train rank 0's sizes."""
    probe = DecisionProbe(tmp_path)
    overrides = dict(callbacks=[probe], strategy="ddp_fork", devices=2, batch_size=2)
    guided_fit(trainer_for, tiny_module, synthetic_tiny(), tmp_path / "ddp", **overrides)
    records = [torch.load(tmp_path / f"decisions{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert (
        records[0]["history"] == records[1]["history"] and records[0]["decisions"] == records[1]["decisions"]
    )
    sizes = [4] + [d["size"] for d in records[0]["decisions"]]
    assert [r["size"] for r in records[0]["history"]] == [
        s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]
    ]
    assert sizes == [4, 8, 16, 16], "toward the size-16 beacon, one doubling an epoch"
    for record in records:  # each rank's batch: half the global size of its epoch
        assert {(epoch, length) for epoch, length in record["lengths"]} == {
            (e, s // 2) for e, s in enumerate(sizes)
        }


def test_the_shipped_grid_builds_the_policy_from_yaml(beacon_runs, tmp_path, monkeypatch):
    """The beacon-guided run of seed004_guided.grid.yaml, its beacons pointed at the tiny runs: LightningCLI
    builds BeaconGuidedPolicy from class_path/init_args and one batch trains with it."""
    grid = load_grid(
        Path(__file__).resolve().parents[1] / "configs" / "experiments" / "seed004_guided.grid.yaml"
    )
    run = next(run for run in grid.runs if run.name.startswith("beacon-guided"))
    overrides = dict(run.overrides)
    policy = overrides["trainer.callbacks.init_args.policy"]
    assert policy["class_path"] == "lightning_tricks.beacon_policy.BeaconGuidedPolicy"
    policy = {
        **policy,
        "init_args": {
            **policy["init_args"],
            "beacons": str(tmp_path / "beacons"),
            "lr": 0.05,
            "max_epochs": 4,
        },
    }
    overrides.update({"trainer.callbacks.init_args.policy": policy, "trainer.fast_dev_run": 1})
    overrides.update(
        {"data.init_args.image_size": 8, "data.init_args.batch_size": 8, "trainer.enable_progress_bar": False}
    )
    monkeypatch.chdir(tmp_path)
    arguments = [part for key, value in overrides.items() for part in (f"--{key}", format_value(value))]
    cli = TricksCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        **CLI_OPTIONS,
        args=["fit", "-c", str(grid.base), *arguments],
    )
    scheduler = next(c for c in cli.trainer.callbacks if isinstance(c, BatchSizeScheduler))
    assert isinstance(scheduler.policy, BeaconGuidedPolicy) and scheduler.policy.sizes == (4, 8, 16)
    assert scheduler.policy.beacons == ("s16", "s4", "s8") and scheduler.size == 8
