"""python -m sparsity_app COMMAND: the command-line door onto the engine.

Each command group is one module of this package (layer, model, accuracy, serve, bench) with its
parsers and its handlers; this module assembles them and turns every bad input into one line on
stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from sparsity_app.cli import accuracy, bench, layer, model, serve
from sparsity_app.core import env
from sparsity_app.core.errors import UserError, one_line
from sparsity_app.serve.report import say

GROUPS = (layer, model, accuracy, serve, bench)  # each: add_parsers(sub) and COMMANDS {name: handler}
COMMANDS = {name: handler for group in GROUPS for name, handler in group.COMMANDS.items()}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; we want one line
        raise UserError(f"{message} (see `python -m sparsity_app {self.prog.split()[-1]} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsity_app", description="Prune a layer, compile it to a TVM block-sparse "
                     "kernel, time it against dense, score the accuracy cost.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for group in GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    env.configure()
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args) or 0
    except UserError as e:
        say(f"error: {e}")
        return 2
    except BrokenPipeError:  # e.g. `| head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Exception as e:  # a bug, not bad input: still one line, full trace on request
        if os.environ.get("SPARSITY_APP_DEBUG"):
            raise
        say(f"internal error: {type(e).__name__}: {one_line(e)} (set SPARSITY_APP_DEBUG=1 for the traceback)")
        return 1
