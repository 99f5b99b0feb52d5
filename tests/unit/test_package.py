"""Package metadata (issue 13 part 7): the license is declared and shipped, the changelog
covers the current version, the README has no links out of the repository."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import blocknode

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_license_is_the_agpl_text_and_declared():
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("GNU AFFERO GENERAL PUBLIC LICENSE\n")
    assert "Version 3, 19 November 2007" in text and "END OF TERMS AND CONDITIONS" in text
    assert len(text.splitlines()) == 661  # the FSF's text, whole
    assert PROJECT["license"] == "AGPL-3.0-or-later" and PROJECT["license-files"] == ["LICENSE"]
    for key in ("authors", "keywords", "classifiers", "urls"):
        assert PROJECT[key], key
    assert not any(c.startswith("License ::") for c in PROJECT["classifiers"])  # PEP 639: the expression


def test_changelog_covers_this_version():
    text = (REPO / "CHANGELOG.md").read_text()
    assert PROJECT["version"] == blocknode.__version__
    headings = re.findall(r"^## \[([^\]]+)\]", text, flags=re.M)
    assert headings[0] == "Unreleased" and blocknode.__version__ in headings


def test_docs_do_not_link_outside_the_repository():
    for doc in ("README.md", "CHANGELOG.md", "deploy/README.md"):
        assert "../shared" not in (REPO / doc).read_text(), doc
