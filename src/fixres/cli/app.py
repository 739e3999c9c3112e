"""The ``fixres`` command line: argparse front end, shared flags, error handling and exit codes.

Each subcommand lives in ``fixres.cli.<name>`` with ``add_parser(subparsers, parents)`` and
``run(args) -> dict``. Those modules import nothing heavy at the top, so ``fixres --help`` and
``fixres SUB --help`` answer without importing torch. Exit codes: 0 ok, 1 runtime failure,
2 usage error (one line on stderr; a traceback only with ``-v``), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import traceback

from fixres.errors import FixresError
from fixres.version import __version__

#: Subcommands, in the order ``fixres --help`` lists them.
COMMANDS = ("fix", "analyze", "eval", "sweep", "finetune", "adapt", "stats", "train", "make-dataset", "report")
#: Subcommands that only run forwards over photos the DataLoader workers read. Their OpenMP threads sleep when a
#: parallel region ends instead of spinning (``OMP_WAIT_POLICY``): on a CPU the workers decode on the same cores,
#: and spinning threads would take the workers' time. Training keeps the default: its backward runs many short
#: regions, for which waking a sleeping thread costs more than it saves.
FORWARD_ONLY_COMMANDS = ("eval", "sweep", "stats")
#: Read by OpenMP once, when torch loads it: set before any subcommand imports torch; a user's own setting wins.
OPENMP_WAIT = ("OMP_WAIT_POLICY", "PASSIVE")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line on stderr and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def out_folder(text: str) -> str:
    """--out: a folder (new or existing); an existing regular file there, or above it (``afile/sub``), is a
    usage error, not exit 1 later."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    above = os.path.dirname(os.path.abspath(text))
    while not os.path.exists(above) and os.path.dirname(above) != above:
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be a folder: {above!r} is a file")
    return text


