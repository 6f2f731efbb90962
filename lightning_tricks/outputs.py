"""What each callback writes into a run folder, declared once.

The callbacks write under these names and :mod:`lightning_tricks.results` reads them back, neither
importing the other. ``namespace`` is also the key of the callback's entry in
``lightning_tricks.json`` and the prefix of its logged tags (``fisher/C_bar``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RUN_FILE = "lightning_tricks.json"
"""Run-folder metadata: which callbacks wrote here and the run folder a resumed fit continued."""


@dataclass(frozen=True)
class Outputs:
    """A callback's metric namespace and its run-folder files, ``{role: file name}``."""

    namespace: str
    files: Mapping[str, str]


RANDOM_GRADIENT = Outputs("random_gradient", {"history": "random_gradient.csv"})
FISHER_SPECTRUM = Outputs("fisher", {"history": "fisher_history.csv", "epochs": "fisher_spectrum.csv"})
GRADIENT_FLOW = Outputs("grad_flow", {"history": "grad_flow.csv"})
MINIBATCH_HEATMAP = Outputs(
    "heatmap", {"history": "heatmap.csv", "matrix": "heatmap_matrix", "spill": "heatmap_gradients.tmp.npy"}
)
"""MinibatchHeatmap's namespace and files (``matrix`` and ``spill`` stems of several heatmaps' files:
``lightning_tricks.heatmap.heatmap_file``)."""
BATCH_SIZE_SCHEDULER = Outputs("batch_size", {"history": "batch_size.csv"})


def read_run_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a ``lightning_tricks.json`` (:data:`RUN_FILE`).

    Raises:
        ValueError: not valid JSON (cut or edited by hand), naming the file and the line, or not an
            object with a ``"callbacks"`` mapping.
    """
    with open(path) as handle:
        text = handle.read()
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}, line {error.lineno}, column {error.colno}: not valid JSON ({error.msg}); the file "
            "was cut or edited. Fix it, or delete it (the run then forgets the folder it resumed)."
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("callbacks"), dict):
        raise ValueError(f"{path}: expected a JSON object with a 'callbacks' mapping, got {text[:80]!r}.")
    return record
