"""Each script in ``examples/`` runs as a user would run it (its own process, an empty working
folder), writes the files it says it wrote, and the read-back code it prints works (issue 20,
finding 10: there was no ``examples/`` folder)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_tricks
from lightning_tricks.results import load_scalars

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PROMISED = {
    "random_gradient": ["random_gradient.csv"],
    "gradient_flow": ["grad_flow.figure.png", "grad_flow.csv"],
    "fisher_spectrum": ["fisher_history.csv", "fisher_spectrum.csv"],
    "batch_size_scheduler": ["batch_size.schedule.png", "batch_size.csv"],
    "minibatch_heatmap": ["heatmap.phase_0.png", "heatmap.csv", "heatmap_matrix.npy"],
}
"""The files each example must leave in its run folder (it may name more)."""
CALLBACKS = {"RandomGradient", "GradientFlow", "FisherSpectrum", "BatchSizeScheduler", "MinibatchHeatmap"}
PUBLIC_MODULES = {"lightning_tricks", "lightning_tricks.results", "lightning_tricks.plotting"}


def test_one_example_per_callback_using_public_api_only():
    assert {path.stem for path in EXAMPLES.glob("*.py")} == set(PROMISED)
    assert CALLBACKS <= set(lightning_tricks.__all__)
    used = set()
    for name in PROMISED:
        imports = [
            node
            for node in ast.walk(ast.parse((EXAMPLES / f"{name}.py").read_text()))
            if isinstance(node, ast.ImportFrom)
        ]
        ours = [node for node in imports if node.module.split(".")[0] == "lightning_tricks"]
        assert {node.module for node in ours} <= PUBLIC_MODULES, f"{name}.py imports beyond the public API"
        used |= {alias.name for node in ours if node.module == "lightning_tricks" for alias in node.names}
    assert used == CALLBACKS


@pytest.mark.parametrize("name", sorted(PROMISED))
def test_example_runs_and_writes_what_it_prints(name, tmp_path, monkeypatch):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = EXAMPLES / f"{name}.py"
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout

    run = tmp_path / re.search(r"^run folder: (\S+)$", out, re.M).group(1)
    assert run == tmp_path / "runs" / name / "version_0"
    printed = re.findall(r"^  (\S+\.(?:png|csv|npy))\s", out, re.M)
    assert set(PROMISED[name]) <= set(printed), "the script names each file it leaves"
    for file_name in printed:
        assert (run / file_name).is_file(), f"{name}.py prints {file_name}, which is not in {run}"
    assert list(run.glob("events.out.tfevents.*")), "the scalars went to TensorBoard"
    assert "lightning-tricks dashboard runs" in out

    # the read-back code it prints, run in the same folder
    lines = out.split("read it back in Python:\n", 1)[1].split("\n")
    end = next(i for i, line in enumerate(lines) if not line.startswith("    "))
    code = "\n".join(line[4:] for line in lines[:end])
    assert code.strip()
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, f"{name}.py output", "exec"), namespace)
    assert_scalars_read_as_tbparse_reads_them(run)


def assert_scalars_read_as_tbparse_reads_them(run: Path) -> None:
    """``results.load_scalars`` (tensorboard's event-file loader, a dozen lines of ours) gives every
    scalar of the event files as tbparse, an independent reader, does."""
    from tbparse import SummaryReader

    frame = SummaryReader(str(run), pivot=False, extra_columns={"wall_time"}).scalars
    theirs = {
        (tag, int(step)): (value, wall_time)
        for step, tag, value, wall_time in frame[["step", "tag", "value", "wall_time"]].itertuples(
            index=False
        )
    }
    epochs = {step: value for (tag, step), (value, _) in theirs.items() if tag == "epoch"}
    ours = {(row["tag"], row["step"]): row for row in load_scalars(run)}
    assert ours and ours.keys() == {key for key in theirs if key[0] != "epoch"}
    for (tag, step), row in ours.items():
        assert (row["value"], row["wall_time"]) == theirs[tag, step], (tag, step)  # the same float32, decoded
        assert row["epoch"] == (None if step not in epochs else int(epochs[step]))
