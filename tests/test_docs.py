"""The docs stay true of the code.

- README's "The Python API in a few lines" block runs as written, and its forward-process
  line gives DDPM eq. 4 (Ho et al. 2020): x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε.
- Every Python block in README.md and docs/*.md is valid syntax.
- Every ``difflab <command> --flag`` in a shell block or an inline code span names a
  subcommand and options that ``difflab.cli.build_parser()`` defines.
- Every relative markdown link resolves to an existing file.

Blocks are found by the heading they sit under (a small fence-aware parser: a ``#`` line
inside a fenced block is not a heading), so moving a section keeps the test meaningful and
removing it fails loudly.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
API_HEADING = "The Python API in a few lines"

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_HEADING = re.compile(r"^ {0,3}(?P<hashes>#{1,6})\s+(?P<title>.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*(?:<(?P<angled>[^>]+)>|(?P<plain>[^)\s]+))[^)]*\)")
_SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
_COMMAND = re.compile(
    r"(?:^\s*|[;&|]\s*)difflab\s+(?P<args>\S.*)$|-m\s+difflab\.cli\s+(?:--\s+)?(?P<module_args>\S.*)$"
)


@dataclass
class Block:
    """One fenced code block: its info-string language, its text and its section heading."""

    language: str
    code: str
    heading: str | None
    line: int


def parse_markdown(text: str) -> tuple[list[Block], str]:
    """Fenced blocks (with the heading each sits under) and the prose with blocks removed."""
    blocks: list[Block] = []
    prose: list[str] = []
    heading: str | None = None
    fence: str | None = None
    language, body, start = "", [], 0
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None:
            if match:
                fence, language, body, start = match["fence"], match["info"].strip(), [], number
                language = language.split()[0].lower() if language else ""
                continue
            title = _HEADING.match(line)
            if title:
                heading = title["title"]
            prose.append(line)
        elif match and match["fence"][0] == fence[0] and len(match["fence"]) >= len(fence):
            if not match["info"].strip():
                blocks.append(Block(language, "\n".join(body) + "\n", heading, start))
                fence = None
                continue
            body.append(line)
        else:
            body.append(line)
    if fence is not None:
        raise AssertionError(f"unclosed code fence opened at line {start}")
    return blocks, "\n".join(prose)


def fenced_block(text: str, heading: str, language: str = "python") -> str:
    """The single ``language`` block directly under the heading titled ``heading``."""
    blocks, _ = parse_markdown(text)
    found = [b.code for b in blocks if b.heading == heading and b.language == language]
    if len(found) != 1:
        raise AssertionError(f"expected one {language} block under {heading!r}, found {len(found)}")
    return found[0]


def run_example(code: str, filename: str) -> dict:
    """Execute ``code`` in a fresh namespace and return that namespace."""
    namespace: dict = {"__name__": "__docs_example__"}
    exec(compile(code, filename, "exec"), namespace)
    return namespace


# --------------------------------------------------------------------- the README example
def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    from _tiny_run import make_tiny_run

    make_tiny_run(tmp_path / "runs" / "demo", num_classes=10)  # the example's trained run
    monkeypatch.chdir(tmp_path)
    ns = run_example(fenced_block((ROOT / "README.md").read_text(), API_HEADING), "README.md")
    digits, filled, hole = ns["digits"], ns["filled"], ns["hole"]
    assert digits.shape == filled.shape == (10, 1, 8, 8)
    assert torch.equal(filled * (1 - hole), digits * (1 - hole))  # the kept upper half
    x = ns["x"]
    assert isinstance(x, torch.Tensor) and x.shape == (4, 3, 32, 32)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    sched, x0, x_t, noise = ns["sched"], ns["x0"], ns["x_t"], ns["noise"]
    ab = sched.alphas_cumprod[500]
    expected = ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()
    torch.testing.assert_close(x_t.double(), expected, rtol=1e-5, atol=1e-5)


def test_readme_example_extraction_fails_on_broken_or_missing_blocks():
    broken = f"# t\n\n## {API_HEADING}\n\n```python\nimport difflab as dl\ndl.no_such_name\n```\n"
    with pytest.raises(AttributeError, match="no_such_name"):
        run_example(fenced_block(broken, API_HEADING), "broken.md")
    moved = f"## {API_HEADING}\n\ntext\n\n## Next\n\n```python\nx = 1\n```\n"
    with pytest.raises(AssertionError, match="expected one python block"):
        fenced_block(moved, API_HEADING)
    # a '#' comment inside a fence is not a heading, so the block stays under its section
    commented = f"## {API_HEADING}\n\n```bash\n# not a heading\n```\n\n```python\ny = 2\n```\n"
    assert fenced_block(commented, API_HEADING) == "y = 2\n"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_python_blocks_are_valid_syntax(page):
    blocks, _ = parse_markdown(page.read_text())
    for block in blocks:
        if block.language == "python":
            compile(block.code, f"{page.name}:{block.line}", "exec")


# --------------------------------------------------------------------- command-line flags
def cli_options() -> dict[str, set[str]]:
    """Subcommand -> its option strings, from the real parser."""
    from difflab.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: set(p._option_string_actions) for name, p in sub.choices.items()}


def difflab_commands(shell: str) -> list[str]:
    """``difflab ...`` command lines of a shell block, continuation lines joined."""
    commands: list[str] = []
    current: str | None = None
    for raw in shell.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        starts = _COMMAND.search(line)
        if starts:
            if current is not None:
                commands.append(current)
            current = (starts["args"] or starts["module_args"]).rstrip("\\ ")
        elif current is not None and raw[:1].isspace() and line.strip():
            current += " " + line.strip().rstrip("\\ ")
        else:
            if current is not None:
                commands.append(current)
            current = None
    if current is not None:
        commands.append(current)
    return commands


def unknown_flags(command: str, options: dict[str, set[str]]) -> list[str]:
    """Problems with one ``<subcommand> [args]`` string: unknown subcommand or options."""
    words = command.split()
    if not words or words[0] not in options:
        return [f"unknown subcommand in 'difflab {command}'"]
    flags = re.findall(r"(?<![\w.=/-])(--?[A-Za-z][\w-]*)", command)
    return [f"'difflab {words[0]}' has no option {f}" for f in flags if f not in options[words[0]]]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_documented_cli_flags_exist(page):
    options = cli_options()
    blocks, prose = parse_markdown(page.read_text())
    commands = [c for b in blocks if b.language in _SHELL_LANGS for c in difflab_commands(b.code)]
    commands += [
        m.group(2).strip()[len("difflab ") :]
        for m in _INLINE_CODE.finditer(prose)
        if re.match(r"difflab [a-z]", m.group(2).strip())
    ]
    problems = [p for c in commands for p in unknown_flags(c, options)]
    assert not problems, f"{page.name}: {problems}"


def test_flag_check_catches_unknown_options_and_subcommands():
    options = cli_options()
    text = (
        "```bash\ndifflab sample runs/x --n 4 --no-such-flag \\\n    -o a.png  # --ok-in-comment\n"
        "pip install . && difflab nosuchcmd --n 1\n"
        "torchrun --nproc_per_node 2 -m difflab.cli train c.yaml --bogus\n```\n"
    )
    blocks, _ = parse_markdown(text)
    commands = difflab_commands(blocks[0].code)
    assert commands == [
        "sample runs/x --n 4 --no-such-flag -o a.png",
        "nosuchcmd --n 1",
        "train c.yaml --bogus",
    ]
    problems = [p for c in commands for p in unknown_flags(c, options)]
    assert problems == [
        "'difflab sample' has no option --no-such-flag",
        "unknown subcommand in 'difflab nosuchcmd --n 1'",
        "'difflab train' has no option --bogus",
    ]


# --------------------------------------------------------------------- relative links
def relative_links(text: str) -> list[str]:
    """Targets of markdown links and images outside code (fenced blocks, inline spans)."""
    _, prose = parse_markdown(text)
    prose = _INLINE_CODE.sub("", prose)
    targets = [m["angled"] or m["plain"] for m in _LINK.finditer(prose)]
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", t, re.I)]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page):
    missing = []
    for target in relative_links(page.read_text()):
        path = (page.parent / target.split("#", 1)[0].split("?", 1)[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{page.name} links to missing files: {missing}"


def test_link_check_sees_links_and_skips_code():
    text = (
        "See [a](docs/a.md#x), ![img](<img/b c.png>), [web](https://x.org), [top](#top).\n"
        "`[not](inline.md)`\n\n```python\nx[i](j)\n```\n"
    )
    assert relative_links(text) == ["docs/a.md#x", "img/b c.png"]


def test_docs_pages_found():
    names = {p.name for p in PAGES}
    assert {"README.md", "design.md", "maths.md", "samplers.md", "training.md"} <= names
    assert {"evaluation.md", "demo.md"} <= names
