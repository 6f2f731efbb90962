"""``lightning-tricks sweep``: expand a grid file into runs and run them, or print them for a cluster.

A grid file is YAML::

    base: seed004_beacon.yaml          # the config every run starts from (relative to this file)
    name: "s{data.init_args.batch_size}-lr{model.init_args.lr}"
    grid:
      data.init_args.batch_size: [32, 64, 128]   # a config key and its values
      model.init_args.lr: [0.05, 0.1, 0.2]
      schedule:                                  # a named axis: label -> overrides
        s32-to-512: {trainer.callbacks.init_args.sizes: [32, 64, 128, 256, 512]}
        s512-to-32: {trainer.callbacks.init_args.sizes: [512, 256, 128, 64, 32]}

The runs are the cartesian product of the axes (``grid`` may also be a list of such mappings: the
union of their products, for one-at-a-time sweeps). Each run is ``lightning-tricks fit -c base``
plus one ``--key value`` override a key, and logs into ``<out>/<run name>/`` (TensorBoard events,
``config.yaml``, checkpoints, ``sweep.log`` with its stdout and stderr). A run is finished when its
folder holds ``done.json``, written only after a successful exit; re-running a sweep skips
finished runs (``--force`` redoes them) and moves an unfinished run's earlier folder to
``<out>.previous/`` before it starts again.

Before anything starts, one run per distinct set of override keys is parsed by the CLI (nothing
instantiated), so a misspelt key fails at once. ``--config`` adds an overlay config after the
base (``configs/experiments/datasets/cifar10.yaml``: the real dataset), ``--set key=value`` an
override to every run. Runs are ordinary Lightning jobs: ``--set trainer.devices=4`` makes each a multi-GPU
run; for a cluster, ``--slurm`` prints an array script whose task ``i`` is run ``i``.

Example::

    lightning-tricks sweep configs/experiments/seed004_beacon.grid.yaml --workers 2
    lightning-tricks sweep configs/experiments/seed004_beacon.grid.yaml --print-commands
    lightning-tricks sweep configs/experiments/seed004_beacon.grid.yaml --slurm > sweep.sbatch
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import lightning as L
import yaml

from lightning_tricks.trainer_cli import CLI_OPTIONS, TricksCLI

GRID_KEYS = ("base", "grid", "name", "command")
COMMANDS = ("fit", "validate", "test")
MARKER = "done.json"
LOG = "sweep.log"
_NAME_OK = re.compile(r"^[A-Za-z0-9._+=-]+$")
_FIELD = re.compile(r"\{([^{}]*)\}")


class GridError(ValueError):
    """A grid file that cannot be expanded; the message names the file and the key."""


@dataclass(frozen=True)
class Run:
    """One run of a sweep: its folder name and its ``(config key, value)`` overrides."""

    name: str
    overrides: tuple[tuple[str, Any], ...]

    def cli_args(self) -> list[str]:
        """The overrides as LightningCLI arguments: ``["--key", "value", ...]``."""
        return [part for key, value in self.overrides for part in (f"--{key}", format_value(value))]


@dataclass(frozen=True)
class Grid:
    """A parsed grid file: the base config, the subcommand and the expanded runs."""

    path: Path
    base: Path
    command: str
    runs: tuple[Run, ...]


def format_value(value: Any) -> str:
    """A value as the command line spells it: ``0.1``, ``1.0``, ``0.00001``, ``true``, ``[32, 64]``.

    Floats keep a decimal point and no exponent (a YAML parser reads ``1e-05`` as a string).
    """
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isfinite(value):
        text = format(Decimal(repr(value)), "f")
        return text if "." in text else text + ".0"
    return json.dumps(value)


def format_label(value: Any) -> str:
    """A value as a run name spells it: floats short (``0.1``, ``0`` for 0.0) when that is exact."""
    if isinstance(value, float) and math.isfinite(value) and float(f"{value:g}") == value:
        return f"{value:g}"
    return format_value(value)


def _fail(path: Path, key: str, message: str) -> GridError:
    return GridError(f"grid file {path}: `{key}` {message}")


def _axis(path: Path, key: str, values: Any) -> list[tuple[str, tuple[tuple[str, Any], ...]]]:
    """One axis as ``(label, overrides)`` pairs: a list of values of ``key``, or label -> overrides."""
    if isinstance(values, Mapping):
        if not values:
            raise _fail(path, f"grid.{key}", "is an empty mapping; give label: {config.key: value} pairs.")
        axis = []
        for label, overrides in values.items():
            if not isinstance(overrides, Mapping) or not overrides:
                raise _fail(
                    path,
                    f"grid.{key}.{label}",
                    f"must be a non-empty mapping of config keys to values, got {overrides!r}.",
                )
            axis.append((str(label), tuple((str(k), v) for k, v in overrides.items())))
        return axis
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise _fail(
            path,
            f"grid.{key}",
            f"must be a non-empty list of values (or a mapping label -> overrides), got {values!r}; "
            f"write e.g. `{key}: [{format_value(values)}]`.",
        )
    return [(format_label(value), ((key, value),)) for value in values]


def _default_template(keys: Sequence[str]) -> str:
    return "-".join(f"{key.rsplit('.', 1)[-1]}{{{key}}}" for key in keys)


def _render(path: Path, template: str, labels: Mapping[str, str]) -> str:
    def field(match: re.Match[str]) -> str:
        if match.group(1) not in labels:
            raise _fail(
                path,
                "name",
                f"uses {{{match.group(1)}}}, which is not an axis of `grid`; axes: {sorted(labels)}.",
            )
        return labels[match.group(1)]

    name = _FIELD.sub(field, template)
    if not _NAME_OK.match(name) or name in (".", ".."):
        raise _fail(
            path,
            "name",
            f"gives the run name {name!r}; use letters, digits and . _ + = - only, not '.' or '..' alone "
            "(it names a folder).",
        )
    return name


def _product(path: Path, spec: Any, template: str | None, where: str) -> list[Run]:
    if not isinstance(spec, Mapping) or not spec:
        raise _fail(path, where, f"must be a non-empty mapping of axes to values, got {spec!r}.")
    axes = {str(key): _axis(path, str(key), values) for key, values in spec.items()}
    template = _default_template(list(axes)) if template is None else template
    runs = []
    for combo in itertools.product(*axes.values()):
        labels = {key: label for key, (label, _) in zip(axes, combo)}
        overrides = tuple(item for _, items in combo for item in items)
        runs.append(Run(_render(path, template, labels), overrides))
    return runs


def expand(path: Path, spec: Any, template: str | None = None) -> list[Run]:
    """The runs of ``grid`` (one mapping of axes, or a list of them: the union of their products).

    Raises ``GridError`` naming the key when an axis is malformed, the name template uses a key
    that is no axis, a name is not a safe folder name, or two different runs get the same name.
    """
    specs = spec if isinstance(spec, list) else [spec]
    if not specs:
        raise _fail(path, "grid", "is an empty list; give at least one mapping of axes.")
    runs: dict[str, Run] = {}
    for i, one in enumerate(specs):
        for run in _product(path, one, template, f"grid[{i}]" if isinstance(spec, list) else "grid"):
            if run.name in runs and runs[run.name] != run:
                raise _fail(
                    path,
                    "name",
                    f"gives two different runs the name {run.name!r}; add the axis that tells them apart to it.",
                )
            runs[run.name] = run
    return list(runs.values())


def _read_yaml(path: Path) -> Any:
    """The grid file's YAML; a ``GridError`` naming the file, line and column if it does not parse."""
    try:
        return yaml.safe_load(path.read_text())
    except UnicodeDecodeError as error:
        raise GridError(f"grid file {path}: not UTF-8 text ({error}).") from None
    except yaml.YAMLError as error:
        mark, context = getattr(error, "problem_mark", None), getattr(error, "context_mark", None)
        mark = mark or context
        where = "" if mark is None else f", line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(error, "problem", None) or str(error)
        if context is not None and context is not mark and getattr(error, "context", None):
            problem += f"; {error.context} at line {context.line + 1}"
        raise GridError(f"grid file {path}{where}: not valid YAML ({problem}).") from None


