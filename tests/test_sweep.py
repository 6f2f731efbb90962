"""``lightning-tricks sweep``: grid expansion and names, printed commands, SLURM script, local runs."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from lightning_tricks.cli import main as cli_main
from lightning_tricks.sweep import (
    ENTRY_POINT,
    GridError,
    Sweep,
    check_runs,
    format_label,
    format_value,
    load_grid,
    main,
    print_commands,
    slurm_script,
)

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"
GRIDS = sorted(EXPERIMENTS.glob("*.grid.yaml"))
BASE = EXPERIMENTS / "seed000_random_gradient.yaml"
TINY = [
    "trainer.max_steps=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "data.init_args.image_size=8",
]


def write_grid(folder: Path, content: dict, name: str = "tiny.grid.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


@pytest.fixture
def one_thread_subprocesses(monkeypatch):
    """Runs are subprocesses: pin their torch to one thread through the environment."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_values_are_spelled_as_on_the_command_line_and_in_names():
    values = (0.1, 1.0, 1e-5, 5e-2, 1e20, 32, True, None, "edges", [32, 64])
    assert [format_value(v) for v in values] == [
        "0.1",
        "1.0",
        "0.00001",
        "0.05",
        "100000000000000000000.0",
        "32",
        "true",
        "null",
        "edges",
        "[32, 64]",
    ]
    assert [format_label(v) for v in (0.1, 1.0, 0.0, 1e-4, 32, "edges")] == [
        "0.1",
        "1",
        "0",
        "0.0001",
        "32",
        "edges",
    ]
    assert float(format_value(0.1 + 0.2)) == float(format_label(0.1 + 0.2)) == 0.1 + 0.2  # nothing lost


def test_cartesian_product_names_and_overrides(tmp_path):
    grid = load_grid(
        write_grid(
            tmp_path,
            {
                "base": str(BASE),
                "name": "s{data.init_args.batch_size}-lr{model.init_args.lr}-{rg}",
                "grid": {
                    "data.init_args.batch_size": [16, 32],
                    "model.init_args.lr": [0.1, 0.05, 0.0001],
                    "rg": {
                        "on": {"trainer.callbacks.init_args.low": 0.0},
                        "off": {"trainer.callbacks.init_args.low": 1.0},
                    },
                },
            },
        )
    )
    names = [run.name for run in grid.runs]
    assert len(names) == 12 == len(set(names))
    assert names[:3] == ["s16-lr0.1-on", "s16-lr0.1-off", "s16-lr0.05-on"]
    assert "s32-lr0.0001-off" in names
    run = grid.runs[names.index("s32-lr0.05-off")]
    assert run.cli_args() == [
        "--data.init_args.batch_size",
        "32",
        "--model.init_args.lr",
        "0.05",
        "--trainer.callbacks.init_args.low",
        "1.0",
    ]
    assert grid.base == BASE and grid.command == "fit"


def test_list_of_grids_is_the_union_without_duplicates(tmp_path):
    grid = load_grid(
        write_grid(
            tmp_path,
            {
                "base": str(BASE),
                "grid": [
                    {"model.init_args.lr": [0.1], "model.init_args.momentum": [0.0, 0.5]},
                    {"model.init_args.lr": [0.01, 0.1], "model.init_args.momentum": [0.5]},
                ],
            },
        )
    )
    # default names: the last part of each key and its value
    assert [run.name for run in grid.runs] == ["lr0.1-momentum0", "lr0.1-momentum0.5", "lr0.01-momentum0.5"]


@pytest.mark.parametrize("path", GRIDS, ids=lambda path: path.name)
def test_shipped_grids_expand(path):
    grid = load_grid(path)
    assert grid.base.parent == EXPERIMENTS and grid.base.is_file()
    assert len(grid.runs) >= 4
    assert len({run.name for run in grid.runs}) == len(grid.runs)


def test_shipped_grids_cover_the_seeds():
    assert {path.name.split("_")[0] for path in GRIDS} == {"seed000", "seed001", "seed002", "seed004"}
    beacon = [run.name for run in load_grid(EXPERIMENTS / "seed004_beacon.grid.yaml").runs]
    assert "s32-lr0.1" in beacon
    dynamic = [run.name for run in load_grid(EXPERIMENTS / "seed004_dynamic.grid.yaml").runs]
    assert {"s32-to-512-lr0.1", "s512-to-32-lr0.1", "s32-to-512-MS-lr0.1"} <= set(dynamic)


