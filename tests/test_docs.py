"""The documentation builds, and the README's links lead somewhere.

The pages' code blocks run in test_readme.py; here: ``mkdocs build --strict`` (every page in the nav,
no link to a missing page or anchor) and the README's relative links, which GitHub resolves against
the repository (not the docs site) and mkdocs never sees.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]') is not installed")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "switching" / "index.html").is_file()


def test_every_relative_link_of_the_readme_resolves():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = [target for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in target]
    assert len(links) >= 10, links  # the front page links to the docs pages
    missing = [target for target in links if not (ROOT / target).exists()]
    assert missing == [], f"README links to files that do not exist: {missing}"


def test_every_docs_page_is_linked_from_the_readme():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    pages = {f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md")} - {"docs/index.md", "docs/changelog.md"}
    assert pages, "no docs pages found"
    assert sorted(page for page in pages if f"]({page}" not in text) == []
