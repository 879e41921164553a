"""Every list option of every stage takes ``--opt a b`` and ``--opt a --opt b`` alike."""

import argparse
import importlib

import pytest

from featurepipe.__main__ import STAGES
from featurepipe.cli import OneLineParser


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def stage_parser(stage, monkeypatch):
    """The parser a stage's ``main`` builds (caught at its parse_args)."""
    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    monkeypatch.setattr(OneLineParser, "parse_args", capture)
    module = importlib.import_module(STAGES[stage][0])
    with pytest.raises(_Captured) as caught:
        module.main([])
    monkeypatch.undo()
    return caught.value.parser


def _values(action):
    if action.choices:
        return [str(c) for c in list(action.choices)[:2]]
    if action.type in (int, float):
        return ["1", "2"]
    return ["a=1", "b=2"] if action.metavar and "=" in str(action.metavar) else ["one", "two"]


def _positionals(parser):
    argv = []
    for action in parser._actions:
        if not action.option_strings:
            argv += _values(action)[:1]
    return argv


def _list_options(parser):
    return [a for a in parser._actions if a.option_strings and (a.nargs in ("+", "*") or
            isinstance(a, (argparse._AppendAction, argparse._ExtendAction)))]


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_list_option_accepts_both_forms(stage, monkeypatch):
    parser = stage_parser(stage, monkeypatch)
    for action in _list_options(parser):
        flag, (a, b) = action.option_strings[-1], _values(action)
        one = parser.parse_args([*_positionals(parser), flag, a, b])
        repeated = parser.parse_args([*_positionals(parser), flag, a, flag, b])
        assert getattr(one, action.dest) == getattr(repeated, action.dest) == [
            action.type(a) if action.type else a, action.type(b) if action.type else b], f"{stage} {flag}"


def test_the_walk_sees_the_list_options(monkeypatch):
    flags = {f for stage in STAGES for a in _list_options(stage_parser(stage, monkeypatch)) for f in a.option_strings}
    assert {"--clf", "--backbone", "--features", "--grid", "--layer", "--finetune"} <= flags
