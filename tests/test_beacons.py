"""The beacon landscape and the batch-size rule, on synthetic beacons with a known geometry.

Each synthetic beacon trains ``SAMPLES`` samples for ``EPOCHS`` epochs at batch size s, measuring
every step: c_k = 10·√(s/16) at every step (so C̄_K is that constant) and l_k = lr/√s (Tr F̃ ∝ s),
so after k steps L_K = k·lr/√s. The lowest error is at s = 64 — as in seed 004, the optimum lies
between the small and the large batches.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_tricks.beacons import (
    Beacon,
    FisherPoint,
    Landscape,
    beacon_from_records,
    decide_batch_size,
    predict,
    target_region,
)

SAMPLES, EPOCHS = 1024, 10
SIZES = [16, 32, 64, 128, 256]


def level(size: int) -> float:
    return 10 * math.sqrt(size / 16)


def rows(size: int, lr: float = 0.1, every_n_steps: int = 1) -> list[dict]:
    """FisherSpectrum's per-epoch rows of the synthetic beacon (one per epoch, its last measured step)."""
    steps = SAMPLES // size
    table = []
    for epoch in range(EPOCHS):
        last_step = (epoch + 1) * steps - 1
        measured = last_step // every_n_steps + 1
        table.append(
            {"epoch": epoch, "step": last_step, "C_bar": level(size), "L": measured * lr / math.sqrt(size),
             "lr": lr, "batch_size": size}
        )  # fmt: skip
    return table


def error_of(size: int) -> float:
    return 0.05 + 0.01 * abs(math.log2(size / 64))


def landscape(sizes=SIZES, lrs=(0.1,)) -> Landscape:
    return Landscape(
        tuple(
            beacon_from_records(f"s{s}-lr{lr}", rows(s, lr), error=error_of(s) + lr, max_epochs=EPOCHS)
            for s in sizes
            for lr in lrs
        )
    )


START = FisherPoint(math.nan, 0.0, 0)


# -- beacons ----------------------------------------------------------------------------------------


def test_beacon_from_records_keeps_the_last_row_of_each_epoch() -> None:
    history = [
        {"epoch": 0, "step": 0, "C_bar": 5.0, "L": 0.1, "lr": 0.1, "batch_size": 32},
        {"epoch": 0, "step": 2, "C_bar": 6.0, "L": 0.3, "lr": 0.1, "batch_size": 32},
        {"epoch": 1, "step": 4, "C_bar": 7.0, "L": 0.5, "lr": 0.01, "batch_size": 32},
    ]
    beacon = beacon_from_records("s32-lr0.1", history, error=0.1, max_epochs=4, every_n_steps=2)
    np.testing.assert_array_equal(beacon.progress, [0.25, 0.5])
    np.testing.assert_array_equal(beacon.C_bar, [6.0, 7.0])
    np.testing.assert_array_equal(beacon.L, [0.3, 0.5])
    np.testing.assert_array_equal(beacon.count, [2, 3])  # measured steps 0, 2 | 0, 2, 4
    assert (beacon.batch_size, beacon.lr) == (32, 0.1)


def test_a_beacons_size_is_its_loaders_not_a_ragged_last_batch() -> None:
    """1257 digits at 512: batches of 512, 512, 233; the epoch table of an older FisherSpectrum wrote
    the last measured batch's size (233) in some rows — the beacon is still the s512 one."""
    rows = [
        {"epoch": 0, "step": 2, "C_bar": 5.0, "L": 0.1, "lr": 0.1, "batch_size": 233},
        {"epoch": 1, "step": 4, "C_bar": 6.0, "L": 0.2, "lr": 0.1, "batch_size": 512},
    ]
    assert beacon_from_records("s512-lr0.1", rows, error=0.1, max_epochs=2).batch_size == 512


def test_beacon_point_interpolates_the_sums() -> None:
    """Σc_k = K·C̄_K, K and L_K are linear between recorded points; C̄_K is their ratio."""
    beacon = Beacon("b", 32, 0.1, 0.1, progress=[0.5, 1.0], C_bar=[2.0, 5.0], L=[1.0, 3.0], count=[10, 30])
    origin = beacon.at(0.0)
    assert math.isnan(origin.C_bar) and (origin.L, origin.count) == (0.0, 0.0)
    middle = beacon.at(0.75)  # Σc from 20 to 150 → 85, K from 10 to 30 → 20
    assert (middle.C_bar, middle.L, middle.count) == pytest.approx((85 / 20, 2.0, 20))
    quarter = beacon.at(0.25)  # from the origin: Σc 10, K 5, L 0.5
    assert (quarter.C_bar, quarter.L, quarter.count) == pytest.approx((2.0, 0.5, 5))
    assert beacon.at(1.0) == FisherPoint(5.0, 3.0, 30.0)


