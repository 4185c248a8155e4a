"""The ``emprune`` command: one parser, one sub-command per file of this package, one-line
errors. Each command module has ``add_parser(subparsers)`` and ``run(args) -> int``."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .._version import __version__
from . import bench, compare, eval as eval_cmd, export, heal, inspect, prune, shrink
from .common import USER_ERRORS, Parser, one_line


def build_parser() -> argparse.ArgumentParser:
    """The ``emprune`` argument parser (all sub-commands)."""
    p = Parser(
        prog="emprune",
        description="Effective Model Pruning: keep floor(beta * N_eff) of every group of scores, "
                    "N_eff = (sum|s|)^2 / sum s^2. Commands:\n"
                    "  inspect   what EMP would keep in a checkpoint (magnitude scores)\n"
                    "  prune     prune a causal LM (Wanda-style layer-wise calibration) and save it\n"
                    "  shrink    remove MLP neurons / attention heads physically (structured EMP): smaller, faster\n"
                    "  heal      short recovery fine-tune of a pruned/shrunk model (zeros stay zero; full or LoRA)\n"
                    "  eval      perplexity of a causal LM (a saved pruned folder, a GGUF file, ...)\n"
                    "  export    write a model as a GGUF file that llama.cpp runs (per-layer widths kept), quantised\n"
                    "  bench     speed (pp/tg tok/s), size and peak memory where it runs (llama.cpp, PyTorch), vs a baseline\n"
                    "  compare   dense vs magnitude/Wanda vs EMP recipes: markdown + JSON + plot\n"
                    "  demo      a small real compare on SmolLM2-135M (CPU, under ~15 minutes)\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"emprune {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    for add in (inspect.add_parser, prune.add_parser, shrink.add_parser, heal.add_parser, eval_cmd.add_parser,
                export.add_parser, bench.add_parser, compare.add_parser, compare.add_demo_parser):
        add(sub)
    return p


COMMANDS = {"inspect": inspect.run, "prune": prune.run, "shrink": shrink.run, "heal": heal.run, "eval": eval_cmd.run,
            "export": export.run, "bench": bench.run, "compare": compare.run, "demo": compare.run_demo}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``emprune`` command line; returns the exit status.

    Bad input ends with one line ``emprune CMD: error: ...`` and status 2; Ctrl-C with
    ``emprune CMD: interrupted`` and status 130 (outputs are written atomically, so nothing
    half-written is left); a closed stdout pipe (``... | head``) quietly with status 1."""
    command = ""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args._argv = list(sys.argv[1:] if argv is None else argv)
        command = args.command or ""
        if args.command is None:
            parser.print_help()
            return 2
        try:
            rc = _run(args)
        except USER_ERRORS as e:
            if isinstance(e, BrokenPipeError):
                raise
            print(f"emprune {command}: error: {one_line(e)}", file=sys.stderr)
            return 2
        except Exception as e:
            import torch

            if isinstance(e, torch.OutOfMemoryError):
                print(f"emprune {command}: error: out of memory ({one_line(e)[:200]}); lower --batch-size "
                      "or the sizes", file=sys.stderr)
                return 2
            raise
        sys.stdout.flush()  # a closed pipe is reported here, not as noise at interpreter exit
        return rc
    except KeyboardInterrupt:
        print(f"emprune{' ' + command if command else ''}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 1


def _silence_stdout() -> None:
    """After EPIPE on stdout, point it at devnull so that the interpreter's final flush does not
    raise again (the recipe of the Python docs, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured)
        pass


def _run(args) -> int:
    if args.command not in COMMANDS:  # pragma: no cover
        raise NotImplementedError(f"unknown command {args.command}")
    from ..models.checkpoint import release_claims

    try:
        return COMMANDS[args.command](args)
    finally:  # a refused, failed or interrupted run leaves no claim on its --out behind
        release_claims()
