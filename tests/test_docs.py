"""The API reference builds from the docstrings with warnings as errors, and has a page for every
public name (issue 20, finding 10: there was no reference beyond the README)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_tricks

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CALLBACK_PAGES = {
    "RandomGradient": "random_gradient",
    "GradientFlow": "gradient_flow",
    "GradientFlowAlarm": "gradient_flow",
    "FisherSpectrum": "fisher_spectrum",
    "BatchSizeScheduler": "batch_size_scheduler",
    "MinibatchHeatmap": "minibatch_heatmap",
}
PACKAGE = Path(lightning_tricks.__file__).parent
WITHOUT_PAGE = {"cli", "trainer_cli", "checks"}
"""The command-line entry points (``lightning-tricks --help`` and the README document them) and the
internal argument checks."""
MODULE_PAGES = sorted(
    {path.stem for path in PACKAGE.glob("*.py") if not path.stem.startswith("_")} - WITHOUT_PAGE
    | {
        f"gradients.{path.stem}"
        for path in (PACKAGE / "gradients").glob("*.py")
        if not path.stem.startswith("_")
    }
    | {"gradients", "gradients.gram"}
)
"""Every module of the library and of its engines has its page, ``api/<module>.html``."""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HTML site, built as the README says (``-n -W``: a warning or an unresolved reference fails the build)."""
    out = tmp_path_factory.mktemp("docs")
    command = [
        sys.executable,
        "-m",
        "sphinx",
        "-n",
        "-W",
        "--keep-going",
        "-q",
        "-b",
        "html",
        str(DOCS),
        str(out),
    ]
    sources = sorted(DOCS.rglob("*"))
    build = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert build.returncode == 0, f"the docs build failed:\n{build.stderr[-6000:]}"
    assert sorted(DOCS.rglob("*")) == sources, "the build writes nothing into docs/"
    return out


def test_every_public_name_has_its_page(site: Path):
    public = set(lightning_tricks.__all__) - {"__version__"}
    assert public == set(CALLBACK_PAGES), "a new public name needs its page in docs/api/ and here"
    for name, page in CALLBACK_PAGES.items():
        html = (site / "api" / f"{page}.html").read_text()
        assert f'id="lightning_tricks.{name}"' in html, f"{name} is not documented on api/{page}.html"


@pytest.mark.parametrize("module", MODULE_PAGES)
def test_module_pages_document_their_functions(site: Path, module: str):
    html = (site / "api" / f"{module}.html").read_text()
    assert f'id="module-lightning_tricks.{module}"' in html
    if module not in ("gradients", "gradients.gram"):  # packages: their docstring and the submodules
        assert f'id="lightning_tricks.{module}.' in html, f"no member of {module} is documented"


def test_callback_pages_show_arguments_and_example_not_lightning_hooks(site: Path):
    html = (site / "api" / "fisher_spectrum.html").read_text()
    assert "every_n_steps" in html and "&gt;&gt;&gt;" in html  # the arguments, the doctest example
    assert 'id="lightning_tricks.FisherSpectrum.history"' in html
    assert '>Parameters<span class="colon">' in html  # the Args: section, as fields
    assert '>Raises<span class="colon">' in html
    assert '>Type<span class="colon">' not in html  # a property's prose is not read as "type: text"
    for hook in ("on_train_batch_end", "state_dict", "setup", "get_state"):
        assert f'id="lightning_tricks.FisherSpectrum.{hook}"' not in html


def load_conf():
    spec = importlib.util.spec_from_file_location("docs_conf", DOCS / "conf.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    return conf


def test_plain_formulas_escape_bars_and_stray_stars_in_prose_only():
    lines = [
        "l_k = (α_k / |B_k|) · √Tr(F̃_k), shape (B, *shape), the *average* and **C̄_K**",
        "``|g|`` and :func:`a|b` stay code, ``loss * r;",
        "loss * r`` too",
        "Example::",
        "",
        "    x = |y|",
        ">>> abs(-1) | 0",
        "1",
        "",
        "after |x|",
    ]
    load_conf().plain_formulas(None, "function", "f", None, {}, lines)
    assert lines == [
        r"l_k = (α_k / \|B_k\|) · √Tr(F̃_k), shape (B, \*shape), the *average* and **C̄_K**",
        "``|g|`` and :func:`a|b` stay code, ``loss * r;",
        "loss * r`` too",
        "Example::",
        "",
        "    x = |y|",
        ">>> abs(-1) | 0",
        "1",
        "",
        r"after \|x\|",
    ]
