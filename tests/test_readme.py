"""The README's examples run as written: its ``python`` blocks, and its results example on a run of
the config it names (issue 20, finding 9: it read GradientFlow's table from the demo, which has none)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import matplotlib
import pytest
from helpers import cli_fit

from lightning_tricks import plotting, results
from lightning_tricks.cli import main

matplotlib.use("Agg")
pytestmark = pytest.mark.usefixtures("single_thread")  # the configs pin torch threads; restore them

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SKIP = "<!-- not run:"
"""A ``python`` block right after a line starting with this needs what the README cannot ship (your module)."""
BLOCKS = [
    (before.strip(), textwrap.dedent(code))  # a block inside a list item is indented with it
    for before, indent, code in re.findall(r"(?ms)^([^\n]*)\n( *)```python\n(.*?)^\2```", README)
]
RUN = [code for before, code in BLOCKS if not before.startswith(SKIP)]
RESULTS = re.findall(r'`(plot_\w+\(\*load_\w+\("logs/(\w+)/version_0"\)\))`', README)


def test_every_python_block_is_run_or_says_why_not():
    assert len(BLOCKS) >= 2 and 1 <= len(RUN) < len(BLOCKS)
    assert all(
        re.match(r"<!-- not run: \S.* -->$", before) for before, _ in BLOCKS if before.startswith(SKIP)
    )


@pytest.mark.parametrize("code", RUN, ids=lambda code: code.splitlines()[-1][:40])
def test_python_block_runs(code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip(), "each example prints what it shows"


def config_logging_as(name: str) -> Path:
    """The shipped config whose logger is named ``name``."""
    matches = [
        path
        for path in (ROOT / "configs").glob("*.yaml")
        if re.search(rf"(?m)^\s+name: {name}$", path.read_text())
    ]
    assert len(matches) == 1, (name, matches)
    return matches[0]


@pytest.mark.parametrize("expression, name", RESULTS)
def test_results_example_reads_a_run_of_the_config_it_names(expression, name, tmp_path, monkeypatch):
    """Fit the named config for one short epoch from an empty folder, then evaluate the example there."""
    monkeypatch.chdir(tmp_path)
    short = {"trainer.max_epochs": 1, "trainer.limit_train_batches": 2, "trainer.limit_val_batches": 1}
    tiny = {"data.init_args.image_size": 8, "data.init_args.batch_size": 8}
    main(cli_fit(config_logging_as(name), {**short, "test_after_fit": False, **tiny}))
    figure = eval(expression, {**vars(results), **vars(plotting)})
    assert figure.axes
    matplotlib.pyplot.close(figure)


def test_results_examples_are_found():
    assert [name for _, name in RESULTS] == ["gradient_flow_vgg38"]
