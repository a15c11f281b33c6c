"""The documentation stays true: README.md and docs/**/*.md.

- every relative link points to a file of the repository, and every ``#anchor`` to a heading of
  its target (GitHub's slug rule);
- every ```python block compiles, and a block preceded by the line ``<!-- runnable -->`` runs on
  CPU, in a fresh namespace, within seconds;
- no tracked text file carries words of a work log (issue numbers, sessions, earlier runs or
  commits): documentation and comments describe the software and measured numbers with their date
  and machine.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import textwrap
import time
from typing import NamedTuple

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
RUNNABLE = "<!-- runnable -->"
RUN_LIMIT_S = 20  # generous: the examples take well under a second; the bound catches a runaway

_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"`+[^`]*`+")


class Block(NamedTuple):
    path: pathlib.Path
    line: int  # 1-based line of the opening fence
    lang: str
    source: str
    runnable: bool


def _rel(path: pathlib.Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _split(path: pathlib.Path) -> tuple[list[tuple[int, str]], list[Block]]:
    """(lines outside fenced blocks with their numbers, the fenced blocks)."""
    prose: list[tuple[int, str]] = []
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        indent, fence, lang = m.groups()
        previous = next((text.strip() for text in reversed(lines[:i]) if text.strip()), "")
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1  # the closing fence
        blocks.append(Block(path, start + 1, lang.lower(), "\n".join(body) + "\n", previous == RUNNABLE))
    return prose, blocks


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lowercase, punctuation other than - and _
    removed, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, text in _split(path)[0]:
        m = re.match(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", text)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")  # GitHub numbers repeated headings
    return out


def links(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, target) of every markdown link and image outside code, a link's text may span lines."""
    prose = _split(path)[0]
    text = "\n".join(line for _, line in prose)
    text = _INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)  # offsets kept
    return [(prose[text.count("\n", 0, m.start())][0], m.group(1)) for m in _LINK.finditer(text)]


def _is_external(target: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) is not None  # https:, mailto:, ...


def test_docs_exist():
    names = {_rel(p) for p in DOCS}
    assert "README.md" in names and len(names) > 1, names


def broken_links(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    broken = []
    for number, target in links(path):
        if _is_external(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root).as_posix()}:{number}: {target}"
        if root not in dest.parents:
            broken.append(f"{where}: outside the repository")
        elif not dest.exists():
            broken.append(f"{where}: no such file")
        elif anchor:
            if dest.suffix != ".md":
                broken.append(f"{where}: an anchor into a file that is not markdown")
            elif anchor not in anchors(dest):
                broken.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(root).as_posix()}")
    return broken


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_relative_links_resolve(path):
    broken = broken_links(path)
    assert not broken, "\n".join(broken)


def test_broken_links_are_found(tmp_path):
    tmp_path = tmp_path.resolve()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Two words\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "# Top\n\n[ok](docs/a.md#two-words), [self](#top), ![img](https://example.org/x.png),\n"
        "[missing](docs/b.md), [no anchor](docs/a.md#three), `[in code](nowhere.md)`, [a link\n"
        "over two lines](docs/c.md)\n\n```bash\n[in a block](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    assert broken_links(page, tmp_path) == [
        "README.md:4: docs/b.md: no such file",
        "README.md:4: docs/a.md#three: no heading with anchor #three in docs/a.md",
        "README.md:4: docs/c.md: no such file",
    ]


def test_slug_rule():
    assert github_slug("Beyond GradVac: any Gramian weighting") == "beyond-gradvac-any-gramian-weighting"
    assert github_slug("Core (`python -m benchmarks core --threads 2`)") == "core-python--m-benchmarks-core---threads-2"
    assert github_slug("FSDP2") == "fsdp2"
    assert github_slug("The speed goal's cases") == "the-speed-goals-cases"


def _python_blocks() -> list[Block]:
    return [b for p in DOCS for b in _split(p)[1] if b.lang in ("python", "py")]


def _block_id(block: Block) -> str:
    return f"{_rel(block.path)}:{block.line}"


@pytest.mark.parametrize("block", _python_blocks(), ids=_block_id)
def test_python_block_compiles(block):
    compile(block.source, _block_id(block), "exec")


def test_some_blocks_are_runnable():
    runnable = [_block_id(b) for b in _python_blocks() if b.runnable]
    assert any(name.startswith("docs/usage.md") for name in runnable), runnable


@pytest.mark.parametrize("block", [b for b in _python_blocks() if b.runnable], ids=_block_id)
def test_runnable_block_runs(block, tmp_path, monkeypatch):
    """Executed in a fresh namespace of this interpreter (torch is imported already, so the block's
    own time is what is measured), in an empty folder, leaving torch's global generator as it was."""
    monkeypatch.chdir(tmp_path)
    code = compile(block.source, _block_id(block), "exec")
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        exec(code, {"__name__": "__docs__"})
    elapsed = time.perf_counter() - start
    assert elapsed < RUN_LIMIT_S, f"{_block_id(block)} took {elapsed:.1f} s; documented examples stay quick"


# Words of a work log. "session" is also a POSIX term ("process session", start_new_session), which
# stays allowed.
WORK_LOG = [
    re.compile(r"\bissue \d+\b", re.IGNORECASE),
    re.compile(r"(?<!process )\bsession\b", re.IGNORECASE),
    re.compile(r"previous run", re.IGNORECASE),
    re.compile(r"earlier commit", re.IGNORECASE),
]


def _tracked_text_files() -> list[pathlib.Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
        ).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout")
    this = pathlib.Path(__file__).resolve()
    files = []
    for name in filter(None, out.split("\0")):
        path = ROOT / name
        if path.resolve() == this or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary (plots)
        files.append(path)
    return files


def test_no_work_log_words():
    hits = []
    for path in _tracked_text_files():
        text = path.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if any(pattern.search(line) for pattern in WORK_LOG):
                hits.append(f"{_rel(path)}:{number}: {line.strip()}")
    assert not hits, "work-log words (describe the software and dated measurements instead):\n" + "\n".join(hits)


def test_work_log_patterns():
    assert WORK_LOG[0].search("the goal of Issue 12")
    assert WORK_LOG[1].search("measured in this session")
    assert not WORK_LOG[1].search("each run sits in its own process session")
    assert not WORK_LOG[1].search("subprocess.Popen(args, start_new_session=True)")
    assert not any(p.search("measured 2026-12-02 on a 2-core CPU machine") for p in WORK_LOG)


def test_runnable_marker_is_read(tmp_path):
    md = textwrap.dedent(
        """\
        # T

        <!-- runnable -->

        ```python
        x = 1
        ```

        ```python
        y = 2
        ```
        """
    )
    path = tmp_path / "probe.md"
    path.write_text(md, encoding="utf-8")
    blocks = _split(path)[1]
    assert [(b.source, b.runnable) for b in blocks] == [("x = 1\n", True), ("y = 2\n", False)]
