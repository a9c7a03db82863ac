"""The README and docs/*.md stay true to the repository and the CLI.

- Every relative link ``[text](path)`` or ``[text](path#anchor)`` points at a file or folder
  inside the repository; an anchor into a Markdown page names one of its headings.
- Every ``--flag`` the pages mention is a flag of an mtbert command (collected from the click
  commands of ``mtbert.cli``), or a flag of another tool listed in OTHER_TOOLS_FLAGS.
- The README stays short (issue 19: a newcomer reads it in five minutes).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

# Flags of tools other than mtbert that the pages show, by tool. Keep it short: a flag
# belongs here only when a page shows it on that tool's command line.
OTHER_TOOLS_FLAGS = {
    # torchrun (docs/scaling.md)
    "--standalone", "--nproc-per-node", "--nnodes", "--rdzv-backend", "--rdzv-endpoint",
    "--max-restarts",
    # tensorboard --logdir, mlflow ui --backend-store-uri (docs/monitoring.md)
    "--logdir", "--backend-store-uri",
    # pytest / pytest-benchmark (make bench)
    "--benchmark-only",
    # pip (make setup installs the model package with --no-deps)
    "--no-deps",
    # maturin (maturin develop --release)
    "--release",
    # benches/bench_distributed.py and bench_overlap.py (docs/scaling.md)
    "--reps", "--steps",
}

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
IMAGE = re.compile(r"!\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")
EXTERNAL = ("http://", "https://", "mailto:")


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(0)[1:-1], heading)
    text = LINK.sub(lambda m: m.group("text"), text)
    text = text.strip().lower()
    kept = []
    for ch in text:
        if ch in " -_" or unicodedata.category(ch)[0] in "LN":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a Markdown text (repeated headings get -1, -2, ...)."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in _prose_lines(text):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(text: str):
    """(line number, target) of every link and image outside fenced code blocks."""
    for number, line in _prose_lines(text):
        for pattern in (LINK, IMAGE):
            for match in pattern.finditer(line):
                yield number, match.group("target")


def broken_links(page: Path, text: str, root: Path = ROOT) -> list[str]:
    problems = []
    for number, target in links(text):
        if target.startswith(EXTERNAL):
            continue
        path_part, _, anchor = target.partition("#")
        where = f"{page.relative_to(root)}:{number}: {target}"
        resolved = (page.parent / path_part).resolve() if path_part else page.resolve()
        try:
            resolved.relative_to(root)
        except ValueError:
            problems.append(f"{where} (outside the repository)")
            continue
        if not resolved.exists():
            problems.append(f"{where} (no such file or folder)")
            continue
        if anchor and resolved.is_file() and resolved.suffix == ".md":
            if anchor not in anchors(resolved.read_text(encoding="utf-8")):
                problems.append(f"{where} (no heading with anchor #{anchor})")
    return problems


def flags_in(text: str):
    """(line number, flag) of every --flag in a text, code blocks included."""
    for number, line in enumerate(text.splitlines(), 1):
        for match in FLAG.finditer(line):
            yield number, match.group(0)


def unknown_flags(page: Path, text: str, known: set[str], root: Path = ROOT) -> list[str]:
    return [f"{page.relative_to(root)}:{number}: {flag}"
            for number, flag in flags_in(text) if flag not in known and flag not in OTHER_TOOLS_FLAGS]


@pytest.fixture(scope="module")
def cli_flags() -> set[str]:
    import click

    from mtbert.__main__ import SUBCOMMANDS

    flags: set[str] = set()
    for command in SUBCOMMANDS.values():  # every `mtbert COMMAND` (the mtbert-* scripts are the same)
        # get_params adds the help option (--help) to the declared params.
        for param in command.get_params(click.Context(command)):
            for opt in [*param.opts, *getattr(param, "secondary_opts", [])]:
                if opt.startswith("--"):
                    flags.add(opt)
    return flags


def test_pages_exist():
    assert (ROOT / "docs" / "index.md").is_file()
    assert len(PAGES) > 2


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    problems = broken_links(page, page.read_text(encoding="utf-8"))
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_flags_exist_in_cli(page: Path, cli_flags: set[str]):
    problems = unknown_flags(page, page.read_text(encoding="utf-8"), cli_flags)
    assert not problems, ("flags that no mtbert command has (add them to OTHER_TOOLS_FLAGS only "
                          "if they belong to another tool):\n" + "\n".join(problems))


def test_other_tools_flags_do_not_hide_cli_flags(cli_flags: set[str]):
    assert not OTHER_TOOLS_FLAGS & cli_flags


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_every_docs_page_is_listed_in_the_index():
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    listed = {target.partition("#")[0] for _, target in links(index)}
    missing = [p.name for p in PAGES[1:] if p.name != "index.md" and p.name not in listed]
    assert not missing, f"docs/index.md does not link {missing}"


# ---------------------------------------------------------------- the checks themselves

def test_checks_catch_bad_links_and_flags(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# A `code` heading, here\n\n## Again\n## Again\n")
    page = tmp_path / "docs" / "page.md"
    text = ("[ok](there.md#a-code-heading-here) [ok](there.md#again-1) [ok](../docs/)\n"
            "[web](https://example.org/none) [gone](missing.md) [bad anchor](there.md#nope)\n"
            "[out](../../elsewhere.md)\n"
            "```sh\n[not a link](nowhere.md)\nmtbert-train --no-such-flag --out x\n```\n")
    page.write_text(text)
    problems = broken_links(page, text, root=tmp_path)
    assert [p.split(": ", 1)[1].split(" (")[0] for p in problems] == [
        "missing.md", "there.md#nope", "../../elsewhere.md"]
    assert unknown_flags(page, text, {"--out"}, root=tmp_path) == ["docs/page.md:6: --no-such-flag"]
    # an anchor such as #cost-of-each---combine-method is not a flag
    assert list(flags_in("[x](b.md#cost-of-each---combine-method) |---|")) == []
