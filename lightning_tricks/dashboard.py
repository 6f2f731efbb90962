"""``lightning-tricks dashboard LOGDIR``: TensorBoard over a log folder, with what our runs need.

Example::

    lightning-tricks dashboard logs                 # http://127.0.0.1:6006/
    lightning-tricks dashboard logs --port 6007 --host 0.0.0.0

TensorBoard's default loader (``--load_fast=auto``, the Rust data server when it is installed)
drops the tag descriptions our callbacks write into the summary metadata; the Python loader
(``--load_fast=false``) serves them, with the Custom Scalars layout, the figures and the HParams
records. This command starts TensorBoard with that loader, prints the address and serves until
interrupted (Ctrl+C).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6006


def tensorboard_flags(logdir: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> list[str]:
    """The TensorBoard command-line flags the dashboard runs with (``--load_fast=false``: see the module)."""
    return [f"--logdir={logdir}", f"--host={host}", f"--port={port}", "--load_fast=false"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lightning-tricks dashboard",
        description="Serve TensorBoard over LOGDIR with tag descriptions, Custom Scalars, figures and "
        "HParams.",
    )
    parser.add_argument("logdir", help="A folder of runs (e.g. `logs`), searched recursively.")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free one"
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}, this machine only)",
    )
    args = parser.parse_args(argv)
    if not os.path.isdir(args.logdir):
        parser.error(f"LOGDIR {args.logdir!r} is not a folder.")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535]; got {args.port}.")
    return args


def main(argv: list[str] | None = None) -> int:
    """Start TensorBoard in this process, print its address, serve until interrupted."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from tensorboard import program

    board = program.TensorBoard()
    board.configure(argv=[None, *tensorboard_flags(args.logdir, args.host, args.port)])
    url = board.launch()
    print(f"lightning-tricks dashboard: TensorBoard at {url} (Ctrl+C stops it)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
