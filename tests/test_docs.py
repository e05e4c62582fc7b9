"""The documentation holds together: every relative link and anchor resolves inside the
repository, every setting the code reads is in docs/settings.md (the one list of them) and
nothing else is listed there, every alert has its runbook, every ``scangate`` command shown
is one the CLI accepts, and the README stays a front page."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import shlex
import tokenize
import unicodedata
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final
from urllib.parse import unquote

import pytest
import yaml

from gateway import Settings
from gateway.run.cli import build_parser

ROOT: Final = Path(__file__).resolve().parent.parent
DOCS: Final = ROOT / "docs"
README: Final = ROOT / "README.md"
SETTINGS_PAGE: Final = DOCS / "settings.md"
OPERATIONS_PAGE: Final = DOCS / "operations.md"
ALERTS: Final = ROOT / "deploy" / "prometheus" / "alerts.yml"
README_MAX_BYTES: Final = 12_500
# The packages whose code reads the environment (the gateway, and what it imports).
CODE_PACKAGES: Final = ("gateway", "signing", "storage")

_FENCE: Final = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HEADING: Final = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_CODE_SPAN: Final = re.compile(r"(`+)(.+?)\1", re.S)
# [text](target "title"), the text possibly holding [brackets]; the target is group 1.
_INLINE_LINK: Final = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]" r"\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)"
)
_REFERENCE: Final = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
_SCHEME: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_VARIABLE: Final = re.compile(r"\bSCANGATE_[A-Z0-9]+(?:_[A-Z0-9]+)*\b")
_QUOTED_VARIABLE: Final = re.compile(r"[\"'`](SCANGATE_[A-Z0-9]+(?:_[A-Z0-9]+)*)[\"'`=]")
_ENV_READ: Final = re.compile(
    r"(?:environ\s*(?:\.get\(|\[)|getenv\()\s*[\"'](SCANGATE_[A-Z0-9_]+)[\"']"
)


def doc_pages() -> list[Path]:
    """Every page whose links must resolve."""
    return [README, *sorted(DOCS.glob("*.md")), ROOT / "RELIABILITY.md", ROOT / "CHANGELOG.md"]


def prose_lines(text: str) -> Iterator[str]:
    """The lines of a Markdown text outside fenced code blocks."""
    fence = ""
    for line in text.splitlines():
        m = _FENCE.match(line)
        if fence:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                fence = ""
        elif m:
            fence = m.group(1)
        else:
            yield line


def code_blocks(text: str, language: str) -> list[str]:
    """The fenced blocks of a Markdown text marked ``language``."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def heading_text(markdown: str) -> str:
    """A heading as GitHub renders it to text: code spans keep their content, links their
    text, and emphasis and HTML tags go."""
    text = _CODE_SPAN.sub(lambda m: m.group(2), markdown)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    return text.replace("*", "").strip()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case; letters (any script, accents kept),
    marks, digits, ``_`` and ``-`` stay, every space becomes ``-``, the rest goes."""
    kept = (
        c
        for c in heading_text(heading).lower()
        if c in " -" or unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "Pc"
    )
    return "".join(kept).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page, a repeated one numbered as GitHub numbers it."""
    seen: Counter[str] = Counter()
    found: set[str] = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        m = _HEADING.match(line)
        if m is None:
            continue
        base = slug(m.group(2))
        found.add(f"{base}-{seen[base]}" if seen[base] else base)
        seen[base] += 1
    return found


def links(page: Path) -> list[str]:
    """The link targets of a page: inline links, images and reference definitions, outside
    code blocks and code spans."""
    prose = "\n".join(prose_lines(page.read_text(encoding="utf-8")))
    prose = _CODE_SPAN.sub("", prose)
    return _INLINE_LINK.findall(prose) + _REFERENCE.findall(prose)


