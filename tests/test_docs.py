"""The documentation holds together: README.md and docs/*.md link only to files and headings that exist, every
`docs/<page>.md` the code cites exists, nothing in the project points outside the repository, and README.md stays a
front page of at most 300 lines.

Anchors follow GitHub's rule for heading ids: the heading's text, lowercased, with every character removed that is
not a letter, a digit, a mark, `-`, `_` or a space, then each space turned into `-`; a repeated heading gets `-1`,
`-2`, ... Code paths the docs name (`pipeline/...`, `families/...`, `stages/...`, `tests/...`) must exist too. The
first tests check the checker itself on a small tree with broken links, so a checker that found nothing
would fail.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_LINES = 300

# Where the code may cite a docs page (check b), and what may not point outside the repository (check c).
CITING = ["pipeline", "families", "stages", "benchmarks", "presets", "tests", "Makefile", "dvc.yaml", "params.yaml"]
PROJECT = ["README.md", "docs", *CITING, ".ci"]
# Spelled in pieces so that this file does not mention them itself.
OUTSIDE = ["../" + "shared", "DESIGN" + ".md", "REFERENCES" + ".md"]

BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".pdf", ".npy", ".npz", ".pt", ".pth", ".pyc", ".db", ".gz",
                   ".zip", ".pkl"}
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*$")
SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s)]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
DOCS_CITATION = re.compile(r"(?<![\w/.-])docs/[A-Za-z0-9_./-]+?\.md\b")
# A file or folder of the code named in the docs, e.g. `pipeline/samplers/walk.py` (patterns with <, {, * are skipped).
CODE_PATH = re.compile(r"(?<![\w/.-])((?:pipeline|families|stages|benchmarks|presets|tests)/[A-Za-z0-9_./-]*)([<{*]?)")


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            continue
        if fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line.strip()[len(m.group(1)):]:
                fence = None
            continue
        out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's id of a heading: markup to text, lowercase, punctuation and symbols dropped, spaces to '-'."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text)                                              # inline HTML tags
    kept = [c for c in text.lower() if c in "-_ " or unicodedata.category(c)[0] in "LMN"]
    return "".join(kept).replace(" ", "-")


def headings(text: str) -> list[str]:
    """The text of every heading (ATX and setext) outside code blocks, in order."""
    found, previous = [], ""
    for _, line in _prose_lines(text):
        atx = ATX.match(line)
        if atx:
            found.append(re.sub(r"[ \t]+#+$", "", atx.group(2) or "").strip())
            previous = ""
            continue
        setext = SETEXT.match(line)
        if setext and previous.strip() and not previous.lstrip().startswith(("|", ">", "-", "*", "+")):
            found.append(previous.strip())
            previous = ""
            continue
        previous = line
    return found


def anchors(path: Path) -> set[str]:
    """Every id GitHub gives the headings of a markdown file (repeated headings get -1, -2, ...)."""
    seen: dict[str, int] = {}
    ids = set()
    for heading in headings(path.read_text(encoding="utf-8")):
        base = slug(heading)
        count = seen.get(base, 0)
        ids.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return ids


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition outside code."""
    out = []
    for number, line in _prose_lines(text):
        prose = CODE_SPAN.sub("", line)
        targets = [m.group(1) for m in INLINE_LINK.finditer(prose)]
        ref = REFERENCE_DEF.match(prose)
        if ref:
            targets.append(ref.group(1))
        out += [(number, t[1:-1] if t.startswith("<") and t.endswith(">") else t) for t in targets]
    return out


def broken_links(md: Path, repo: Path) -> list[str]:
    """What is wrong with the relative links of one markdown file: a missing file, a target outside the
    repository, or an #anchor that is no heading of the markdown file it points to."""
    problems = []
    for number, target in links(md.read_text(encoding="utf-8")):
        if SCHEME.match(target):  # http:, https:, mailto: ...
            continue
        where = f"{md.relative_to(repo)}:{number}: ({target})"
        path_part, _, anchor = target.partition("#")
        path_part = unquote(path_part)
        if path_part:
            base = repo if path_part.startswith("/") else md.parent
            dest = (base / path_part.lstrip("/")).resolve()
        else:
            dest = md.resolve()
        if not dest.is_relative_to(repo.resolve()):
            problems.append(f"{where} points outside the repository")
            continue
        if not dest.exists():
            problems.append(f"{where} names a file that does not exist")
            continue
        if anchor and dest.suffix == ".md" and dest.is_file() and unquote(anchor) not in anchors(dest):
            problems.append(f"{where} names no heading of {dest.relative_to(repo.resolve())}")
    return problems


def missing_code_paths(md: Path, repo: Path) -> list[str]:
    """The code paths (pipeline/..., stages/..., tests/...) a markdown file names that do not exist."""
    problems = []
    for number, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
        for m in CODE_PATH.finditer(line):
            path = m.group(1).rstrip(".")
            if m.group(2):  # a pattern such as families/<name>/ or benchmarks/nfe_<data>.json
                continue
            if not (repo / path).exists():
                problems.append(f"{md.relative_to(repo)}:{number}: {path} does not exist")
    return problems


