"""The docs stay true: README's Python example runs, every relative link points at a file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def fenced_block(text: str, heading: str, language: str = "python") -> str:
    """The first ```language block after the markdown heading ``heading``."""
    start = text.index(heading)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    if match is None:
        raise AssertionError(f"no {language} block after {heading!r}")
    return match.group(1)


def test_readme_python_example_runs():
    code = fenced_block((ROOT / "README.md").read_text(), "## The Python API in a few lines")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["x"].shape == (4, 3, 32, 32)


def test_a_broken_example_is_caught():
    broken = "## The Python API in a few lines\n\n```python\nimport difflab as dl\ndl.nope\n```\n"
    with pytest.raises(AttributeError):
        exec(fenced_block(broken, "## The Python API in a few lines"), {})


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page):
    missing = []
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{page.name} links to missing files: {missing}"
