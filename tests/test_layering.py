"""The package's layering, read from the import statements (no module is imported to check it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_tricks"


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, at top level or inside functions."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            stem = ".".join([*base, node.module] if node.module else base)
            names.add(stem)
            names.update(f"{stem}.{alias.name}" for alias in node.names)
    return names


def test_the_reader_imports_no_callback():
    """``results`` reads what callbacks declared in ``outputs``, without importing a callback."""
    assert not {
        n for n in imported_modules(PACKAGE / "results.py") if n.startswith("lightning_tricks.callbacks")
    }


@pytest.mark.parametrize("leaf", ["sweep.py", "trainer_cli.py", "dashboard.py", "comparison.py"])
def test_the_command_line_has_no_import_loop(leaf):
    """``cli`` dispatches to ``sweep``, ``dashboard`` and ``comparison``; they and ``trainer_cli`` never import ``cli``."""
    assert "lightning_tricks.cli" not in imported_modules(PACKAGE / leaf)


def test_engines_do_not_import_lightning_or_callbacks():
    """The pure-torch engines under ``gradients/`` stand alone (DESIGN: engines at the bottom)."""
    for path in (PACKAGE / "gradients").rglob("*.py"):
        bad = {n for n in imported_modules(path) if n.split(".")[0] == "lightning" or ".callbacks" in n}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_callbacks_do_not_import_each_other():
    """A callback reads another's signal through an engine-level object, never through its module."""
    callbacks = sorted(p for p in (PACKAGE / "callbacks").glob("*.py") if not p.name.startswith("_"))
    names = {f"lightning_tricks.callbacks.{p.stem}" for p in callbacks}
    for path in callbacks:
        others = (imported_modules(path) & names) - {f"lightning_tricks.callbacks.{path.stem}"}
        assert not others, f"{path.name} imports {sorted(others)}"


TESTS = Path(__file__).resolve().parent


def shared_fixtures() -> set[str]:
    """The names of the fixtures ``tests/conftest.py`` defines."""
    tree = ast.parse((TESTS / "conftest.py").read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and any("fixture" in ast.unparse(d) for d in node.decorator_list)
    }


@pytest.mark.parametrize("path", sorted(TESTS.glob("test_*.py")), ids=lambda path: path.name)
def test_tests_build_trainers_through_the_shared_settings_and_shadow_no_fixture(path):
    """The quiet Trainer settings are written once (``benchmarks/common.py``'s ``QUIET_TRAINER``,
    behind ``trainer_for`` and ``quiet_fit_trainer``): no test file constructs a ``Trainer`` itself
    or defines a name a shared fixture has."""
    tree = ast.parse(path.read_text())
    trainers = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == "Trainer"
    ]
    assert not trainers, (
        f"{path.name} builds a Trainer at lines {trainers}; use trainer_for or quiet_fit_trainer"
    )
    defined = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert not defined & shared_fixtures(), f"{path.name} shadows {sorted(defined & shared_fixtures())}"