def test_beacon_cannot_extrapolate() -> None:
    beacon = Beacon("s32-half", 32, 0.1, 0.1, progress=[0.25, 0.5], C_bar=[2, 2], L=[1, 2], count=[5, 10])
    with pytest.raises(ValueError, match=r"'s32-half' was recorded up to 50% of training.*60%"):
        beacon.at(0.6)


@pytest.mark.parametrize(
    ("records", "match"),
    [
        ([], "no rows"),
        ([{"epoch": 0, "step": 0, "C_bar": 1.0}], r"lack \['L', 'batch_size', 'lr'\]"),
        ([{"epoch": 12, "step": 0, "C_bar": 1.0, "L": 0.1, "lr": 0.1, "batch_size": 8}], "epoch 12 but `max_epochs` is 10"),
    ],
)  # fmt: skip
def test_beacon_from_bad_records(records, match) -> None:
    with pytest.raises(ValueError, match=match):
        beacon_from_records("s8", records, error=0.1, max_epochs=EPOCHS)


def test_beacon_rejects_bad_trajectories() -> None:
    with pytest.raises(ValueError, match="increase strictly"):
        Beacon("b", 8, 0.1, 0.1, progress=[0.5, 0.5], C_bar=[1, 1], L=[1, 1], count=[1, 2])
    with pytest.raises(ValueError, match="non-finite"):
        Beacon("b", 8, 0.1, 0.1, progress=[0.5, 1.0], C_bar=[1, math.nan], L=[1, 1], count=[1, 2])
    with pytest.raises(ValueError, match="equal, non-zero lengths"):
        Beacon("b", 8, 0.1, 0.1, progress=[0.5, 1.0], C_bar=[1], L=[1, 1], count=[1, 2])


def test_landscape_errors() -> None:
    with pytest.raises(ValueError, match="at least one beacon"):
        Landscape(())
    beacon = landscape([32]).beacons[0]
    with pytest.raises(ValueError, match="distinct"):
        Landscape((beacon, beacon))
    two_lrs = landscape([32], lrs=(0.1, 0.2))
    with pytest.raises(ValueError, match=r"several beacons ran at batch size 32.*pass `lr`"):
        two_lrs.guide(32)
    assert two_lrs.guide(32, lr=0.2).name == "s32-lr0.2"
    assert two_lrs.guide(64, lr=0.2) is None


# -- target region ----------------------------------------------------------------------------------


