"""Every shipped LightningCLI config parses, instantiates and runs one training batch."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_tricks.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")  # the demo config pins torch threads; restore them

ROOT = Path(__file__).resolve().parents[1] / "configs"
# the experiments' base configs too; their grid files (`*.grid.yaml`) are tested in test_sweep.py
CONFIGS = sorted(ROOT.glob("*.yaml")) + sorted(
    path for path in (ROOT / "experiments").glob("*.yaml") if not path.name.endswith(".grid.yaml")
)


def test_there_are_configs():
    assert len(CONFIGS) >= 4
    assert sum(path.parent.name == "experiments" for path in CONFIGS) >= 5


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: str(path.relative_to(ROOT).with_suffix("")))
def test_config_runs_one_batch(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs write logs/ relative to the working directory
    main(
        [
            "fit",
            "-c",
            str(config),
            "--trainer.fast_dev_run",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--data.init_args.image_size",
            "8",
            "--data.init_args.batch_size",
            "8",
        ]
    )
    assert not (tmp_path / "logs").exists(), "fast_dev_run writes no logs"
