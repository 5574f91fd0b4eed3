"""`lookalike`: the one command line. Each verb lives in its own module under `lookalike/cli/commands/`
and exposes `register(subparsers)`; this file only finds them, so adding a verb touches one file.

Command modules import heavy libraries (torch, kfp, faiss) inside their handlers, so `--help` is fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from lookalike.cli import commands
from lookalike.core.errors import LookalikeError, is_user_error

EXIT_USAGE, EXIT_FAILED = 2, 1


class CommandError(LookalikeError):
    """A failure the user can fix: printed as one line, no traceback, exit code 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lookalike",
        description="Lookalike: visual product search. Train, index, serve and operate it, on one "
                    "machine or on Kubernetes.",
        epilog="Run `lookalike VERB --help` for each verb's options.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    modules = [importlib.import_module(f"{commands.__name__}.{m.name}")
               for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    for module in sorted(modules, key=lambda m: (getattr(m, "ORDER", 50), m.__name__)):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # the HTTP pool's retry warnings would bury the store's one clear error line
        logging.getLogger("urllib3").setLevel(logging.ERROR)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lookalike … | head` closed the pipe: not an error worth a traceback
        sys.stderr.close()
        return 0
    except Exception as exc:  # noqa: BLE001 - the family's failures become one clear line
        if args.verbose or not is_user_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