def _doc_files(repo: Path) -> list[Path]:
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


def _text_files(repo: Path, names: list[str]):
    """(path, text) of every UTF-8 file under the named files and folders (no caches, no binaries)."""
    for name in names:
        root = repo / name
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        for path in paths:
            if "__pycache__" in path.parts or path.suffix.lower() in BINARY_SUFFIXES:
                continue
            try:
                yield path, path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue


# --------------------------------------------------------------------------- the checker itself


def test_slug_follows_github():
    assert slug("Metrics, defined once") == "metrics-defined-once"
    assert slug("DDPM / DDIM / CFG") == "ddpm--ddim--cfg"
    assert slug("Schrödinger bridges (`method.name: schrodinger_bridge`)") == \
        "schrödinger-bridges-methodname-schrodinger_bridge"
    assert slug("Images, devices, several GPUs") == "images-devices-several-gpus"
    assert slug("[The stages](stages.md) and `dvc.yaml`") == "the-stages-and-dvcyaml"
    assert slug("Training × 2 — fast") == "training--2--fast"


def test_checker_finds_broken_links(tmp_path):
    (tmp_path / "pages").mkdir()
    (tmp_path / "pages" / "a.md").write_text("# Page A\n\n## Metrics, defined once\n\n## Twice\n\n## Twice\n\nSetext\n---\n")
    (tmp_path / "README.md").write_text(
        "# Title\n\n"
        "[good](pages/a.md) [good anchor](pages/a.md#metrics-defined-once) [second twice](pages/a.md#twice-1)\n"
        "[setext](pages/a.md#setext) [self](#title) ![figure](pages/a.md) [web](https://example.org/x.md)\n"
        "`[in code](pages/missing.md)`\n"
        "```\n[in a fence](pages/missing.md)\n```\n"
        "[missing file](pages/missing.md)\n"
        "[missing anchor](pages/a.md#metrics)\n"
        "[missing self anchor](#nowhere)\n"
        f"[outside]({OUTSIDE[0]}/x.md)\n"
        "[ref]: pages/also-missing.md\n"
        "The walker is `pipeline/samplers/walk.py`; `pipeline/gone.py` moved; `families/<name>/` is a pattern.\n")
    (tmp_path / "pipeline" / "samplers").mkdir(parents=True)
    (tmp_path / "pipeline" / "samplers" / "walk.py").write_text("")
    assert missing_code_paths(tmp_path / "README.md", tmp_path) == ["README.md:14: pipeline/gone.py does not exist"]
    problems = broken_links(tmp_path / "README.md", tmp_path)
    assert len(problems) == 5, problems
    for words in ["(pages/missing.md) names a file", "(pages/a.md#metrics) names no heading", "(#nowhere) names no",
                  f"({OUTSIDE[0]}/x.md) points outside", "(pages/also-missing.md) names a file"]:
        assert any(words in p for p in problems), (words, problems)


def test_checker_finds_outside_mentions(tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "m.py").write_text('"""See ' + OUTSIDE[1] + ', "Tracking"."""\n')
    (tmp_path / "pipeline" / "ok.py").write_text('"""See docs/design.md, "Tracking"."""\n')
    hits = [p.name for p, text in _text_files(tmp_path, ["pipeline"]) if any(w in text for w in OUTSIDE)]
    assert hits == ["m.py"]


# --------------------------------------------------------------------------- the project's documentation


def test_docs_exist():
    assert README.is_file()
    assert (DOCS / "index.md").is_file()


@pytest.mark.parametrize("md", _doc_files(REPO), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(md):
    """(a) Every relative link of README.md and docs/*.md names an existing file, and its #anchor a heading there."""
    assert broken_links(md, REPO) == []


def test_cited_docs_pages_exist():
    """(b) Every docs/<page>.md that the code, the tests, the Makefile, dvc.yaml or params.yaml cite exists."""
    missing = [f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
               for path, text in _text_files(REPO, CITING) for m in DOCS_CITATION.finditer(text)
               if not (REPO / m.group(0)).is_file()]
    assert missing == []


@pytest.mark.parametrize("name", PROJECT)
def test_nothing_points_outside_the_repository(name):
    """(c) No file of the project mentions the shared folder beside the repository, or the design and reference files
    that lived there (OUTSIDE): a clone has neither; the design is docs/design.md, the references docs/references.md."""
    hits = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
            for path, text in _text_files(REPO, [name])
            for number, line in enumerate(text.splitlines(), 1) if any(word in line for word in OUTSIDE)]
    assert hits == []


@pytest.mark.parametrize("md", _doc_files(REPO), ids=lambda p: str(p.relative_to(REPO)))
def test_code_paths_in_docs_exist(md):
    """The files and folders of the code that the docs name (`pipeline/...`, `families/...`, `stages/...`, `tests/...`,
    `benchmarks/...`, `presets/...`) exist: a moved module shows up here, not in a reader's shell."""
    assert missing_code_paths(md, REPO) == []


def test_readme_is_short():
    """(d) README.md is a front page; the details live in docs/."""
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
