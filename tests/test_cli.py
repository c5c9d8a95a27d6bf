"""The command line as a whole: one shell over the library, options derived from the settings dataclasses,
signals turned into stop events, and exit statuses."""

from __future__ import annotations

import ast
import dataclasses
import os
import signal

import pytest
from helpers.models import REPO

import circuitmap.cli as cli
from circuitmap import AttributionConfig, BuildConfig, PruneConfig
from circuitmap.config import field_docs
from circuitmap.errors import CircuitmapError, Interrupted
from circuitmap.training import TrainConfig


def _imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_nothing_but_the_entry_point_imports_the_command_line():
    package = REPO / "src" / "circuitmap"
    files = [*package.rglob("*.py"), *(REPO / "examples").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]
    outside = [path for path in files if package / "cli" not in path.parents and path.name != "__main__.py"]
    offenders = [
        str(path.relative_to(REPO))
        for path in outside
        if any(
            name == "circuitmap.cli" or name.startswith("circuitmap.cli.") for name in _imported_modules(path)
        )
    ]
    assert offenders == []
    for module in cli.COMMAND_GROUPS:
        path = package / "cli" / f"{module}.py"
        siblings = {f"circuitmap.cli.{other}" for other in cli.COMMAND_GROUPS if other != module}
        assert not siblings & _imported_modules(path), f"cli/{module}.py imports another command group"


def _help(capsys, *command: str) -> str:
    with pytest.raises(SystemExit):
        cli.main([*command, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("command", "settings", "names"),
    [
        (["train"], TrainConfig, None),
        (["features", "build"], BuildConfig, None),
        (["attribute"], AttributionConfig, None),
        (["attribute"], PruneConfig, None),
        (["export-html"], PruneConfig, None),
        (["serve"], AttributionConfig, ["max_feature_nodes"]),
    ],
)
def test_settings_options_show_the_documented_defaults(capsys, command, settings, names):
    shown = _help(capsys, *command)
    docs = field_docs(settings)
    for field in dataclasses.fields(settings):
        if names is not None and field.name not in names:
            continue
        assert " ".join(docs[field.name].rstrip(".").split()) in shown, field.name
        if field.default is not None and not isinstance(field.default, str):
            default = f"{field.default:,}" if isinstance(field.default, int) else f"{field.default:g}"
            assert f"(default: {default}" in shown, field.name


def test_parsed_options_become_settings_and_unset_ones_keep_the_defaults():
    args = cli.build_parser().parse_args(
        ["train", "--out", "x", "--d-features", "64", "-k", "8", "--lr", "0.01"]
    )
    values = cli.settings_from(args, TrainConfig)
    assert set(values) == {field.name for field in dataclasses.fields(TrainConfig)}
    config = TrainConfig().with_changes(**values)
    assert (config.d_features, config.k, config.lr) == (64, 8, 0.01)
    assert config.n_tokens == TrainConfig().n_tokens
    args = cli.build_parser().parse_args(
        ["attribute", "--transcoders", "t", "--out", "o", "--edge-threshold", "0.5"]
    )
    assert PruneConfig().with_changes(**cli.settings_from(args, PruneConfig)) == PruneConfig(
        edge_threshold=0.5
    )


def test_signals_set_the_stop_event_and_a_second_one_stops_at_once(capsys):
    before = signal.getsignal(signal.SIGINT)
    with cli.stop_on_signals() as stop:
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    assert "stopping after this step" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("error", "status", "prefix"),
    [
        (Interrupted("stopped after 12 steps; run the same command to resume"), 130, "circuitmap: stopped"),
        (CircuitmapError("the prompt is empty"), 2, "circuitmap: error: the prompt is empty"),
        (KeyboardInterrupt(), 130, "circuitmap: interrupted"),
    ],
)
def test_exit_statuses(monkeypatch, capsys, error, status, prefix):
    def fail(args):
        raise error

    monkeypatch.setattr("circuitmap.cli.model._next", fail)
    assert cli.main(["next", "a prompt"]) == status
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix)
