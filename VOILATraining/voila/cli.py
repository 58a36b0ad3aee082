"""The ``voila`` command line: ``voila info | segment | evaluate | train | finetune | demo``.

Each subcommand lives in ``voila.commands.<name>`` and provides ``SUMMARY`` and ``DESCRIPTION``
(its ``--help`` texts), ``add_arguments(parser)`` and ``run(args) -> int``. Errors a user can cause (:class:`voila.VoilaError`) print one line and exit
non-zero; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import traceback
import warnings

from voila import __version__
from voila.errors import VoilaError

SUBCOMMANDS = ("info", "segment", "evaluate", "train", "finetune", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voila",
        description="VOILA: segment CT structures from their names; train and evaluate models.",
    )
    parser.add_argument("--version", action="version", version=f"voila {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"voila.commands.{name}")
        options = getattr(module, "PARSER_OPTIONS", {})
        sub = subparsers.add_parser(name, help=module.SUMMARY, description=module.DESCRIPTION, **options)
        module.add_arguments(sub)
        # SUPPRESS: an absent sub-flag must not reset `voila --debug COMMAND` to False
        sub.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the full traceback on errors",
        )
        sub.set_defaults(run=module.run)
    return parser


def quiet_libraries(debug: bool) -> None:
    """Keep library chatter off stderr so an error stays one line (``--debug`` shows it all).

    open_clip reports through the root logger (``logging.error(...)`` would install a stderr
    handler on first use), and torch/open_clip emit deprecation warnings on import.
    """
    if debug:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.NullHandler())
    # nibabel prints header "fixes" to stderr itself; VOILA checks those headers and says what is wrong
    logging.getLogger("nibabel.global").setLevel(logging.ERROR)
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so every clean-up (``finally``) runs as for Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    quiet_libraries(args.debug)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return int(args.run(args) or 0)
    except VoilaError as error:
        if args.debug:
            traceback.print_exc()
        print(f"voila {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"voila {args.command}: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    except Terminated:
        print(f"voila {args.command}: terminated (SIGTERM); no partial output was kept", file=sys.stderr)
        return 143
    except BrokenPipeError:
        # the reader of stdout has gone (``voila info MODEL | head``): nothing to say to it; point
        # stdout at devnull so that the interpreter's last flush does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    except Exception as error:  # unexpected: still one line unless --debug
        if args.debug:
            traceback.print_exc()
        else:
            print(
                f"voila {args.command}: internal error: {type(error).__name__}: {error} "
                "(re-run with --debug for the traceback and report it)",
                file=sys.stderr,
            )
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