def test_region_is_the_lowest_error_beacons() -> None:
    region = target_region(landscape(), progress=1.0, top_k=3)
    assert region.names == ("s64-lr0.1", "s128-lr0.1", "s32-lr0.1")  # ties (32, 128) by name
    center_c, center_l = region.center
    assert center_c == pytest.approx((level(32) * level(64) * level(128)) ** (1 / 3))
    final_l = [SAMPLES // s * EPOCHS * 0.1 / math.sqrt(s) for s in (32, 64, 128)]
    assert center_l == pytest.approx(math.prod(final_l) ** (1 / 3))
    assert region.distance(FisherPoint(center_c, center_l, 7)) == 0.0
    assert region.distance(FisherPoint(center_c * math.e, center_l, 7)) == pytest.approx(1.0)


def test_region_at_an_earlier_point_of_training() -> None:
    region = target_region(landscape(), progress=0.3, top_k=1)
    point = region.points[0]
    assert (point.C_bar, point.L) == pytest.approx((level(64), 3 * 16 * 0.1 / 8))


def test_empty_region_is_a_clear_error() -> None:
    no_errors = Landscape(
        tuple(beacon_from_records(f"s{s}", rows(s), error=math.nan, max_epochs=EPOCHS) for s in (32, 64))
    )
    with pytest.raises(ValueError, match=r"only 0 of 2 beacons have a finite error"):
        target_region(no_errors, 1.0, top_k=1)
    with pytest.raises(ValueError, match=r"5 lowest-error beacons but only 2"):
        target_region(landscape([32, 64]), 1.0)
    with pytest.raises(ValueError, match="`top_k`"):
        target_region(landscape(), 1.0, top_k=0)


# -- prediction -------------------------------------------------------------------------------------


def as_tuple(point: FisherPoint) -> tuple[float, float, float]:
    return point.C_bar, point.L, point.count


def test_predict_with_its_own_beacon_follows_it() -> None:
    beacon = landscape([32]).beacons[0]
    assert as_tuple(predict(beacon.at(0.3), beacon, 0.3, 0.8)) == pytest.approx(as_tuple(beacon.at(0.8)))
    assert as_tuple(predict(START, beacon, 0.0, 0.5)) == pytest.approx(as_tuple(beacon.at(0.5)))


def test_predict_adds_the_beacon_increments() -> None:
    """A run at C̄ = 20 after 100 measurements, then a stage like the s16 beacon (c_k = 10, 64 steps)."""
    beacon = landscape([16]).beacons[0]
    point = predict(FisherPoint(20.0, 1.0, 100), beacon, 0.2, 0.3)
    assert point.count == pytest.approx(164)
    assert point.C_bar == pytest.approx((20 * 100 + 10 * 64) / 164)
    assert point.L == pytest.approx(1.0 + 64 * 0.1 / 4)


# -- the decision rule ------------------------------------------------------------------------------


def test_stays_in_the_region() -> None:
    land = landscape()
    for epoch in range(EPOCHS):
        point = land.guide(64).at(epoch / EPOCHS)
        assert decide_batch_size(land, point, epoch, SIZES, 64, max_epochs=EPOCHS, top_k=1).size == 64


@pytest.mark.parametrize(("start", "first"), [(16, 32), (32, 64), (256, 128), (128, 64)])
def test_moves_toward_the_region(start: int, first: int) -> None:
    land = landscape()
    decision = decide_batch_size(land, START, 0, SIZES, start, max_epochs=EPOCHS, top_k=1)
    assert decision.size == first
    assert decision.distances[first] < decision.distances[start]
    assert set(decision.distances) == {s for s in SIZES if start / 2 <= s <= start * 2}


def test_a_larger_max_change_reaches_further() -> None:
    land = landscape()
    assert decide_batch_size(land, START, 0, SIZES, 16, max_change=4.0, max_epochs=EPOCHS, top_k=1).size == 64
    assert decide_batch_size(land, START, 0, SIZES, 16, max_change=1.0, max_epochs=EPOCHS, top_k=1).size == 16


@pytest.mark.parametrize("start", [16, 32, 128, 256])
def test_closed_loop_ends_nearer_than_the_fixed_size_and_respects_bounds(start: int) -> None:
    """Steer every epoch, the run moving as the chosen beacon would (:func:`predict`)."""
    land = landscape()
    point, size = START, start
    for epoch in range(EPOCHS):
        decision = decide_batch_size(land, point, epoch, SIZES, size, max_epochs=EPOCHS, top_k=1)
        assert size / 2 <= decision.size <= size * 2
        point, size = decision.predicted[decision.size], decision.size
    region = target_region(land, 1.0, top_k=1)
    fixed = land.guide(start).at(1.0)
    assert region.distance(point) < 0.2 * region.distance(fixed)


def test_ties_keep_the_current_size() -> None:
    """Two beacons with identical trajectories at 32 and 64: no reason to change."""
    twins = Landscape(
        tuple(
            Beacon(f"s{s}", s, 0.1, error, progress=[0.5, 1.0], C_bar=[5, 5], L=[1, 2], count=[10, 20])
            for s, error in ((32, 0.1), (64, 0.2))
        )
    )
    assert decide_batch_size(twins, START, 0, [32, 64], 64, max_epochs=2, top_k=1).size == 64
    assert decide_batch_size(twins, START, 0, [32, 64], 32, max_epochs=2, top_k=1).size == 32


def test_decides_per_learning_rate() -> None:
    land = landscape(lrs=(0.1, 0.2))
    with pytest.raises(ValueError, match="pass `lr`"):
        decide_batch_size(land, START, 0, SIZES, 32, max_epochs=EPOCHS, top_k=1)
    assert decide_batch_size(land, START, 0, SIZES, 32, max_epochs=EPOCHS, top_k=1, lr=0.1).size == 64


def test_no_beacon_for_any_candidate() -> None:
    with pytest.raises(ValueError, match=r"no beacon for any allowed batch size \[512, 1024\]"):
        decide_batch_size(landscape(), START, 0, [512, 1024], 1024, max_epochs=EPOCHS, top_k=1)


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"epoch": -1}, "`epoch`"),
        ({"epoch": EPOCHS}, "below `max_epochs`"),
        ({"sizes": []}, "`sizes`"),
        ({"sizes": [32, 0]}, r"`sizes\[1\]`"),
        ({"current_size": 2.5}, "`current_size`"),
        ({"max_change": 0.5}, "`max_change`"),
        ({"max_change": math.inf}, "`max_change`"),
        ({"max_epochs": 0}, "`max_epochs`"),
        ({"stage_epochs": 0}, "`stage_epochs`"),
    ],
)
def test_bad_arguments(arguments, match) -> None:
    call = {"epoch": 0, "sizes": SIZES, "current_size": 32, "max_change": 2.0, "max_epochs": EPOCHS}
    call.update(arguments)
    with pytest.raises(ValueError, match=match):
        decide_batch_size(landscape(), START, top_k=1, **call)


def test_bad_points() -> None:
    with pytest.raises(ValueError, match="`count`"):
        FisherPoint(5.0, 1.0, -1)
    with pytest.raises(ValueError, match="`L`"):
        FisherPoint(5.0, math.nan, 3)
    with pytest.raises(ValueError, match="`C_bar`"):
        FisherPoint(math.nan, 1.0, 3)