def load_grid(path: str | Path) -> Grid:
    """Read and expand a grid file; ``base`` is resolved relative to the grid file's folder."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file {path} does not exist.")
    data = _read_yaml(path)
    if not isinstance(data, Mapping):
        raise GridError(f"grid file {path}: must be a YAML mapping with keys {GRID_KEYS}, got {data!r}.")
    unknown = sorted(set(map(str, data)) - set(GRID_KEYS))
    if unknown:
        raise _fail(path, unknown[0], f"is not a grid-file key; allowed: {GRID_KEYS}.")
    for key in ("base", "grid"):
        if key not in data:
            raise _fail(path, key, "is missing; a grid file needs `base` (a config) and `grid` (the axes).")
    base = path.parent / str(data["base"])
    if not base.is_file():
        raise _fail(
            path, "base", f"names {data['base']!r}, but {base} does not exist (relative to the grid file)."
        )
    command = data.get("command", "fit")
    if command not in COMMANDS:
        raise _fail(path, "command", f"must be one of {COMMANDS}, got {command!r}.")
    template = data.get("name")
    if template is not None and not isinstance(template, str):
        raise _fail(
            path, "name", f"must be a string such as 's{{data.init_args.batch_size}}', got {template!r}."
        )
    return Grid(path, base, command, tuple(expand(path, data["grid"], template)))


def parse_set(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``["trainer.max_epochs=1", ...]`` as ``(("trainer.max_epochs", "1"), ...)``."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE (e.g. trainer.max_epochs=1), got {item!r}.")
        pairs.append((key.removeprefix("--"), value))
    return tuple(pairs)


@dataclass(frozen=True)
class Sweep:
    """A grid with where it logs and what every run adds: overlay configs and ``--set`` overrides."""

    grid: Grid
    out: Path
    configs: tuple[Path, ...] = ()
    extra: tuple[tuple[str, str], ...] = ()

    def args(self, run: Run) -> list[str]:
        """One run's CLI arguments after the program name: subcommand, base, overlays, the run's
        overrides, the ``--set`` ones, then the log dir ``<out>/<run name>/``.

        The logger gets ``save_dir`` out, ``name`` the run and an empty ``version``, so the base
        config's logger must take those arguments (TensorBoard, CSV).
        """
        args = [self.grid.command, "-c", str(self.grid.base)]
        args += [part for path in self.configs for part in ("-c", str(path))]
        args += run.cli_args()
        args += [part for key, value in self.extra for part in (f"--{key}", value)]
        args += ["--trainer.default_root_dir", str(self.folder(run))]
        args += ["--trainer.logger.init_args.save_dir", str(self.out)]
        args += ["--trainer.logger.init_args.name", run.name]
        args += ["--trainer.logger.init_args.version", ""]
        return args

    def folder(self, run: Run) -> Path:
        """The run's log folder."""
        return self.out / run.name

    def is_done(self, run: Run) -> bool:
        """Whether the run's folder holds the marker of a successful exit."""
        return (self.folder(run) / MARKER).is_file()

    def select(self, only: Sequence[str] = ()) -> list[Run]:
        """The runs named in ``only`` (all when empty); an unknown name raises ``ValueError``."""
        names = [run.name for run in self.grid.runs]
        unknown = [name for name in only if name not in names]
        if unknown:
            raise ValueError(f"--only {unknown[0]!r} is not a run of {self.grid.path}; runs: {names}.")
        return [run for run in self.grid.runs if not only or run.name in only]


