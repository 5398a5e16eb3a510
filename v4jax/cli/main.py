"""The top-level `v4jax` parser (`--distributed`, `--debug`), one subcommand per verb module, and
the one error path every verb goes through.

A user's mistake ends in one line on stderr, `v4jax VERB: what and where`, and an exit code:
2 for usage (a bad or contradictory argument, a mesh the devices or rules cannot make), 1 for
data (a file, row, token id, config or checkpoint v4jax cannot use), 130 for Ctrl-C. Anything
else is a bug in v4jax and keeps its traceback; `--debug` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Sequence

from v4jax.cli import convert, demo, eval, export, generate, lm_eval, merge, plan, train
from v4jax.cli.common import UsageError, nonnegative_int, positive_int
from v4jax.errors import MeshError, ShardingError, V4jaxError

VERBS = (convert, export, generate, eval, lm_eval, train, merge, demo, plan)  # each: add(subparsers) registers it
USAGE = (UsageError, MeshError, ShardingError)
# OSErrors about a path the user named (the file types and folders it points to)
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
# and the disk's (full, over quota, read-only, failing), which name no path of their own
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> Parser:
    parser = Parser(prog="v4jax", description="DeepSeek-V4 in JAX: convert, export, generate, evaluate, train, plan.")
    parser.add_argument("--distributed", action="store_true",
                        help="join a multi-process run (jax.distributed) before anything else: on TPU pods, "
                             "SLURM and Open MPI the coordinator and process ids are detected; elsewhere give "
                             "--coordinator, --num-processes and --process-id")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (with --distributed)")
    parser.add_argument("--num-processes", type=positive_int)
    parser.add_argument("--process-id", type=nonnegative_int)
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="VERB")
    for verb in VERBS:
        p = verb.add(sub)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of any error")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run `v4jax ARGV`; a user's mistake raises SystemExit with its exit code after one line on stderr."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest  # a verb with passthrough hands these to the program it wraps (lm-eval)
    if not args.debug:  # Orbax logs the traceback of a failed background write (a full disk) before raising it
        logging.getLogger("absl").addFilter(lambda record: not record.exc_info)
    if (args.coordinator or args.num_processes or args.process_id is not None) and not args.distributed:
        _fail("v4jax", "--coordinator, --num-processes and --process-id go with --distributed", 2)
    try:
        if args.distributed:
            _join(args)
        args.run(args)
    except BrokenPipeError:
        # the reader of stdout went away (`v4jax eval ... | head -1`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None
    except BaseException as e:
        code = exit_code(e)
        if code is None or args.debug:
            raise
        _fail(f"v4jax {args.command}", message(e), code)


def exit_code(e: BaseException) -> int | None:
    """The exit code of an error a user can cause; None for a bug."""
    if isinstance(e, USAGE):
        return 2
    if isinstance(e, (V4jaxError, *PATH_ERRORS)):
        return 1
    if isinstance(e, OSError) and (e.filename is not None or e.errno in DISK_ERRNOS):
        return 1
    if isinstance(e, KeyboardInterrupt):
        return 130
    return None


def message(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename is not None else e.strerror
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _fail(prog: str, text: str, code: int):
    sys.stdout.flush()
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # a file name's undecodable bytes, escaped
    print(f"{prog}: {text}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _join(args: argparse.Namespace) -> None:
    """jax.distributed.initialize (CPU devices exchange collectives over gloo; other backends ignore
    it). Every process runs the command; only process 0 prints its results."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
    if jax.process_index() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