def common_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    g.add_argument("--out", default=None, type=out_folder, metavar="DIR",
                   help="folder for result files (default: per command)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summaries")
    g.add_argument("-v", "--verbose", action="store_true", help="more detail; tracebacks on errors")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="fixres",
        description="Fix the train-test resolution discrepancy of image classifiers (FixRes, NeurIPS 2019).",
        epilog="With no arguments, `fixres fix` runs the whole method on an embedded data set.",
    )
    parser.add_argument("--version", action="version", version=f"fixres {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    parents = [common_parent()]
    for name in COMMANDS:
        module = importlib.import_module(f"fixres.cli.{name.replace('-', '_')}")
        sp = module.add_parser(sub, parents)
        sp.set_defaults(_module=module)
    return parser


def say(text: str, file=None) -> None:
    """print(), except that a file name which is not valid UTF-8 (surrogate escapes) cannot make it fail:
    such characters are shown as backslash escapes instead of crashing the end of a long run."""
    stream = file or sys.stdout
    try:
        print(text, file=stream)
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "utf-8"
        print(text.encode(encoding, "backslashreplace").decode(encoding, "replace"), file=stream)


def emit(args: argparse.Namespace, result, text: str | None = None) -> None:
    """Print a result (a dict, or a typed result with ``to_json``): JSON with --json, else the human text (nothing
    with -q)."""
    result = result.to_json() if hasattr(result, "to_json") else result
    if getattr(args, "json", False):
        clean = {k: v for k, v in result.items() if not k.startswith("_")}
        say(json.dumps(clean, indent=2, default=_jsonable))
    elif text and not getattr(args, "quiet", False):
        say(text)


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _one_line(text: str) -> str:
    """An error message as one line, whatever the library put in it."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _oom_message(exc: BaseException) -> str | None:
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text:
        return "out of memory: try a smaller --batch-size (or a smaller --test-size)"
    return None


def _out_folder_of(args: argparse.Namespace) -> str | None:
    """The folder this command writes to: --out, else the command's default."""
    from fixres.config import default_out
    return args.out or default_out(args.command)


def _refuse_out_inside_data(folder: str, data) -> None:
    """An output folder inside --data: the next run would read this run's files as photos of a class."""
    from fixres.errors import UsageError
    if not data or not os.path.isdir(data):
        return
    data_real, out_real = os.path.realpath(data), os.path.realpath(folder)
    if out_real == data_real or out_real.startswith(data_real.rstrip(os.sep) + os.sep):
        raise UsageError(f"the output folder {folder} is inside the data folder {data}: its files would be read "
                         "as photos; choose an --out outside the data")


def _output_lock(args: argparse.Namespace):
    """The exclusive lock of the folder this command writes to (``fixres.io.lock``): one run per --out.

    Rank 0 alone locks under torchrun (the ranks of one job share the folder). ``report`` writes below
    its RUN_DIR, not to --out; ``analyze`` writes only with --plot; a generated data set is replaced as
    a whole, so its lock sits beside it. A folder inside --data, or one that cannot be written (read-only,
    no permission), is a usage error before anything runs.
    """
    import contextlib

    from fixres.errors import UsageError
    from fixres.io import lock
    if args.command == "report" or (args.command == "analyze" and not getattr(args, "plot", False)):
        return contextlib.nullcontext()
    folder = _out_folder_of(args)
    if folder is None or not lock.rank_is_main():
        return contextlib.nullcontext()
    _refuse_out_inside_data(folder, getattr(args, "data", None))
    beside = lock.sibling_lock(folder) if args.command == "make-dataset" else None
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(lock.locked_folder(folder, lock_path=beside))
    except OSError as exc:  # taking the lock is the first write: a read-only or unwritable --out fails here
        raise UsageError(f"cannot write to the output folder {folder} ({exc.strerror or exc}); "
                         "choose a folder you can write to with --out") from None
    return stack


def _result_files(args: argparse.Namespace):
    """The command's result files (its ``RESULT_FILES``, and the export's files when ``WRITES_EXPORT``): all
    of this run's, or all as they were when it fails (``fixres.io.atomic.all_or_none``)."""
    import contextlib

    from fixres.io import lock
    from fixres.io.atomic import all_or_none
    names = tuple(getattr(args._module, "RESULT_FILES", ()))
    folder = _out_folder_of(args)
    if getattr(args._module, "WRITES_EXPORT", False):
        from fixres.models.export import EXPORT_FILES
        names += EXPORT_FILES
    if not names or folder is None or not lock.rank_is_main():
        return contextlib.nullcontext()
    return all_or_none(folder, names)


def _name_columns(args: argparse.Namespace) -> None:
    """--image-column/--label-column written into the --data value, so the run's data is one value throughout."""
    image, label = getattr(args, "image_column", None), getattr(args, "label_column", None)
    if image is not None or label is not None:
        from fixres.data.layouts import with_columns
        args.data = with_columns(args.data or "", image=image, label=label)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["fix"]  # the main job on the embedded default
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in FORWARD_ONLY_COMMANDS:
        os.environ.setdefault(*OPENMP_WAIT)
    args._invocation = shlex.join(["fixres", *argv])  # what an export's model card says made it
    try:
        _name_columns(args)
        with _output_lock(args), _result_files(args):
            result = args._module.run(args)
        if isinstance(result, tuple):
            emit(args, *result)
        elif result is not None:
            emit(args, result)
        return 0
    except KeyboardInterrupt:
        print("fixres: interrupted", file=sys.stderr)
        return 130
    except FixresError as exc:
        if args.verbose:
            traceback.print_exc()
        msg = _one_line(str(exc))
        if _oom_message(exc) and "--batch-size" not in msg:  # a library message that wraps an OOM
            msg += " (out of memory: try a smaller --batch-size)"
        say(f"fixres {args.command}: error: {msg}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the CLI edge turns every failure into one line
        if args.verbose:
            traceback.print_exc()
        if isinstance(exc, OSError) and exc.errno in (28, 122):  # ENOSPC, EDQUOT: say where, as a usage error
            where = f" writing {exc.filename}" if exc.filename else ""
            say(f"fixres {args.command}: error: the disk is full{where}: free space there or choose another --out",
                file=sys.stderr)
            return 2
        msg = _oom_message(exc) or f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        hint = "" if args.verbose else " (run with -v for the traceback)"
        say(f"fixres {args.command}: error: {msg}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
