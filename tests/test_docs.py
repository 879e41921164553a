"""The README is a short front page whose links resolve, and the documented commands exist."""

import re
from pathlib import Path

import pytest

from featurepipe.__main__ import STAGES

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"(?:featurepipe |python -m featurepipe[. ])(\w+)([^`|\n]*)")


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150
    text = "\n".join(lines)
    for must in ("make run", "make test", "featurepipe run --data", "docs/report.png"):
        assert must in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name}: broken link {target}"


def _options(stage):
    import importlib

    module = importlib.import_module(STAGES[stage][0])
    if not hasattr(module, "build_parser"):  # a stage package: its parser is in .cli
        module = importlib.import_module(STAGES[stage][0] + ".cli")
    parser = module.build_parser()
    return {s for action in parser._actions for s in action.option_strings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_documented_option_of_a_stage_exists(page):
    known = {}
    for stage, flags in COMMAND.findall(page.read_text()):
        if stage not in STAGES:
            continue
        known.setdefault(stage, _options(stage))
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", flags):
            assert flag in known[stage], f"{page.name}: featurepipe {stage} has no {flag}"
