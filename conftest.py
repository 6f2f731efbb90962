"""Doctests of the package (``--doctest-modules`` over ``lightning_tricks/``, ``models/``,
``datamodules/``) run in a temporary working directory with one torch thread, so that an example
that trains leaves no run folder in the repository."""

from __future__ import annotations

import pytest
import torch
from _pytest.doctest import DoctestItem


@pytest.fixture(autouse=True)
def _doctest_in_temporary_directory(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if isinstance(request.node, DoctestItem):
        monkeypatch.chdir(request.getfixturevalue("tmp_path"))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
