"""Every shipped LightningCLI config parses, instantiates and runs one training batch."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from helpers import cli_fit

from lightning_tricks.cli import CLI_OPTIONS, TricksCLI, main

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
    monkeypatch.chdir(tmp_path)  # the configs' default_root_dir is logs/, relative to the working directory
    main(
        cli_fit(
            config,
            {"trainer.fast_dev_run": 1, "data.init_args.image_size": 8, "data.init_args.batch_size": 8},
        )
    )
    assert not list(tmp_path.rglob("events.out.tfevents.*")), "fast_dev_run writes no logs"
    assert [path.name for path in tmp_path.iterdir()] in ([], ["logs"]), "all it writes is under logs/"


class _Resolved(Exception):
    """Carries the config ``TricksCLI`` would instantiate."""


class _ResolveOnly(TricksCLI):
    def instantiate_classes(self) -> None:
        raise _Resolved(self.config[self.subcommand])


def logger_save_dir(args: list[str]) -> str:
    """The ``save_dir`` the CLI hands the config's logger, without building anything."""
    with pytest.raises(_Resolved) as resolved:
        _ResolveOnly(L.LightningModule, L.LightningDataModule, **CLI_OPTIONS, args=args)
    return resolved.value.args[0].trainer.logger.init_args.save_dir


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: str(path.relative_to(ROOT).with_suffix("")))
def test_logs_follow_default_root_dir(config, tmp_path, monkeypatch):
    """The shipped configs log under ``logs/`` by default and under ``--trainer.default_root_dir`` when
    given (issue 20, finding 9: they hard-coded ``save_dir: logs``); an explicit ``save_dir`` still wins."""
    monkeypatch.chdir(tmp_path)
    assert logger_save_dir(["fit", "-c", str(config)]) == "logs"
    moved = str(tmp_path / "elsewhere")
    assert logger_save_dir(["fit", "-c", str(config), "--trainer.default_root_dir", moved]) == moved
    explicit = ["--trainer.default_root_dir", moved, "--trainer.logger.init_args.save_dir", "mine"]
    assert logger_save_dir(["fit", "-c", str(config), *explicit]) == "mine"


def test_a_fit_with_default_root_dir_writes_nothing_under_the_working_directory(tmp_path, monkeypatch):
    """Two steps of the demo with ``--trainer.default_root_dir``: logs and checkpoints land under it."""
    cwd, root = tmp_path / "cwd", tmp_path / "root"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    short = {"trainer.max_steps": 2, "trainer.limit_val_batches": 1, "test_after_fit": False}
    main(
        cli_fit(
            ROOT / "demo.yaml", {"trainer.default_root_dir": root, **short, "data.init_args.image_size": 8}
        )
    )
    run = root / "demo" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    assert list(cwd.iterdir()) == []
