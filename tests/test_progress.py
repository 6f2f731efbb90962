"""RunProgressBar: one bar per fit, a bounded number of redraws, the whole run counted."""

from __future__ import annotations

import re

import pytest

from lightning_tricks.progress import RunProgressBar


def redraws(text: str) -> list[str]:
    """Every drawn state of a tqdm bar (carriage-return separated pieces showing ``n/total``)."""
    return [part for part in re.split(r"[\r\n]", text) if re.search(r"\d+/\d+ \[", part)]


@pytest.mark.parametrize("updates", [1, 4])
def test_one_bar_for_the_fit_redrawn_at_most_updates_times(trainer_for, tiny_module, capsys, updates):
    trainer = trainer_for(
        [RunProgressBar(updates=updates)], max_epochs=3, enable_progress_bar=True, limit_val_batches=2
    )
    trainer.fit(tiny_module(samples=32))  # 8 steps an epoch, 24 in all, validation every epoch
    drawn = redraws(capsys.readouterr().err)
    assert all(state.startswith("fit:") for state in drawn), drawn  # no epoch or validation bars
    assert 2 <= len(drawn) <= updates + 3, drawn  # first draw, the updates, the last (and its close)
    assert "24/24" in drawn[-1] and "epoch=2" in drawn[-1]


def test_the_default_bar_draws_far_more(trainer_for, tiny_module, capsys):
    """What RunProgressBar is for: Lightning's own bar redraws per batch, epoch and validation."""
    trainer_for([], max_epochs=3, enable_progress_bar=True, limit_val_batches=2).fit(tiny_module(samples=32))
    captured = capsys.readouterr()
    assert len(redraws(captured.out + captured.err)) > 20


def test_updates_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="`updates` must be an integer >= 1"):
        RunProgressBar(updates=0)
