"""Execute the notebooks into ``notebooks/executed/`` (git-ignored), figures and all.

The notebooks are stored in git without outputs: stored outputs go stale when a default changes
and depend on the machine's thread count. This script regenerates them::

    .venv/bin/python scripts/notebooks.py                 # every notebook, SMALL = True
    .venv/bin/python scripts/notebooks.py --full beacon   # SMALL = False, names containing "beacon"

Each notebook declares its size in a code cell tagged ``parameters`` (papermill's convention);
the script appends ``SMALL = …`` to that cell before running it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def parameters_cell(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The code cell tagged ``parameters``; ``ValueError`` when there is none."""
    for cell in notebook.cells:
        if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            return cell
    raise ValueError("no code cell tagged 'parameters' (it must assign SMALL)")


def execute(path: Path, *, small: bool, workdir: Path, timeout: int = 3600) -> nbformat.NotebookNode:
    """Run ``path`` top to bottom in ``workdir`` with ``SMALL`` forced; returns the executed notebook."""
    notebook = nbformat.read(path, as_version=4)
    cell = parameters_cell(notebook)
    cell.source = f"{cell.source}\nSMALL = {small}  # set by scripts/notebooks.py"
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()
    return notebook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only notebooks whose file name contains one of these")
    parser.add_argument("--full", action="store_true", help="SMALL = False: the paper-scale settings")
    parser.add_argument("--out", type=Path, default=NOTEBOOKS / "executed", help="where executed copies go")
    args = parser.parse_args(argv)
    paths = [
        p for p in sorted(NOTEBOOKS.glob("*.ipynb")) if not args.names or any(n in p.name for n in args.names)
    ]
    if not paths:
        parser.error(f"no notebook in {NOTEBOOKS} matches {args.names}")
    args.out.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(paths, 1):
        print(f"[{index}/{len(paths)}] {path.name}", flush=True)
        notebook = execute(path, small=not args.full, workdir=args.out)
        nbformat.write(notebook, args.out / path.name)
    print(f"executed notebooks are in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
