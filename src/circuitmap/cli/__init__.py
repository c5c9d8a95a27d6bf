"""The ``circuitmap`` command line. Errors in the user's input print one line and exit with status 2; a job
stopped with Ctrl-C or SIGTERM saves what it can resume from and exits with status 130.

``main`` is the error boundary: besides circuitmap's own errors it turns what the system reports while
reading and writing (a missing or unreadable file, a full disk, a read-only folder, a corrupt database or
tensor file) into the same one line. Every text argument must be valid Unicode.

Each command group is a module of this package with a ``register(commands)`` function; the modules parse
arguments, call the library and print, and share only what this module defines: the model options, the
options derived from settings dataclasses, ``positive_int`` and the signal handling of long jobs.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sqlite3
import sys
import threading
import time
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, fields
from typing import Any, NoReturn

from safetensors import SafetensorError

from circuitmap import __version__
from circuitmap.config import field_docs
from circuitmap.errors import CircuitmapError, Interrupted
from circuitmap.features import FeatureStore
from circuitmap.models import DEFAULT_MODEL, Model, load_model
from circuitmap.server.launch import DEFAULT_HOST, DEFAULT_PORT
from circuitmap.transcoders import Transcoders
from circuitmap.validation import check_text

COMMAND_GROUPS = (
    "model",
    "attribute",
    "batch",
    "demo",
    "serve",
    "compare",
    "features",
    "interventions",
    "persona",
    "train",
)
"""The modules of this package that register commands, in the order ``--help`` lists them."""
DEFAULT_PROMPT = "The capital of France is"


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {value}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in the one-line form of every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"circuitmap: error: {message} (see {self.prog} --help)\n")


def add_model_args(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    """``--model``, ``--tokenizer``, ``--device``, ``--device-map`` and ``--dtype``; with ``optional`` the
    model defaults to None (the command decides, e.g. from a graph)."""
    parser.add_argument(
        "--model",
        default=None if optional else DEFAULT_MODEL,
        help=f"model spec: alias, .gguf, llama2.c .bin, folder or hub id (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer file for a llama2.c checkpoint (default: found beside it)"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    parser.add_argument(
        "--device-map",
        metavar="MAP",
        help="spread the model over several devices instead: auto (or balanced, balanced_low_0, sequential) "
        "to fill the GPUs, then the CPU, or a JSON file mapping module names to devices",
    )
    parser.add_argument("--dtype", help="float32 (default), bfloat16, float16 or float64")


def load_model_from_args(args: argparse.Namespace) -> Model:
    """The model the model options name, with the load time on stderr."""
    start = time.perf_counter()
    model = load_model(
        args.model, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer, device_map=args.device_map
    )
    print(f"loaded {model} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return model


def add_feature_database_option(parser: argparse.ArgumentParser, role: str) -> None:
    """``--features DB``: a feature database, ``role`` saying what it does for the command."""
    parser.add_argument(
        "--features",
        metavar="DB",
        help=f"feature database {role} (default: the transcoders' own, if it was built)",
    )


def add_explorer_options(parser: argparse.ArgumentParser) -> None:
    """``--host``, ``--port``, ``--allow-host`` and ``--features``: where the explorer listens, whom it
    answers, and the feature database it shows."""
    parser.add_argument(
        "--host", help=f"address to listen on (default {DEFAULT_HOST}; others must be given explicitly)"
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)"
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another host name requests may address, e.g. behind a proxy (repeatable)",
    )
    add_feature_database_option(parser, "to show dashboards and labels from")


@contextmanager
def feature_database(path: str | None, transcoders: Transcoders | None) -> Iterator[FeatureStore | None]:
    """The database ``--features`` names, else the transcoders' own when it was built (None without one),
    closed on exit."""
    store = FeatureStore.open_for(transcoders, path)
    if store is None:
        yield None
        return
    print(f"feature database: {store.path}", file=sys.stderr)
    with store:
        yield store


def add_settings(
    parser: argparse.ArgumentParser,
    settings: type,
    names: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    *,
    default_note: str = "",
) -> None:
    """One option per named field (default: every field) of the settings dataclass ``settings``:
    ``--field-name`` unless ``names`` maps the field to its flags. Type, choices (a field's
    ``metadata["choices"]``), help (its docstring) and the default shown come from the class; the parsed
    default is None, which keeps the settings' value."""
    if names is None:
        names = [field.name for field in fields(settings)]
    flags = names if isinstance(names, Mapping) else {name: [f"--{name.replace('_', '-')}"] for name in names}
    docs = field_docs(settings)
    hints = typing.get_type_hints(settings)
    by_name = {field.name: field for field in fields(settings)}
    for name, options in flags.items():
        field = by_name[name]
        default = "" if field.default is MISSING or field.default is None else _shown(field.default)
        choices = field.metadata.get("choices")
        parser.add_argument(
            *options,
            dest=name,
            type=_scalar_type(hints[name]),
            choices=choices,
            metavar=None if choices else _metavar(hints[name], options[0]),
            help=docs.get(name, "").rstrip(".") + (f" (default: {default}{default_note})" if default else ""),
        )


def settings_from(args: argparse.Namespace, settings: type) -> dict[str, Any]:
    """The values the options of ``add_settings`` parsed, by field name (None where not given)."""
    return {field.name: getattr(args, field.name) for field in fields(settings) if hasattr(args, field.name)}


def _shown(value: Any) -> str:
    """A default as help texts show it: 200,000; 0.002; plt."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def _metavar(hint: Any, flag: str) -> str:
    return "yes|no" if _scalar_type(hint) is yes_no else flag.lstrip("-").replace("-", "_").upper()


def _scalar_type(hint: Any) -> Callable[[str], Any]:
    """``int`` for ``int | None``, and so on: the type an option parses (``yes_no`` for a bool)."""
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return yes_no if hint is bool else hint


def yes_no(text: str) -> bool:
    """A boolean option's value: yes/no, true/false, on/off or 1/0."""
    value = text.strip().casefold()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event that Ctrl-C or SIGTERM sets, so that a long job saves its progress and stops; a second
    Ctrl-C stops at once. Outside the main thread (no signals there) the event is only the caller's."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request_stop(_signal, _frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        print("\nstopping after this step (again to stop now)…", file=sys.stderr)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (each group's module registers its own)."""
    parser = Parser(prog="circuitmap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"circuitmap {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        importlib.import_module(f"circuitmap.cli.{group}").register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for name, value in vars(args).items():
            for text in value if isinstance(value, list | tuple) else [value]:
                if isinstance(text, str):
                    check_text(f"the argument {name.replace('_', '-')}", text, empty=True)
        return args.run(args)
    except Interrupted as error:
        print(f"circuitmap: {error}", file=sys.stderr)
        return 130
    except CircuitmapError as error:
        print(f"circuitmap: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("circuitmap: interrupted", file=sys.stderr)
        return 130
    except (OSError, sqlite3.Error, SafetensorError, UnicodeError) as error:
        print(f"circuitmap: error: {_system_failure(error)}", file=sys.stderr)
        return 2


def _system_failure(error: Exception) -> str:
    """What the system reported, in one line: the reason and the file it concerns."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror.lower()}{where}"
    if isinstance(error, sqlite3.Error):
        return f"the feature database cannot be used: {error}"
    text = " ".join(str(error).split()) or type(error).__name__
    return text if not isinstance(error, SafetensorError) else f"a safetensors file cannot be read: {text}"
