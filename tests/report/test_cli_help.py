"""`capline --help` and every subcommand's --help describe every argument and option."""

from __future__ import annotations

from typing import Any

import typer
from typer.testing import CliRunner

from pipeline.cli import app


def commands(group: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every (sub)command by its path; typer ships its own click, so groups are told by their `commands`."""
    out = {}
    for name, command in group.commands.items():
        out[(*prefix, name)] = command
        if hasattr(command, "commands"):
            out.update(commands(command, (*prefix, name)))
    return out


def test_every_command_and_parameter_has_help():
    root = typer.main.get_command(app)
    found = commands(root)
    assert {("report",), ("serve",), ("train",), ("data", "download")} <= set(found)
    undocumented = [f"{' '.join(path)} {param.name}" for path, command in found.items()
                    for param in command.params if not (getattr(param, "help", None) or "").strip()]
    assert undocumented == []
    assert [" ".join(path) for path, command in found.items() if not (command.help or "").strip()] == []


def test_help_pages_list_the_options_with_their_text():
    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and "report" in top.output and "serve" in top.output
    serve = runner.invoke(app, ["serve", "--help"], terminal_width=200)
    assert serve.exit_code == 0
    for text in ("--port", "Port to listen on", "--alias", "Registry alias", "scoring server"):
        assert text in serve.output
    report = runner.invoke(app, ["report", "--help"], terminal_width=200)
    assert "--screenshot" in report.output and "headless Chromium" in report.output
