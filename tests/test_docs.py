"""The README's commands are what CI runs: `.ci/run` holds the quickstart's set-up and sweep lines and the test
command, in the README's order and word for word, so a README that drifts from what is tested fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def first_bash_block(readme: str, heading: str) -> list[str]:
    """The lines of the first ```bash block under ``## heading``."""
    section = readme.split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert block, f"no bash block under '## {heading}'"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readmes_setup_quickstart_and_test_commands():
    readme = (ROOT / "README.md").read_text()
    [quickstart] = [line.removeprefix("## ") for line in readme.splitlines() if line.startswith("## Quickstart")]
    expected = first_bash_block(readme, quickstart) + first_bash_block(readme, "Tests")
    commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line in expected]
    assert commands == expected


def test_the_cpu_setup_takes_torch_from_pytorchs_cpu_index():
    """PyPI's torch for Linux is the CUDA build (19 CUDA wheels): the CPU set-up must not ask PyPI for it."""
    readme = (ROOT / "README.md").read_text()
    [quickstart] = [line.removeprefix("## ") for line in readme.splitlines() if line.startswith("## Quickstart")]
    [torch_line] = [line for line in first_bash_block(readme, quickstart) if "pip install torch" in line]
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_line


DOCS = [ROOT / "README.md", ROOT / "jobs" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BENCHES = sorted((ROOT / "bench").rglob("*.py"))  # their docstrings, which say how to run them and what they measure
# A path into the repository, as the docs write one in backticks: `pipeline/trial/worker.py`, `jobs/quickstart.yaml`,
# `.ci/run` (a `file.py:NAME` suffix names something in the file). Globs and placeholders are not paths.
REPO_PATH = re.compile(
    r"`((?:sdt|pipeline|tests|bench|jobs|docs|examples|\.[A-Za-z0-9_-]+)/[A-Za-z0-9_./-]+)(?::[A-Za-z_]+)?`"
)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
# A repository file named outside backticks, as a command line names one: `python bench/x.py jobs/y.yaml`.
BARE_PATH = re.compile(
    r"(?<![\w/.-])((?:sdt|pipeline|tests|bench|jobs|docs|examples)/[\w./-]+\.(?:py|yaml|yml|md|json))\b"
)
# A Markdown file named anywhere, in backticks or not: another document, which must be one of the repository's.
DOCUMENT = re.compile(r"(?<![\w/.<>-])([\w.-]+(?:/[\w.-]+)*\.md)\b")
# A file named by an absolute path (`/tmp/count.py`): outside the repository, whatever it holds.
ABSOLUTE = re.compile(r"`((?:/|~/)[^`\s]*\.(?:py|md|sh|json|yaml|yml|txt|csv|ipynb))`")
URL = re.compile(r"https?://\S+")


def written_by_sdtune() -> set[str]:
    """Markdown files that sdtune writes into a sweep or an export (the docs name them; the repository has none)."""
    from pipeline.results.report import SUMMARY_MD
    from pipeline.storage.layout import CARD_FILE

    return {SUMMARY_MD, CARD_FILE}


def repository_documents() -> set[str]:
    return {path.name for path in (ROOT / "docs").rglob("*.md")} | {"README.md"}


def named_paths(doc: Path, text: str | None = None) -> list[tuple[str, Path]]:
    """Every relative link target, repository path and document ``doc`` names, with where it should be; a file named
    by an absolute path, with a place that cannot exist."""
    text = doc.read_text() if text is None else text
    plain = URL.sub("", text)
    named = [(target, doc.parent / target) for target in LINK.findall(text) if "://" not in target]
    named += [(path, ROOT / path.rstrip(".")) for path in REPO_PATH.findall(text) + BARE_PATH.findall(plain)]
    named += [
        (name, doc.parent / name if (doc.parent / name).exists() else ROOT / name)
        for name in DOCUMENT.findall(plain)
        if "/" in name or name not in repository_documents() | written_by_sdtune()
    ]
    named += [(path, ROOT / "<outside the repository>" / path.lstrip("/~")) for path in ABSOLUTE.findall(text)]
    first: dict[str, Path] = {}
    for name, path in named:
        first.setdefault(name, path)  # each name once, where it was first found
    return list(first.items())


def docstring(bench: Path) -> str:
    return ast.get_docstring(ast.parse(bench.read_text())) or ""


def test_every_path_the_docs_name_exists():
    missing = [
        f"{doc.relative_to(ROOT)}: {name}" for doc in DOCS for name, path in named_paths(doc) if not path.exists()
    ]
    missing += [
        f"{bench.relative_to(ROOT)}: {name}"
        for bench in BENCHES
        for name, path in named_paths(bench, docstring(bench))
        if not path.exists()
    ]
    assert missing == []


def test_the_path_check_sees_a_missing_file(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "See [the notes](notes.md) and `pipeline/no_such_room/x.py`, not [a site](https://example.org/a.md); the "
        "design (sdt-spec.md 5.2) and `.gpu/call7.sh`; `/tmp/count.py`; the report's `summary.md` and README.md.\n"
        "    python bench/trial_speed.py jobs/no-such.yaml"
    )
    assert [name for name, path in named_paths(doc) if not path.exists()] == [
        "notes.md", "pipeline/no_such_room/x.py", ".gpu/call7.sh", "jobs/no-such.yaml", "sdt-spec.md", "/tmp/count.py"
    ]  # fmt: skip