def broken(page: Path, target: str) -> str | None:
    """Why a link of ``page`` does not resolve, or None when it does."""
    if _SCHEME.match(target) or target.startswith("//"):
        return None  # another site: not this repository's to check
    path, _, anchor = target.partition("#")
    if path.startswith("/"):
        return "an absolute path: link relative to the page"
    resolved = (page.parent / unquote(path)).resolve() if path else page
    if not resolved.is_relative_to(ROOT):
        return "points outside the repository"
    if not resolved.exists():
        return "no such file"
    if anchor:
        if resolved.suffix != ".md":
            return "an anchor into a file that is not Markdown"
        if unquote(anchor) not in anchors(resolved):
            return f"no heading with the anchor #{anchor} in {resolved.relative_to(ROOT)}"
    return None


# -- links --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("What a 2xx promises (durability)", "what-a-2xx-promises-durability"),
        (
            "Two commands for a fresh machine (Python 3.11+ and nothing else)",
            "two-commands-for-a-fresh-machine-python-311-and-nothing-else",
        ),
        ("A relative's own phone", "a-relatives-own-phone"),
        ("`POST /v1/scans`", "post-v1scans"),
        ("The old header, X-Scangate-Signature", "the-old-header-x-scangate-signature"),
        ("Khai báo y tế: Tiếng Việt", "khai-báo-y-tế-tiếng-việt"),
        ("snake_case and [a link](api.md)", "snake_case-and-a-link"),
        ("snake_case and dashes-too", "snake_case-and-dashes-too"),
        ("ScangateBacklogGrowing", "scangatebackloggrowing"),  # an alert's runbook
        ("Prometheus, Grafana and alerts", "prometheus-grafana-and-alerts"),
    ],
)
def test_anchors_are_made_as_github_makes_them(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_repeated_headings_are_numbered(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# A\n\n## Notes\n\n```sh\n# not a heading\n```\n\n## Notes\n", "utf-8")
    assert anchors(page) == {"a", "notes", "notes-1"}


def test_every_relative_link_resolves_inside_the_repository() -> None:
    problems = [
        f"{page.relative_to(ROOT)}: ({target}): {why}"
        for page in doc_pages()
        for target in links(page)
        if (why := broken(page, target)) is not None
    ]
    assert problems == []
    # The pages are linked at all (a parser that found nothing would pass the above).
    assert sum(len(links(page)) for page in doc_pages()) > 100


def test_the_docs_are_listed_where_readers_start() -> None:
    """Every page under docs/ is linked from the README or from docs/index.md."""
    listed = {
        (page.parent / target.partition("#")[0]).resolve()
        for page in (README, DOCS / "index.md")
        for target in links(page)
        if not _SCHEME.match(target) and target.partition("#")[0]
    }
    assert sorted(p.name for p in DOCS.glob("*.md") if p.resolve() not in listed) == []


# -- settings -----------------------------------------------------------------------------------


class _Recorder(Mapping[str, str]):
    """An empty environment that notes every variable looked up in it."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.asked.add(key)
        return False

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def settings_read() -> set[str]:
    """The variables ``Settings.from_env`` looks up, as documented: a duration's without
    the ``_S`` that is also accepted (``SCANGATE_RETRY_MEMORY``, not ``..._MEMORY_S``)."""
    env = _Recorder()
    Settings.from_env(env)
    asked = {name for name in env.asked if name.startswith("SCANGATE_")}
    also_accepted = {
        name
        for name in asked
        if (name.endswith("_S") and name.removesuffix("_S") in asked)
        or (name.endswith("_S_FILE") and name.removesuffix("_S_FILE") + "_FILE" in asked)
    }
    return asked - also_accepted


def file_forms(names: set[str]) -> set[str]:
    """``SCANGATE_<NAME>_FILE`` variables among ``names`` whose ``SCANGATE_<NAME>`` is
    there too: a setting read from the file a variable names."""
    return {n for n in names if n.endswith("_FILE") and n.removesuffix("_FILE") in names}


def undocumented_file_forms(read: set[str], page: str) -> list[str]:
    """The file forms the code reads that ``page`` does not document: one by one, or all at
    once as ``SCANGATE_<NAME>_FILE`` when the code reads one for every setting."""
    files = file_forms(read)
    every = {f.removesuffix("_FILE") for f in files} >= read - files
    generic = every and "`SCANGATE_<NAME>_FILE`" in page
    return sorted(f for f in files if not generic and f"`{f}`" not in page)


def code_files() -> list[Path]:
    return [path for package in CODE_PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]


def environment_reads() -> set[str]:
    """``SCANGATE_*`` variables the code reads from the environment itself, not through
    ``Settings`` (none so far: the environment is read at the entry point)."""
    return {name for path in code_files() for name in _ENV_READ.findall(path.read_text("utf-8"))}


def variables_named_by_the_code() -> set[str]:
    """Every ``SCANGATE_*`` name in the code's strings (messages, help, docstrings): what a
    user may be told to set. Python names that happen to start so are not variables."""
    names: set[str] = set()
    for path in code_files():
        with path.open("rb") as source:
            for token in tokenize.tokenize(source.readline):
                if token.type == tokenize.STRING:
                    names |= set(_VARIABLE.findall(token.string))
    return names


def table_variables(page: Path) -> set[str]:
    """The ``SCANGATE_*`` variables a page's tables list: rows whose first cell is one or
    more variables (`` `SCANGATE_A`, `SCANGATE_B` ``)."""
    names: set[str] = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        if line.startswith("|"):
            first = line.split("|")[1].strip()
            if first.startswith("`SCANGATE_"):
                names |= set(re.findall(r"`(SCANGATE_[A-Z0-9_]+)`", first))
    return names


def test_the_settings_are_read_the_way_this_test_reads_them() -> None:
    """Each field of Settings is a variable, so a field the recorder missed would be a
    setting nobody documents."""
    read = settings_read()
    plain = read - file_forms(read)
    for f in dataclasses.fields(Settings):
        assert "SCANGATE_" + f.name.upper().removesuffix("_S") in plain, f.name
    assert {"SCANGATE_DATA_DIR", "SCANGATE_RETRY_MEMORY", "SCANGATE_WEB_APP"} <= read
    assert "SCANGATE_RETRY_MEMORY_S" not in read


def test_every_setting_the_code_reads_is_documented_in_settings_md() -> None:
    documented = table_variables(SETTINGS_PAGE)
    read = settings_read()
    code = read | environment_reads() | variables_named_by_the_code()
    missing = sorted(code - file_forms(code) - documented)
    assert missing == [], f"add these to the table in docs/settings.md: {missing}"
    page = SETTINGS_PAGE.read_text(encoding="utf-8")
    files = undocumented_file_forms(read, page)
    assert files == [], f"say in docs/settings.md that these are read: {files}"


def test_settings_md_documents_nothing_the_code_does_not_read() -> None:
    documented = table_variables(SETTINGS_PAGE)
    read = settings_read()
    code = read | environment_reads() | variables_named_by_the_code()
    unknown = sorted(documented - code)
    assert unknown == [], f"docs/settings.md lists variables scangate does not read: {unknown}"


def test_settings_md_is_the_one_list_of_settings() -> None:
    """Other pages name settings in their text and link to docs/settings.md; none has a
    table of them."""
    settings = settings_read() - file_forms(settings_read()) | environment_reads()
    elsewhere = {
        str(page.relative_to(ROOT)): sorted(table_variables(page) & settings)
        for page in doc_pages()
        if page != SETTINGS_PAGE
    }
    assert {page: names for page, names in elsewhere.items() if names} == {}


def test_the_tests_and_benchmarks_variables_are_documented_for_developers() -> None:
    """Variables only the tests and benchmarks read (``SCANGATE_TEST_POSTGRES_URL``, the
    fault suite's scale, the load test's size) are not settings: they are documented on the
    developers' pages, never in the settings table."""
    this_file = Path(__file__).resolve()
    quoted = {
        name
        for folder in ("tests", "benchmarks")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.resolve() != this_file
        for name in _QUOTED_VARIABLE.findall(path.read_text("utf-8"))
    }
    settings = settings_read() | environment_reads() | variables_named_by_the_code()
    developers_only = quoted - settings
    assert "SCANGATE_TEST_POSTGRES_URL" in developers_only
    assert developers_only.isdisjoint(table_variables(SETTINGS_PAGE))
    written = "\n".join(page.read_text("utf-8") for page in doc_pages() if page != SETTINGS_PAGE)
    assert sorted(n for n in developers_only if f"`{n}`" not in written) == []


# -- alerts and their runbooks ------------------------------------------------------------------


def alert_names() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [r["alert"] for group in rules["groups"] for r in group["rules"] if "alert" in r]


def runbooks() -> dict[str, str]:
    """The subsections of operations.md's last section, ``## Runbooks``: anchor -> text."""
    text = "\n".join(prose_lines(OPERATIONS_PAGE.read_text(encoding="utf-8")))
    sections = re.split(r"^## ", text, flags=re.M)
    assert sections[-1].startswith("Runbooks\n"), "operations.md must end with ## Runbooks"
    parts = re.split(r"^### (.+)$", sections[-1], flags=re.M)
    return {slug(title): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def test_every_alert_has_a_runbook_named_after_it() -> None:
    names = alert_names()
    assert len(names) >= 10
    books = runbooks()
    assert sorted(books) == sorted(name.lower() for name in names)
    for name in names:
        body = books[name.lower()]
        for part in ("**What it means.**", "**Check first.**", "**What to do.**"):
            assert part in body, f"the runbook of {name} has no {part}"


# -- commands -----------------------------------------------------------------------------------


def shell_commands(script: str) -> Iterator[list[str]]:
    """The words of each command line of a shell script, a quoted string running over
    several lines and a line ending in a backslash taken whole; operators are words too."""
    pending = ""
    for line in script.replace("\\\n", " ").splitlines():
        pending += line
        lexer = shlex.shlex(pending, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            words = list(lexer)
        except ValueError:  # a quotation still open: it goes on on the next line
            pending += "\n"
            continue
        pending = ""
        yield words
    assert not pending, f"unclosed quotation in {script!r}"


def shown_commands() -> list[tuple[str, list[str]]]:
    """Every ``scangate`` command in the shell blocks of the README and docs/, with shell
    variables standing in for their values: (page, arguments)."""
    found: list[tuple[str, list[str]]] = []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for block in code_blocks(page.read_text(encoding="utf-8"), "sh"):
            for words in shell_commands(block):
                for i, word in enumerate(words):
                    if word in ("scangate", ".venv/bin/scangate"):
                        args = []
                        for arg in words[i + 1 :]:
                            if arg and set(arg) <= set("|&;()<>"):
                                break
                            args.append("X1" if arg.startswith("$") else arg)
                        found.append((page.name, args))
    return found


def test_every_scangate_command_shown_is_one_the_cli_accepts() -> None:
    commands = shown_commands()
    assert len(commands) >= 15
    parser = build_parser()
    refused = []
    for page, args in commands:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                parser.parse_args(args)
            except SystemExit:
                refused.append(f"{page}: scangate {' '.join(args)}: {stderr.getvalue().strip()}")
    assert refused == []


# -- the front page -----------------------------------------------------------------------------


def test_the_readme_is_a_front_page() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes: move detail into docs/"


def test_the_readme_shows_the_test_command_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    m = re.search(r'^TEST_COMMAND="(.+)"$', ci, re.M)
    assert m is not None
    assert m.group(1) in README.read_text(encoding="utf-8")
