"""The ``tokbench`` command line as a new user reads it: ``--version``, and a help text for
every command and option, with its default, found by walking the parser (no list kept here)."""

from __future__ import annotations

import argparse
from importlib import metadata

import pytest

from tokbench.cli import build_parser, main


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """``(path, parser)`` of the top-level parser and of every (nested) sub-command."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, path + (name,))


COMMANDS = list(commands(build_parser()))


def test_the_parser_walk_finds_every_command():
    # The walk must reach the nested `data` sub-commands, or the checks below check nothing.
    assert {" ".join(path) for path, _ in COMMANDS} >= {"", "data", "data synth", "data prepare", "train",
                                                         "sweep", "report", "tokenizers"}


def test_version_prints_the_installed_distributions_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"tokbench {metadata.version('tokbench')}"


@pytest.mark.parametrize("path", [path for path, _ in COMMANDS], ids=lambda path: " ".join(path) or "tokbench")
def test_every_command_help_exits_0_in_plain_text(path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"usage: tokbench {' '.join(path)}".rstrip())
    assert "``" not in shown and ":func:" not in shown  # reST markup reads as noise in a terminal
    assert "(default: None)" not in shown and "(default: False)" not in shown


@pytest.mark.parametrize("path, parser", COMMANDS, ids=[" ".join(p) or "tokbench" for p, _ in COMMANDS])
def test_every_option_and_sub_command_says_what_it_does(path, parser):
    assert parser.description, f"tokbench {' '.join(path)} has no description"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {choice.dest: choice.help for choice in action._choices_actions}
            assert set(listed) == set(action.choices)
            for name, text in listed.items():
                assert text, f"tokbench {' '.join(path + (name,))} has no help line"
        elif not isinstance(action, argparse._HelpAction):
            assert action.help and action.help.strip(), f"tokbench {' '.join(path)} {action.dest}: no help text"


@pytest.mark.parametrize("path, parser", COMMANDS, ids=[" ".join(p) or "tokbench" for p, _ in COMMANDS])
def test_every_meaningful_default_is_shown(path, parser):
    shown = " ".join(parser.format_help().split())  # undo the line wrapping
    for action in parser._actions:
        default = action.default
        if default in (None, False, "", [], argparse.SUPPRESS) or isinstance(action, argparse._SubParsersAction):
            continue
        assert f"(default: {default})" in shown, f"tokbench {' '.join(path)} {action.dest}: default {default!r} not shown"


def test_an_option_without_a_shown_default_says_what_happens_without_it():
    # An optional value whose default is None is explained in words ("default: X") instead.
    prepare = dict(COMMANDS)[("data", "prepare")]
    texts = {a.dest: a.help for a in prepare._actions}
    assert "default: every gene" in texts["n_top_genes"]
    assert "default: X" in texts["layer"]


def test_tokenizers_imports_a_plugin_module_first(tmp_path, capsys):
    plugin = tmp_path / "cli_plugin_that_registers_nothing.py"
    plugin.write_text("IMPORTED = True\n")
    assert main(["tokenizers", "--plugin", str(plugin)]) == 0
    assert "geneformer" in capsys.readouterr().out  # the catalogue, presets included
    import cli_plugin_that_registers_nothing

    assert cli_plugin_that_registers_nothing.IMPORTED


def test_tokenizers_with_a_missing_plugin_fails_in_one_line(tmp_path, capsys):
    assert main(["tokenizers", "--plugin", str(tmp_path / "absent.py")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "absent.py: no such file" in err