BAD_GRIDS = [
    ({"grid": {"model.init_args.lr": [0.1]}}, "`base` is missing"),
    ({"base": "nowhere.yaml", "grid": {"model.init_args.lr": [0.1]}}, "`base` names 'nowhere.yaml'"),
    ({"base": str(BASE)}, "`grid` is missing"),
    ({"base": str(BASE), "grid": {"model.init_args.lr": [0.1]}, "axes": {}}, "`axes` is not a grid-file key"),
    (
        {"base": str(BASE), "grid": {"model.init_args.lr": 0.1}},
        "`grid.model.init_args.lr` must be a non-empty list",
    ),
    (
        {"base": str(BASE), "grid": {"model.init_args.lr": []}},
        "`grid.model.init_args.lr` must be a non-empty list",
    ),
    ({"base": str(BASE), "grid": {"rg": {"on": 0.0}}}, "`grid.rg.on` must be a non-empty mapping"),
    ({"base": str(BASE), "grid": {}}, "`grid` must be a non-empty mapping"),
    ({"base": str(BASE), "grid": []}, "`grid` is an empty list"),
    (
        {"base": str(BASE), "name": "lr{model.init_args.lrr}", "grid": {"model.init_args.lr": [0.1]}},
        "`name` uses {model.init_args.lrr}, which is not an axis",
    ),
    (
        {"base": str(BASE), "name": "run", "grid": {"model.init_args.lr": [0.1, 0.2]}},
        "`name` gives two different runs the name 'run'",
    ),
    (
        {"base": str(BASE), "name": "a/{model.init_args.lr}", "grid": {"model.init_args.lr": [0.1]}},
        "`name` gives the run name 'a/0.1'",
    ),
    (
        {"base": str(BASE), "command": "train", "grid": {"model.init_args.lr": [0.1]}},
        "`command` must be one of",
    ),
    (
        {"base": str(BASE), "name": "{rg}", "grid": {"rg": {".": {"a.b": 1}, "x": {"a.b": 2}}}},
        "`name` gives the run name '.'",
    ),
    (
        {"base": str(BASE), "name": "..", "grid": {"model.init_args.lr": [0.1]}},
        "`name` gives the run name '..'",
    ),
]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("base: a.yaml\ngrid:\n  model.init_args.lr: [0.1, 0.2\n", 4),  # unclosed list
        ("base: a.yaml\ngrid:\n  x: 1\n   y: 2\n", 4),  # bad indentation
        ('base: a.yaml\ngrid: {x: [1]}\nname: "s{x}\n', 4),  # unclosed quote (opened at line 3)
    ],
)
def test_a_grid_file_that_is_not_yaml_names_the_file_and_the_line(tmp_path, text, line, capsys):
    path = tmp_path / "broken.grid.yaml"
    path.write_text(text)
    where = rf"grid file {re.escape(str(path))}, line \d+, column \d+: not valid YAML"
    with pytest.raises(GridError, match=where) as error:
        load_grid(path)
    assert f"line {line}," in str(error.value)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sweep", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err


@pytest.mark.parametrize(("content", "message"), BAD_GRIDS, ids=lambda x: x if isinstance(x, str) else None)
def test_bad_grid_files_name_the_key(tmp_path, content, message):
    with pytest.raises(GridError, match=re.escape(message)):
        load_grid(write_grid(tmp_path, content))


def test_bad_grid_through_the_cli_exits_with_the_message(tmp_path, capsys):
    path = write_grid(tmp_path, {"base": str(BASE), "grid": {"model.init_args.lr": 0.1}})
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sweep", str(path)])
    assert exit_info.value.code == 2
    assert "`grid.model.init_args.lr` must be a non-empty list" in capsys.readouterr().err


def test_misspelt_key_fails_before_any_run_starts(tmp_path, capsys):
    path = write_grid(tmp_path, {"base": str(BASE), "grid": {"model.init_args.lrr": [0.1, 0.2]}})
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        "run 'lrr0.1' of" in err and "--model.init_args.lrr" in err and "Option 'lrr' is not accepted" in err
    )
    assert not (tmp_path / "out").exists()