class _Parsed(Exception):
    """Raised by the parse-only CLI once the arguments parsed."""


def _parse_error(args: list[str]) -> str | None:
    """The CLI parser's error for ``args`` (after the program name), or None when they parse.

    Parses only: nothing is instantiated, seeded or run.
    """

    class ParseOnly(TricksCLI):
        def parse_arguments(self, parser, args) -> None:  # noqa: ANN001 - LightningCLI's signature
            super().parse_arguments(parser, args)
            raise _Parsed

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            ParseOnly(L.LightningModule, L.LightningDataModule, **CLI_OPTIONS, args=args)
    except _Parsed:
        return None
    except SystemExit:
        lines = stderr.getvalue().splitlines()
        first = next((i for i, line in enumerate(lines) if line.startswith("error:")), 0)
        return "\n".join(lines[first:])
    return "the CLI ran instead of only parsing"


def check_runs(sweep: Sweep, runs: Sequence[Run]) -> None:
    """Parse the arguments of one run per distinct set of override keys before anything starts.

    Raises ``ValueError`` naming the run, its overrides and the parser's message, so a misspelt key
    or an ill-typed value fails at once instead of in every run. Values the parser accepts but a
    constructor rejects (a negative learning rate) still fail in their runs, with their logs.
    """
    seen: set[tuple[str, ...]] = set()
    for run in runs:
        keys = tuple(key for key, _ in run.overrides)
        if keys in seen:
            continue
        seen.add(keys)
        error = _parse_error(sweep.args(run))
        if error is not None:
            raise ValueError(
                f"run {run.name!r} of {sweep.grid.path} does not parse (overrides {run.cli_args()}):\n{error}"
            )


