"""The README is the front door and docs/ the manual: every relative link resolves, every docs page
is reachable from the README, and nothing points at files a user of the repository does not have."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: [text](target) with a relative target (no scheme, no pure #anchor); the anchor part is dropped.
LINK = re.compile(r"\[[^\]]*\]\((?!https?://|mailto:|#)([^)\s#]+)(?:#[^)]*)?\)")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "plugins").rglob("README.md"))]


def links(page: Path) -> list[str]:
    return LINK.findall(page.read_text(encoding="utf-8"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = [target for target in links(page) if not (page.parent / target).exists()]
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_points_outside_the_repository(page):
    text = page.read_text(encoding="utf-8")
    assert "../shared" not in text, f"{page.relative_to(ROOT)} points at ../shared, which users do not have"
    outside = [t for t in links(page) if not (page.parent / t).resolve().is_relative_to(ROOT)]
    assert not outside, f"{page.relative_to(ROOT)} links outside the repository: {outside}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target).resolve() for target in links(ROOT / "README.md")}
    pages = {page.resolve() for page in (ROOT / "docs").glob("*.md")}
    assert not pages - linked, f"docs pages the README does not link: {sorted(p.name for p in pages - linked)}"


def test_the_readme_stays_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    headings = [line for line in lines if line.startswith("#")]
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the manual belongs in docs/"
    assert len(headings) == len(set(headings)), f"README.md repeats a section: {headings}"


def test_the_readme_lists_every_built_in_method_once():
    from camrt.plugins import create_plugin_manager
    from camrt.plugins.registry import build_method_registry

    registry = build_method_registry(create_plugin_manager(load_entrypoints=False, modules=()))
    builtin = {name for name in registry.names() if registry.plugin_of(name).startswith("camrt.")}
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Methods", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- `([^`]+)`:", section, flags=re.M)
    assert sorted(listed) == sorted(builtin), "README's method list differs from the built-in methods"