def test_print_commands_one_parsable_command_per_run(tmp_path, capsys):
    grid_path = EXPERIMENTS / "seed004_beacon.grid.yaml"
    out = tmp_path / "out dir"  # a space, to check the quoting
    assert main([str(grid_path), "--out", str(out), "--print-commands", "--set", "trainer.max_epochs=1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    grid = load_grid(grid_path)
    assert len(lines) == len(grid.runs) == 35
    for line, run in zip(lines, grid.runs):
        args = shlex.split(line)
        assert args[:4] == ["lightning-tricks", "fit", "-c", str(grid.base)]
        options = dict(zip(args[4::2], args[5::2]))
        assert options["--trainer.max_epochs"] == "1"
        assert options["--trainer.logger.init_args.save_dir"] == str(out)
        assert options["--trainer.logger.init_args.name"] == run.name
        assert options["--trainer.logger.init_args.version"] == ""
        size, lr = re.fullmatch(r"s(\d+)-lr([\d.]+)", run.name).groups()
        assert options["--data.init_args.batch_size"] == size and options["--model.init_args.lr"] == lr


def test_slurm_script_runs_task_i_through_the_sweep(tmp_path, capsys):
    """Run the printed script with bash for one array index, its Python replaced by echo. It calls the
    entry point through the Python it was printed from (issue 20, finding 9: a bare `lightning-tricks`
    is on no node's PATH outside the virtual environment)."""
    grid_path = EXPERIMENTS / "seed004_dynamic.grid.yaml"
    overlay = EXPERIMENTS / "datasets" / "cifar10.yaml"
    out = tmp_path / "out"
    argv = [
        str(grid_path),
        "--out",
        str(out),
        "--slurm",
        "--set",
        "trainer.max_epochs=1",
        "--config",
        str(overlay),
    ]
    assert main(argv) == 0
    script = capsys.readouterr().out
    runs = load_grid(grid_path).runs
    assert script.startswith("#!/bin/bash\n")
    assert f"#SBATCH --array=0-{len(runs) - 1}\n" in script
    assert out.is_dir(), "SLURM needs the --output folder to exist"
    assert main([*argv, "--sbatch", "gres=gpu:1", "--only", runs[1].name, "--only", runs[3].name]) == 0
    some = capsys.readouterr().out
    assert "#SBATCH --array=0-1\n" in some and "#SBATCH --gres=gpu:1\n" in some
    assert runs[1].name in some and runs[3].name in some and runs[0].name + "'" not in some
    entry = shlex.join([sys.executable, "-m", "lightning_tricks.cli", "sweep"])
    assert "lightning-tricks sweep" not in script and script.count(entry) == len(runs)
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text('#!/bin/bash\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    (tmp_path / "job.sh").write_text(script.replace(shlex.quote(sys.executable), str(fake)))
    for index in (0, len(runs) - 1):
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(index), "PATH": "/usr/bin:/bin"}
        done = subprocess.run(
            ["bash", str(tmp_path / "job.sh")], env=env, capture_output=True, text=True, check=True
        )
        args = done.stdout.splitlines()
        assert args == [
            "-m",
            "lightning_tricks.cli",
            "sweep",
            str(grid_path),
            "--only",
            runs[index].name,
            "--out",
            str(out),
            "--config",
            str(overlay),
            "--set",
            "trainer.max_epochs=1",
        ]


def test_overlay_config_comes_before_the_run_overrides(tmp_path):
    overlay = EXPERIMENTS / "datasets" / "cifar10.yaml"
    sweep = Sweep(load_grid(EXPERIMENTS / "seed004_beacon.grid.yaml"), tmp_path, (overlay,), (("a.b", "1"),))
    args = sweep.args(sweep.grid.runs[0])
    assert args[:5] == ["fit", "-c", str(sweep.grid.base), "-c", str(overlay)]
    assert args.index("--data.init_args.batch_size") < args.index("--a.b")
    assert print_commands(sweep).count("\n") == len(sweep.grid.runs)
    assert slurm_script(sweep).count(shlex.join([*ENTRY_POINT, "sweep"])) == len(sweep.grid.runs)


def test_local_sweep_runs_skips_and_reports_failures(tmp_path, capsys, one_thread_subprocesses):
    """Two tiny digits runs with two workers; a second call skips both; a bad run is not finished."""
    grid_path = write_grid(
        tmp_path,
        {
            "base": str(BASE),
            "name": "s{data.init_args.batch_size}",
            "grid": {"data.init_args.batch_size": [8, 16]},
        },
    )
    out = tmp_path / "runs"
    argv = [
        str(grid_path),
        "--out",
        str(out),
        "--workers",
        "2",
        *(part for s in TINY for part in ("--set", s)),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("s8", "s16"):
        assert re.search(rf"^\[\d/2\] start {name}$", printed, re.M)
        assert re.search(rf"^\[\d/2\] done {name} \(", printed, re.M)
        folder = out / name
        marker = json.loads((folder / "done.json").read_text())
        assert marker["returncode"] == 0 and marker["wall_s"] > 0
        assert "Trainer.fit` stopped: `max_steps=2` reached" in (folder / "sweep.log").read_text()
        assert list(folder.glob("events.out.tfevents.*")), "the run logs into its own folder"
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["data"]["init_args"]["batch_size"] == int(name[1:])
        assert config["data"]["init_args"]["image_size"] == 8
    assert "0 skipped, 2 done, 0 failed" in printed
    stamps = {name: (out / name / "done.json").stat().st_mtime_ns for name in ("s8", "s16")}

    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("skip ") == 2 and "start" not in printed
    assert "2 skipped, 0 done, 0 failed" in printed
    assert stamps == {name: (out / name / "done.json").stat().st_mtime_ns for name in ("s8", "s16")}

    bad = write_grid(
        tmp_path,
        {"base": str(BASE), "name": "lr{model.init_args.lr}", "grid": {"model.init_args.lr": [-1.0]}},
        "bad.grid.yaml",
    )
    assert main([str(bad), "--out", str(out), *(part for s in TINY for part in ("--set", s))]) == 1
    printed = capsys.readouterr().out
    log = out / "lr-1" / "sweep.log"
    assert "FAILED lr-1 (exit code " in printed and f"log: {log}" in printed
    assert "lr" in log.read_text() and not (out / "lr-1" / "done.json").exists()
    assert "0 skipped, 0 done, 1 failed" in printed

    assert main([str(bad), "--out", str(out), *(part for s in TINY for part in ("--set", s))]) == 1
    moved = tmp_path / "runs.previous" / "lr-1.0"
    assert f"start lr-1 (previous attempt moved to {moved})" in capsys.readouterr().out
    assert (moved / "sweep.log").is_file() and (out / "lr-1" / "sweep.log").is_file()


@pytest.mark.parametrize("overlay", [None, "cifar10.yaml", "cifar100.yaml"])
@pytest.mark.parametrize("path", GRIDS, ids=lambda path: path.name)
def test_shipped_grids_parse_on_digits_and_with_a_real_dataset_overlay(path, overlay, tmp_path):
    """Every run's overrides (one run per set of keys) are accepted by the CLI, overlay or not."""
    configs = () if overlay is None else (EXPERIMENTS / "datasets" / overlay,)
    sweep = Sweep(load_grid(path), tmp_path, configs)
    check_runs(sweep, sweep.grid.runs)
    assert not any(tmp_path.iterdir()), "checking writes nothing"


def test_ctrl_c_terminates_the_running_run_and_starts_no_other(tmp_path, capsys, one_thread_subprocesses):
    """SIGINT to the sweep while its first run trains: that run is terminated and left unfinished,
    the queued runs never start, and the sweep re-raises KeyboardInterrupt."""
    grid_path = write_grid(
        tmp_path,
        {
            "base": str(BASE),
            "name": "s{data.init_args.batch_size}",
            "grid": {"data.init_args.batch_size": [8, 16, 32]},
        },
    )
    out = tmp_path / "runs"
    endless = [s for s in TINY if not s.startswith("trainer.max_steps")] + ["trainer.max_steps=1000000"]
    argv = [str(grid_path), "--out", str(out), *(part for s in endless for part in ("--set", s))]
    main_thread = threading.get_ident()

    def interrupt_once_training() -> None:
        log = out / "s8" / "sweep.log"
        while not (log.is_file() and "Total params" in log.read_text()):
            time.sleep(0.1)
        signal.pthread_kill(main_thread, signal.SIGINT)

    threading.Thread(target=interrupt_once_training, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert sorted(path.name for path in out.iterdir()) == ["s8"]
    assert not (out / "s8" / "done.json").exists()
    assert "max_steps=1000000` reached" not in (out / "s8" / "sweep.log").read_text()
    assert "[1/3] stopped s8 (unfinished" in capsys.readouterr().out


def test_the_slurm_entry_point_runs_the_sweep():
    """What the SLURM script calls, ``python -m lightning_tricks.cli sweep``, reaches the sweep's parser."""
    done = subprocess.run(
        [*ENTRY_POINT, "sweep", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert "usage: lightning-tricks sweep" in done.stdout and "--slurm" in done.stdout
