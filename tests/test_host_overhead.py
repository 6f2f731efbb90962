"""The exact per-step counters behind ``benchmarks/bench_host_overhead.py`` (smoke test)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from lightning_tricks import FisherSpectrum, RandomGradient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import count_table, format_count_table  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


class ForwardHook(Callback):
    """A Python forward hook on the module's first layer: one hook call a step."""

    def on_fit_start(self, trainer, pl_module):
        pl_module.net[0].register_forward_hook(lambda module, args, output: None)


def test_counts_per_step_plain_totals_and_what_callbacks_add(trainer_for, tiny_module):
    extra = {"plain": [], "RandomGradient": [RandomGradient(seed=0)], "hook": [ForwardHook()]}

    def fit(config, counter):
        trainer_for([counter, *extra[config]]).fit(tiny_module(samples=32))  # 8 steps

    table = count_table(fit, dict.fromkeys(extra), range(2, 6))
    assert list(table) == list(extra)
    assert list(table["plain"]) == ["aten_ops", "kernel_ops", "python_calls", "hook_calls", "syncs"]
    plain, random_gradient, hook = table["plain"], table["RandomGradient"], table["hook"]
    assert plain["hook_calls"] == 0 and plain["syncs"] == 0 and plain["aten_ops"] > 50
    assert random_gradient["aten_ops"] == 1 and random_gradient["hook_calls"] == 0
    assert random_gradient["syncs"] == 0 and random_gradient["python_calls"] > 0
    assert hook["hook_calls"] == 1 and hook["aten_ops"] == 0
    lines = format_count_table(table)
    assert len(lines) == 4 and lines[2].split()[:2] == ["RandomGradient", "+1"]


def test_fisher_spectrum_measured_step_counts(trainer_for, tiny_module):
    """FisherSpectrum on a two-layer net, every 3rd step: a measured step makes two hook calls a
    layer (forward hook, output-gradient hook; no forward pre-hook, no parameter hook: those of
    recorded parameters are out of torch's dicts during the backward), one host sync (F̃'s
    transfer) and at most 75 top-level aten ops (69: the engine's, and the statistics of F̃ in
    NumPy on the host, 7 ops there; 176 before that and the unfused engine; the ghost Gram's batched
    product counts its views, which launch nothing); an unmeasured step adds no op, hook call or
    sync."""

    def fit(config, counter):
        extra = [FisherSpectrum(every_n_steps=3)] if config == "fisher" else []
        trainer_for([counter, *extra]).fit(tiny_module(samples=32))  # 8 steps

    table = count_table(fit, {"plain": None, "fisher": 3}, range(2, 6))
    measured, unmeasured = table["fisher, measured step"], table["fisher, unmeasured step"]
    assert measured["hook_calls"] == 2 * 2 and measured["syncs"] == 1
    assert 0 < measured["aten_ops"] <= 75
    assert unmeasured["aten_ops"] == unmeasured["hook_calls"] == unmeasured["syncs"] == 0


def test_lockstep_fits_take_turns_one_step_each(tmp_path):
    """The benchmark's paired runs: two fits in two threads hold the turn alternately — setup,
    then one training step each, then teardown — and each times every one of its steps."""
    from bench_host_overhead import Lockstep, fit_pair

    lockstep = Lockstep()
    first, second = fit_pair(("plain", "RandomGradient()"), 5, str(tmp_path), lockstep)
    assert sorted(first) == sorted(second) == list(range(5))
    assert min(*first.values(), *second.values()) > 0
    assert lockstep.turns == [0, 1] * (5 + 2)  # setup, 5 steps' windows, train end's, teardown


def test_lockstep_failure_in_one_fit_is_raised_without_deadlock(tmp_path):
    from bench_host_overhead import fit_pair

    with pytest.raises(KeyError, match="no such configuration"):
        fit_pair(("plain", "no such configuration"), 3, str(tmp_path))
