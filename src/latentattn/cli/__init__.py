"""The ``latentattn`` command, one module per command group: ``info`` (kv-cache, info),
``generate``, ``evaluate`` (eval), ``convert``, ``export``, ``train``, ``compare``, ``bench``;
``common`` holds what they share. Every command that takes ``--model`` loads it through
:func:`latentattn.load` (or ``load_config``).

User errors (any :class:`LatentAttnError`, a missing file) print one line
``latentattn: error: <message>`` on stderr and exit 2, as argparse does for its own errors;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from latentattn.cli import bench, compare, convert, evaluate, export, generate, info, kernels, train
from latentattn.cli.common import PROG, UserError
from latentattn.errors import LatentAttnError


def build_parser() -> argparse.ArgumentParser:
    from latentattn import __version__

    p = argparse.ArgumentParser(
        prog=PROG, description="Multi-head latent attention: cache calculator, model info, "
        "generation, evaluation, conversion, training, comparison, benchmarks and kernels.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (info, generate, evaluate, convert, export, train, compare, bench, kernels):
        group.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on its own errors
    try:
        return int(args.func(args))
    except (LatentAttnError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        msg = str(e) if not isinstance(e, OSError) or not e.filename else (
            f"{e.strerror}: {e.filename}")
        print(f"{PROG}: error: {' '.join(msg.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


__all__ = ["UserError", "build_parser", "main"]
