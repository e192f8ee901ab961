"""The CLI dispatcher: user errors are one line and exit code 2."""

from __future__ import annotations

import types

from vistune import cli
from vistune.errors import VistuneError


def _fake_module(exc: Exception | None):
    def add_arguments(parser):
        parser.add_argument("--x", default="1")

    def run(args):
        if exc is not None:
            raise exc
        return 0

    return types.SimpleNamespace(HELP="fake", add_arguments=add_arguments, run=run)


def test_user_error_is_one_line_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "fake", "fake")
    monkeypatch.setattr(cli, "_load", lambda name: _fake_module(VistuneError("bad image x.png")))
    assert cli.main(["fake"]) == 2
    err = capsys.readouterr().err
    assert err == "vistune: error: bad image x.png\n"


def test_debug_shows_traceback(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "fake", "fake")
    monkeypatch.setattr(cli, "_load", lambda name: _fake_module(VistuneError("boom")))
    assert cli.main(["--debug", "fake"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("vistune: error: boom")


def test_success_returns_zero(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "fake", "fake")
    monkeypatch.setattr(cli, "_load", lambda name: _fake_module(None))
    assert cli.main(["fake", "--x", "2"]) == 0
