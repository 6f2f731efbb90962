"""The beacon landscape of seed 004 and a batch-size rule that steers a run through it.

Seed ``004_e5d92837cb57ce8a.txt`` characterises a run by two running measures of the Fisher
matrix F̃_k, C̄_K (eq. 7) and L_K (eq. 8). Runs at fixed (batch size, learning rate), the
"beacons", each trace a trajectory in the (C̄_K, L_K) plane, and the lowest-error configurations
cluster in an "optimum region" (§1, Fig. 1b; §4.1, Fig. 3). Fig. 1d uses the beacons "to guide
the dynamic sampling training, i.e., we tune the runtime mini-batch size during the training in
order to push the C̄_K and L_K values close to the optimum region"; §4.3 observes that a run
whose batch size changes travels from the region of its old size's beacon toward its new one's.
The seed then uses fixed five-stage schedules; this module closes the loop:

- :func:`beacon_from_records` and :class:`Landscape`: beacon trajectories, from FisherSpectrum's
  tables (what :func:`lightning_tricks.results.load_fisher_spectrum` returns) and final errors;
- :func:`target_region`: where the lowest-error beacons were at a given point of training;
- :func:`decide_batch_size`: the candidate batch size whose beacon, over the next stage, would carry
  the run's (C̄_K, L_K) closest to that region, within a bounded change.

Pure functions and small dataclasses; no Lightning, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_TOP_K = 5
"""Beacons in the target region: seed 004 Fig. 1a–b highlight the five lowest-error configurations
and find them "clustered together in the measurement space"."""


@dataclass(frozen=True)
class FisherPoint:
    """A run's position in the landscape: C̄_K, L_K and K, the number of c_k behind C̄_K.

    K makes C̄_K additive: K·C̄_K = Σ_k c_k (seed 004 eq. 7), as L_K = Σ_k l_k is (eq. 8).
    ``C_bar`` may be NaN while ``count`` is 0 (nothing measured yet).
    """

    C_bar: float
    L: float
    count: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.count) and self.count >= 0):
            raise ValueError(
                f"`count` (K, measurements behind C̄_K) must be finite and >= 0; got {self.count!r}."
            )
        if not (math.isfinite(self.L) and self.L >= 0):
            raise ValueError(f"`L` (L_K, a sum of l_k >= 0) must be finite and >= 0; got {self.L!r}.")
        if self.count > 0 and not (math.isfinite(self.C_bar) and self.C_bar > 0):
            raise ValueError(
                f"`C_bar` (C̄_K, a mean of condition numbers) must be finite and > 0; got {self.C_bar!r}."
            )

    @property
    def c_sum(self) -> float:
        """Σ_k c_k = K·C̄_K (0 before the first measurement)."""
        return self.C_bar * self.count if self.count > 0 else 0.0


@dataclass(frozen=True, eq=False)
class Beacon:
    """One fixed-configuration run: its trajectory through training and its final error.

    ``progress`` is the fraction of training done at each point (strictly increasing, in (0, 1]);
    ``C_bar``, ``L`` and ``count`` are C̄_K, L_K and K there. The trajectory starts at the origin
    (K = 0, L_K = 0) at progress 0.
    """

    name: str
    batch_size: int
    lr: float
    error: float
    progress: np.ndarray
    C_bar: np.ndarray
    L: np.ndarray
    count: np.ndarray
    _sums: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        arrays = {
            key: np.asarray(getattr(self, key), dtype=float) for key in ("progress", "C_bar", "L", "count")
        }
        lengths = {len(value) for value in arrays.values()}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(
                f"beacon {self.name!r}: progress, C_bar, L and count need equal, non-zero lengths."
            )
        progress = arrays["progress"]
        if not (np.all(np.diff(progress) > 0) and 0 < progress[0] and progress[-1] <= 1):
            raise ValueError(
                f"beacon {self.name!r}: `progress` must increase strictly within (0, 1]; got {progress}."
            )
        for key, value in arrays.items():
            if not np.all(np.isfinite(value)):
                raise ValueError(f"beacon {self.name!r}: `{key}` has a non-finite value ({value}).")
            object.__setattr__(self, key, value)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(
                f"beacon {self.name!r}: `batch_size` must be an int >= 1; got {self.batch_size!r}."
            )
        origin = np.zeros((3, 1))
        sums = np.stack([arrays["C_bar"] * arrays["count"], arrays["count"], arrays["L"]])
        object.__setattr__(self, "_sums", np.concatenate([origin, sums], axis=1))

    def at(self, progress: float) -> FisherPoint:
        """The beacon's point at ``progress``: Σc_k, K and L_K interpolated linearly between its
        recorded points (from the origin at progress 0), C̄_K = Σc_k / K.

        Raises:
            ValueError: ``progress`` outside [0, the beacon's last recorded progress].
        """
        last = self.progress[-1]
        if not 0 <= progress <= last + 1e-12:
            raise ValueError(
                f"beacon {self.name!r} was recorded up to {last:.0%} of training; it cannot say where it "
                f"was at {progress:.0%} (a beacon run must have finished)."
            )
        grid = np.concatenate([[0.0], self.progress])
        c_sum, count, total = (float(np.interp(progress, grid, row)) for row in self._sums)
        return FisherPoint(c_sum / count if count > 0 else math.nan, total, count)


def beacon_from_records(
    name: str,
    records: Sequence[Mapping[str, Any]],
    *,
    error: float,
    max_epochs: int,
    every_n_steps: int = 1,
) -> Beacon:
    """A beacon from FisherSpectrum's rows (``fisher_spectrum.csv`` or ``fisher_history.csv``, as
    :func:`lightning_tricks.results.load_fisher_spectrum` / ``load_fisher_history`` return them).

    The last row of each epoch e gives the point at progress (e + 1) / ``max_epochs``; K = step //
    ``every_n_steps`` + 1 (the measured steps 0, n, 2n, … up to that row's step). The batch size
    is the largest in the rows (the run's configured size, as the sweep names it: an epoch's last
    batch may be smaller), the learning rate the first row's.

    Raises:
        ValueError: no rows, a row without ``epoch``/``step``/``C_bar``/``L``/``batch_size``/``lr``,
            or an epoch at or beyond ``max_epochs``.
    """
    if not records:
        raise ValueError(
            f"beacon {name!r}: FisherSpectrum's table has no rows (did the run measure anything?)."
        )
    needed = ("epoch", "step", "C_bar", "L", "batch_size", "lr")
    missing = [key for key in needed if key not in records[0]]
    if missing:
        raise ValueError(f"beacon {name!r}: its rows lack {missing}; pass FisherSpectrum's table rows.")
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1:
        raise ValueError(f"`max_epochs` must be an int >= 1; got {max_epochs!r}.")
    last_of_epoch = {int(row["epoch"]): row for row in records}
    if max(last_of_epoch) >= max_epochs:
        raise ValueError(
            f"beacon {name!r}: it has epoch {max(last_of_epoch)} but `max_epochs` is {max_epochs}."
        )
    rows = [last_of_epoch[epoch] for epoch in sorted(last_of_epoch)]
    return Beacon(
        name=name,
        batch_size=int(max(row["batch_size"] for row in records)),
        lr=float(records[0]["lr"]),
        error=float(error),
        progress=np.array([(row["epoch"] + 1) / max_epochs for row in rows]),
        C_bar=np.array([row["C_bar"] for row in rows]),
        L=np.array([row["L"] for row in rows]),
        count=np.array([row["step"] // every_n_steps + 1 for row in rows]),
    )


@dataclass(frozen=True)
class Landscape:
    """The beacons of a sweep (seed 004 Fig. 1d, Fig. 5), distinct names.

    ``max_epochs`` and ``every_n_steps``, when known, are the beacons' common training length and
    FisherSpectrum cadence (what :func:`beacon_from_records` was given): a run steered through the
    landscape must share both (:class:`lightning_tricks.beacon_policy.BeaconGuidedPolicy` checks).
    """

    beacons: tuple[Beacon, ...]
    max_epochs: int | None = None
    every_n_steps: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "beacons", tuple(self.beacons))
        if not self.beacons:
            raise ValueError("a landscape needs at least one beacon run (run the beacon grid first).")
        names = [beacon.name for beacon in self.beacons]
        if len(set(names)) != len(names):
            raise ValueError(f"beacon names must be distinct; got {sorted(names)}.")
        for name in ("max_epochs", "every_n_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be None or an int >= 1; got {value!r}.")

    def guide(self, batch_size: int, lr: float | None = None) -> Beacon | None:
        """The beacon run at ``batch_size`` (and ``lr``, when given), or ``None``.

        Raises:
            ValueError: several beacons match (pass ``lr`` to choose).
        """
        found = [
            b for b in self.beacons if b.batch_size == batch_size and (lr is None or math.isclose(b.lr, lr))
        ]
        if len(found) > 1:
            raise ValueError(
                f"several beacons ran at batch size {batch_size}: {[b.name for b in found]}; pass `lr` "
                "(the run's initial learning rate) to choose one."
            )
        return found[0] if found else None


@dataclass(frozen=True)
class Region:
    """The target region at one point of training: the lowest-error beacons' points there."""

    names: tuple[str, ...]
    points: tuple[FisherPoint, ...]

    @property
    def center(self) -> tuple[float, float]:
        """(C̄_K, L_K) at the centre: geometric means over the region's beacons."""
        return (
            math.exp(np.mean([math.log(p.C_bar) for p in self.points])),
            math.exp(np.mean([math.log(p.L) for p in self.points])),
        )

    def distance(self, point: FisherPoint) -> float:
        """Euclidean distance from ``point`` to :attr:`center` in (ln C̄_K, ln L_K): relative changes
        count alike on both axes whatever their units (L_K spans decades across batch sizes)."""
        C_center, L_center = self.center
        if not (point.count > 0 and point.L > 0):
            return math.inf
        return math.hypot(math.log(point.C_bar / C_center), math.log(point.L / L_center))


def target_region(landscape: Landscape, progress: float, top_k: int = DEFAULT_TOP_K) -> Region:
    """Where the ``top_k`` lowest-error beacons were at ``progress`` (fraction of training).

    Seed 004 §1 defines the optimum region on the final (C̄_K, L_K) map, "formed by the level set
    with minimum error value in the contour plot", where the five lowest-error configurations
    cluster (Fig. 1a–b). A run being steered needs the region at every point of training, so the
    region at progress p is the best beacons' points at p (at p = 1, the seed's region). Beacons
    are ranked by final error, ties by name; beacons with a non-finite error are left out.

    Raises:
        ValueError: ``top_k`` < 1, fewer than ``top_k`` beacons with a finite error (the region
            would be empty or everything), or a region beacon not recorded up to ``progress``.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"`top_k` must be an int >= 1; got {top_k!r}.")
    ranked = sorted((b for b in landscape.beacons if math.isfinite(b.error)), key=lambda b: (b.error, b.name))
    if len(ranked) < top_k:
        raise ValueError(
            f"the target region needs the {top_k} lowest-error beacons but only {len(ranked)} of "
            f"{len(landscape.beacons)} beacons have a finite error; run more beacons or pass a smaller `top_k`."
        )
    best = ranked[:top_k]
    return Region(tuple(b.name for b in best), tuple(b.at(progress) for b in best))


def predict(point: FisherPoint, beacon: Beacon, start: float, end: float) -> FisherPoint:
    """Where ``point`` goes if the run trains from progress ``start`` to ``end`` as ``beacon`` did.

    Σc_k, K and L_K are sums over measurements (seed 004 eq. 7–8), so the run adds the beacon's
    increments over [start, end]: K' = K + ΔK, Σc' = Σc + Δ(Σc), L' = L + ΔL, and
    C̄' = Σc' / K'. This is §4.3's observation made quantitative: after a change of batch size the
    run moves like the beacon of its new size (ΔK carries the new steps per epoch, ΔL the learning
    rate schedule both share).
    """
    before, after = beacon.at(start), beacon.at(end)
    count = point.count + after.count - before.count
    c_sum = point.c_sum + after.c_sum - before.c_sum
    return FisherPoint(c_sum / count if count > 0 else math.nan, point.L + after.L - before.L, count)


@dataclass(frozen=True)
class BeaconDecision:
    """A batch-size decision and what it was based on (for logging)."""

    size: int
    target: tuple[float, float]
    """The region's centre (C̄_K, L_K) at the end of the stage."""
    predicted: dict[int, FisherPoint]
    """Candidate size → the run's predicted point at the end of the stage."""
    distances: dict[int, float]
    """Candidate size → distance of that point to the target (:meth:`Region.distance`)."""


def decide_batch_size(
    landscape: Landscape,
    point: FisherPoint,
    epoch: int,
    sizes: Sequence[int],
    current_size: int,
    max_change: float = 2.0,
    *,
    max_epochs: int,
    stage_epochs: int = 1,
    lr: float | None = None,
    top_k: int = DEFAULT_TOP_K,
) -> BeaconDecision:
    """The batch size for epochs [epoch, epoch + stage_epochs): the candidate whose beacon would
    bring the run closest to the target region at the end of the stage.

    The rule (seed 004 Fig. 1d, §4.3, made explicit):

    1. candidates: the ``sizes`` within a factor ``max_change`` of ``current_size``
       (current / max_change ≤ s ≤ current · max_change) that have a beacon (at ``lr``);
    2. for each, :func:`predict` the run's point at progress p' = (epoch + stage_epochs) /
       max_epochs had it trained from p = epoch / max_epochs like that beacon;
    3. the target is :func:`target_region` at p', and the size whose prediction is nearest its
       centre in (ln C̄_K, ln L_K) wins; ties (within 1e-9) keep the current size, then the
       smaller change.

    The beacons must share the run's learning-rate schedule and length in epochs (L_K's increments
    depend on both) and FisherSpectrum's ``every_n_steps`` (K counts measurements). ``point`` is
    the run's (C̄_K, L_K, K) at the start of the stage.

    Raises:
        ValueError: bad arguments, an empty target region (see :func:`target_region`), no candidate
            with a beacon, or several beacons at one size (pass ``lr``).
    """
    _check_arguments(epoch, sizes, current_size, max_change, max_epochs, stage_epochs)
    start, end = epoch / max_epochs, min(epoch + stage_epochs, max_epochs) / max_epochs
    region = target_region(landscape, end, top_k)
    allowed = sorted({s for s in sizes if current_size / max_change <= s <= current_size * max_change})
    guides = {s: landscape.guide(s, lr) for s in allowed}
    candidates = {s: beacon for s, beacon in guides.items() if beacon is not None}
    if not candidates:
        raise ValueError(
            f"no beacon for any allowed batch size {allowed} (within ×{max_change} of {current_size}"
            + (f", lr {lr}" if lr is not None else "")
            + f"); beacons: {[b.name for b in landscape.beacons]}."
        )
    predicted = {s: predict(point, beacon, start, end) for s, beacon in candidates.items()}
    distances = {s: region.distance(p) for s, p in predicted.items()}
    best = min(distances.values())

    def preference(size: int) -> tuple[bool, float, int]:
        return size != current_size, abs(math.log(size / current_size)), size

    tied = [s for s, d in distances.items() if d <= best + 1e-9 * max(1.0, best)]
    return BeaconDecision(min(tied, key=preference), region.center, predicted, distances)


def _check_arguments(
    epoch: int, sizes: Sequence[int], current_size: int, max_change: float, max_epochs: int, stage_epochs: int
) -> None:
    for name, value, low in (
        ("max_epochs", max_epochs, 1),
        ("stage_epochs", stage_epochs, 1),
        ("epoch", epoch, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an int >= {low}; got {value!r}.")
    if epoch >= max_epochs:
        raise ValueError(f"`epoch` must be below `max_epochs` ({max_epochs}); got {epoch}.")
    for i, size in enumerate([current_size, *sizes]):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            where = "current_size" if i == 0 else f"sizes[{i - 1}]"
            raise ValueError(f"`{where}` must be an int batch size >= 1; got {size!r}.")
    if not sizes:
        raise ValueError("`sizes` must list at least one batch size.")
    number = isinstance(max_change, (int, float)) and not isinstance(max_change, bool)
    if not (number and 1 <= max_change < math.inf):
        raise ValueError(f"`max_change` must be a finite factor >= 1 (1: never change); got {max_change!r}.")