def _set_aside(sweep: Sweep, run: Run) -> Path | None:
    """Move a previous attempt's folder to ``<out>.previous/<run name>.<k>``, so the new attempt
    starts empty (no mixed event files) and nothing the old one wrote (checkpoints) is lost."""
    folder = sweep.folder(run)
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    previous = sweep.out.parent / f"{sweep.out.name}.previous"
    previous.mkdir(parents=True, exist_ok=True)
    k = 0
    while (previous / f"{run.name}.{k}").exists():
        k += 1
    return Path(shutil.move(str(folder), str(previous / f"{run.name}.{k}")))


class _Local:
    """The state of a local sweep shared by its worker threads: progress lines and live children."""

    def __init__(self, sweep: Sweep, runs: Sequence[Run]) -> None:
        self.sweep, self.runs = sweep, runs
        self.lock = threading.Lock()
        self.children: set[subprocess.Popen] = set()
        self.stopping = False

    def report(self, index: int, message: str) -> None:
        with self.lock:
            print(f"[{index + 1}/{len(self.runs)}] {message}", flush=True)

    def execute(self, index: int) -> bool:
        """Run one run as a child process, its output to ``sweep.log``; the marker on success."""
        run, sweep = self.runs[index], self.sweep
        folder = sweep.folder(run)
        moved = _set_aside(sweep, run)
        folder.mkdir(parents=True)
        command = [sys.executable, "-m", "lightning_tricks.cli", *sweep.args(run)]
        start = time.perf_counter()
        with open(folder / LOG, "w") as log:
            log.write(shlex.join(command) + "\n")
            log.flush()
            with self.lock:
                if self.stopping:
                    return False
                child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
                self.children.add(child)
            self.report(
                index, f"start {run.name}" + (f" (previous attempt moved to {moved})" if moved else "")
            )
            code = child.wait()
            with self.lock:
                self.children.discard(child)
        wall = time.perf_counter() - start
        if self.stopping:  # a terminated Lightning run may still exit 0: never mark it finished
            self.report(index, f"stopped {run.name} (unfinished, exit code {code}); log: {folder / LOG}")
            return False
        if code != 0:
            self.report(index, f"FAILED {run.name} (exit code {code}, {wall:.1f} s); log: {folder / LOG}")
            return False
        marker = {"returncode": code, "wall_s": round(wall, 3), "args": sweep.args(run)}
        (folder / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        self.report(index, f"done {run.name} ({wall:.1f} s)")
        return True

    def stop(self) -> None:
        """Start no more runs and terminate the running ones (their runs stay unfinished)."""
        with self.lock:
            self.stopping = True
            for child in self.children:
                child.terminate()


def run_local(sweep: Sweep, workers: int = 1, force: bool = False, only: Sequence[str] = ()) -> list[Run]:
    """Run the unfinished runs, ``workers`` processes at a time; return the failed runs.

    One progress line per run start, finish, failure (with its log path) and skip. On Ctrl-C the
    running runs are terminated (left unfinished) and no further run starts.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be an int >= 1, got {workers!r}.")
    runs = sweep.select(only)
    todo = [i for i, run in enumerate(runs) if force or not sweep.is_done(run)]
    check_runs(sweep, [runs[i] for i in todo])
    local = _Local(sweep, runs)
    for i, run in enumerate(runs):
        if i not in todo:
            local.report(i, f"skip {run.name} (finished: {sweep.folder(run) / MARKER})")
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        jobs = [pool.submit(local.execute, i) for i in todo]
        failed = [runs[i] for i, job in zip(todo, jobs) if not job.result()]
    except KeyboardInterrupt:
        local.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    skipped = len(runs) - len(todo)
    print(
        f"{skipped} skipped, {len(todo) - len(failed)} done, {len(failed)} failed (out: {sweep.out})",
        flush=True,
    )
    return failed


ENTRY_POINT = (sys.executable, "-m", "lightning_tricks.cli")
"""``lightning-tricks`` as the interpreter that runs this code calls it, independent of ``PATH``."""


def print_commands(sweep: Sweep, only: Sequence[str] = ()) -> str:
    """One shell command a run: ``lightning-tricks fit -c base --key value ...``."""
    return "".join(shlex.join(["lightning-tricks", *sweep.args(run)]) + "\n" for run in sweep.select(only))


def slurm_script(sweep: Sweep, only: Sequence[str] = (), sbatch: Sequence[str] = ()) -> str:
    """A SLURM array script: task ``i`` runs ``lightning-tricks sweep <grid> --only <run i>``.

    The command is ``ENTRY_POINT``, this Python's own ``-m lightning_tricks.cli``: a batch job does not
    activate the virtual environment the script was printed from, so a bare ``lightning-tricks``
    would not be on the node's ``PATH``.

    Each task goes through the sweep itself, so it writes the run's log and marker and skips a run
    that is already finished. ``sbatch`` adds ``#SBATCH`` options (``gres=gpu:1``, ``time=4:00:00``);
    SLURM writes each task's output to ``<out>/slurm-<job>_<task>.out``, so ``<out>`` must exist
    (``main`` creates it). A run is an ordinary Lightning job: for several GPUs or nodes a run, ask
    SLURM for them here and set ``trainer.devices`` / ``trainer.num_nodes`` with ``--set``.
    """
    common = ["--out", str(sweep.out)]
    common += [part for path in sweep.configs for part in ("--config", str(path))]
    common += [part for key, value in sweep.extra for part in ("--set", f"{key}={value}")]
    commands = [
        shlex.join([*ENTRY_POINT, "sweep", str(sweep.grid.path), "--only", run.name, *common])
        for run in sweep.select(only)
    ]
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={sweep.grid.path.name.split('.')[0]}",
        f"#SBATCH --array=0-{len(commands) - 1}",
        f"#SBATCH --output={sweep.out}/slurm-%A_%a.out",
        *(f"#SBATCH --{line.removeprefix('--')}" for line in sbatch),
        "RUNS=(",
        *(f"  {shlex.quote(command)}" for command in commands),
        ")",
        'eval "${RUNS[$SLURM_ARRAY_TASK_ID]}"',
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-tricks sweep`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="lightning-tricks sweep",
        description="Expand a grid file into runs; run them locally, or print them for a cluster.",
    )
    add = parser.add_argument
    add("grid", type=Path, help="grid file (YAML with base, grid, name)")
    add("--out", type=Path, default=None, help="parent of the run folders (default: logs/<grid file stem>)")
    add("--workers", type=int, default=1, help="runs at a time (default 1)")
    add("--config", action="append", type=Path, default=[], help="overlay config after the base (repeatable)")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run (repeatable)")
    add("--only", action="append", default=[], metavar="NAME", help="only this run (repeatable)")
    add("--force", action="store_true", help="redo finished runs")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="print the run names and exit")
    mode.add_argument("--print-commands", action="store_true", help="print one shell command a run and exit")
    mode.add_argument("--slurm", action="store_true", help="print a SLURM array script and exit")
    add(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra #SBATCH option, e.g. gres=gpu:1 (repeatable)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-tricks sweep``; returns the exit code (1 if a run failed)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        grid = load_grid(ns.grid)
        out = ns.out if ns.out is not None else Path("logs") / ns.grid.name.split(".")[0]
        for path in ns.config:
            if not path.is_file():
                raise ValueError(f"--config {str(path)!r} does not exist.")
        sweep = Sweep(grid, out, tuple(ns.config), parse_set(ns.set))
        if ns.list:
            print("\n".join(run.name for run in sweep.select(ns.only)))
        elif ns.print_commands:
            print(print_commands(sweep, ns.only), end="")
        elif ns.slurm:
            out.mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output folder
            print(slurm_script(sweep, ns.only, ns.sbatch), end="")
        else:
            return 1 if run_local(sweep, ns.workers, ns.force, ns.only) else 0
    except ValueError as error:
        parser.error(str(error))
    return 0
