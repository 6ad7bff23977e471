"""The documentation: every Python block in README.md and docs/ runs, and the site builds.

Each page's ```python blocks are joined, in order, into one script that runs in a subprocess
with a fresh working directory and ``PYTHONPATH`` set to the repository root. The script keeps
the page's line numbers, so a traceback points at the right line of the Markdown file. A block
directly preceded by ``<!-- skip-doctest -->`` is not run (for fragments that cannot run).
Pages whose code needs PostgreSQL, RabbitMQ or Redis ask ``tests/services.py`` first.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.services import require_postgres, require_rabbitmq, require_redis

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = REPO_ROOT / "docs"
SKIP_MARKER = "<!-- skip-doctest -->"
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")
PAGE_TIMEOUT_S = 120

#: Services a page needs, by page; pages not listed are checked by what their code imports.
PAGE_SERVICES: dict[str, tuple[Callable[[], None], ...]] = {
    "docs/adapters/postgres.md": (require_postgres,),
    "docs/adapters/rabbitmq.md": (require_rabbitmq,),
    "docs/adapters/redis.md": (require_redis,),
}
#: A page whose code imports one of these modules needs the matching service.
MODULE_SERVICES: dict[str, Callable[[], None]] = {
    "castore_pydantic.storage.postgres": require_postgres,
    "castore_pydantic.messaging.rabbitmq": require_rabbitmq,
    "castore_pydantic.messaging.redis": require_redis,
}


@dataclass(frozen=True)
class CodeBlock:
    """One fenced block of a Markdown page."""

    language: str
    first_line: int  # 1-based line number of the block's first code line
    code: str
    skipped: bool


def code_blocks(text: str) -> list[CodeBlock]:
    """Every fenced block of a page, with its language, position and skip marker."""
    lines = text.splitlines()
    blocks: list[CodeBlock] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        language = opening["info"].strip().split(" ")[0].lower()
        previous = next((line.strip() for line in reversed(lines[:index]) if line.strip()), "")
        body: list[str] = []
        index += 1
        while index < len(lines):
            closing = FENCE.match(lines[index])
            if closing and closing["fence"].startswith(fence) and not closing["info"].strip():
                break
            line = lines[index]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            index += 1
        start = index - len(body) + 1
        blocks.append(CodeBlock(language, start, "\n".join(body), previous == SKIP_MARKER))
        index += 1
    return blocks


def python_blocks(text: str) -> list[CodeBlock]:
    """The blocks of a page that the doc tests run."""
    return [b for b in code_blocks(text) if b.language in ("python", "py") and not b.skipped]


def page_script(text: str) -> str:
    """The page's runnable blocks as one script whose line numbers match the page's."""
    out: list[str] = []
    for block in python_blocks(text):
        out.extend([""] * (block.first_line - 1 - len(out)))
        out.extend(block.code.splitlines())
    return "\n".join(out) + "\n"


def documentation_pages() -> list[str]:
    """README.md and every Markdown page under docs/, as repository-relative paths."""
    pages = [REPO_ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    return [page.relative_to(REPO_ROOT).as_posix() for page in pages if page.exists()]


def runnable_pages() -> list[str]:
    """The pages that have at least one Python block to run."""
    return [p for p in documentation_pages() if python_blocks((REPO_ROOT / p).read_text())]


def required_services(page: str, script: str) -> list[Callable[[], None]]:
    """The service checks a page needs: listed by page or implied by its imports."""
    needed = list(PAGE_SERVICES.get(page, ()))
    imported: set[str] = set()
    for node in ast.walk(ast.parse(script)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    for module, check in MODULE_SERVICES.items():
        if module in imported and check not in needed:
            needed.append(check)
    return needed


@pytest.mark.parametrize("page", runnable_pages())
def test_page_code_runs(page: str, tmp_path: Path) -> None:
    """The page's Python blocks run, in order, as one script that exits 0."""
    script = page_script((REPO_ROOT / page).read_text())
    for check in required_services(page, script):
        check()
    path = tmp_path / (page.replace("/", "__").removesuffix(".md") + ".py")
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    completed = subprocess.run(
        [sys.executable, str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=PAGE_TIMEOUT_S,
        check=False,
    )
    assert completed.returncode == 0, (
        f"{page} failed (line numbers are the page's):\n{completed.stderr}"
    )


@pytest.mark.parametrize("page", documentation_pages())
def test_skip_markers_precede_python_blocks(page: str) -> None:
    """Every skip marker sits directly above a Python block (a stray one hides nothing)."""
    text = (REPO_ROOT / page).read_text()
    markers = text.count(SKIP_MARKER)
    skipped = [b for b in code_blocks(text) if b.skipped and b.language in ("python", "py")]
    assert markers == len(skipped), f"{page}: {markers} markers, {len(skipped)} skipped blocks"


class TestRunner:
    """The doc-test runner finds the right blocks and keeps the page's line numbers."""

    PAGE = (
        "# Title\n"  # 1
        "\n"  # 2
        "```python\n"  # 3
        "x = 1\n"  # 4
        "```\n"  # 5
        "\n"  # 6
        "<!-- skip-doctest -->\n"  # 7
        "```python\n"  # 8
        "this is not python\n"  # 9
        "```\n"  # 10
        "```sh\n"  # 11
        "echo shell\n"  # 12
        "```\n"  # 13
        "- item\n"  # 14
        "\n"  # 15
        "    ```python\n"  # 16
        "    y = x + 1\n"  # 17
        "    ```\n"  # 18
    )

    def test_blocks_languages_and_skips(self) -> None:
        """Blocks are found with language and skip flag; indented blocks are dedented."""
        blocks = code_blocks(self.PAGE)
        assert [(b.language, b.first_line, b.skipped) for b in blocks] == [
            ("python", 4, False),
            ("python", 9, True),
            ("sh", 12, False),
            ("python", 17, False),
        ]
        assert blocks[3].code == "y = x + 1"

    def test_script_keeps_line_numbers(self) -> None:
        """Line N of the script is line N of the page."""
        lines = page_script(self.PAGE).splitlines()
        assert lines[3] == "x = 1"
        assert lines[16] == "y = x + 1"
        assert "this is not python" not in page_script(self.PAGE)

    def test_services_from_imports(self) -> None:
        """A page importing the PostgreSQL adapter needs PostgreSQL."""
        script = "from castore_pydantic.storage.postgres import PostgresEventStorageAdapter\n"
        assert required_services("docs/x.md", script) == [require_postgres]
        assert required_services("docs/x.md", "import castore_pydantic\n") == []


def test_every_error_has_a_section() -> None:
    """docs/errors.md has one heading (and so one anchor) per public error class."""
    from castore_pydantic import errors

    text = (DOCS / "errors.md").read_text()
    headings = set(re.findall(r"^#{2,3} `?(\w+)`?\s*$", text, flags=re.MULTILINE))
    classes = {
        name
        for name in errors.__all__
        if isinstance(getattr(errors, name), type)
        and issubclass(getattr(errors, name), errors.CastoreError)
    }
    assert classes - headings == set()


def tree_lines(text: str) -> list[str]:
    """The lines of an error tree drawing (``CastoreError``, ``├── ...``), stripped."""
    starts = ("CastoreError", "│", "├", "└")
    return [line.strip() for line in text.splitlines() if line.strip().startswith(starts)]


def test_error_tree_matches_the_module() -> None:
    """The tree drawn in docs/errors.md is the one in ``castore_pydantic.errors``' docstring."""
    from castore_pydantic import errors

    assert errors.__doc__ is not None
    tree, drawn = tree_lines(errors.__doc__), tree_lines((DOCS / "errors.md").read_text())
    assert len(tree) > 10
    assert drawn == tree, "copy the tree from castore_pydantic/errors.py into docs/errors.md"


def test_decisions_name_existing_tests() -> None:
    """Every test that docs/decisions.md cites exists (``tests/path.py::Class::test``)."""
    text = (DOCS / "decisions.md").read_text()
    cited = re.findall(r"`((?:tests|castore_pydantic)/[\w/]+\.py)::([\w:]+)`", text)
    assert cited, "docs/decisions.md cites no tests"
    missing = []
    for path, qualname in cited:
        file = REPO_ROOT / path
        names = qualname.split("::")
        if not file.exists():
            missing.append(f"{path} (no such file)")
            continue
        tree = ast.parse(file.read_text())
        scope: list[ast.stmt] = tree.body
        for name in names:
            found = next(
                (
                    node
                    for node in scope
                    if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                    and node.name == name
                ),
                None,
            )
            if found is None:
                missing.append(f"{path}::{qualname}")
                break
            scope = found.body if isinstance(found, ast.ClassDef) else []
    assert missing == []


def test_every_decision_cites_a_test() -> None:
    """Each numbered decision in docs/decisions.md names at least one test that pins it."""
    text = (DOCS / "decisions.md").read_text()
    sections = re.split(r"^## (?=\d+\. )", text, flags=re.MULTILINE)[1:]
    # DESIGN section 6 has ten; the later ones are decisions taken while building.
    assert len(sections) >= 10
    uncited = [s.splitlines()[0] for s in sections if not re.search(r"`[\w/]+\.py::\w+", s)]
    assert uncited == []


@pytest.mark.slow
def test_site_builds_strictly(tmp_path: Path) -> None:
    """``mkdocs build --strict`` succeeds: no broken link, anchor, nav entry or docstring."""
    if (
        importlib.util.find_spec("mkdocs") is None
        or importlib.util.find_spec("mkdocstrings") is None
    ):
        pytest.skip("mkdocs/mkdocstrings are not installed (pip install -e '.[docs]')")
    completed = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "site" / "index.html").exists()
