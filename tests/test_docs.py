"""The README's commands are what CI runs: `.ci/run` holds the quickstart's set-up and sweep lines and the test
command, in the README's order and word for word, so a README that drifts from what is tested fails here."""

from __future__ import annotations

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
# A path into the repository, as the docs write one in backticks: `pipeline/trial/worker.py`, `jobs/quickstart.yaml`
# (a `file.py:NAME` suffix names something in the file). Globs and placeholders are not paths.
REPO_PATH = re.compile(r"`((?:sdt|pipeline|tests|bench|jobs|docs|examples)/[A-Za-z0-9_./-]+)(?::[A-Za-z_]+)?`")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def named_paths(doc: Path) -> list[tuple[str, Path]]:
    """Every relative link target and repository path ``doc`` names, with where it should be."""
    text = doc.read_text()
    links = [(target, doc.parent / target) for target in LINK.findall(text) if "://" not in target]
    paths = [(path, ROOT / path.rstrip(".")) for path in REPO_PATH.findall(text)]
    return links + paths


def test_every_path_the_docs_name_exists():
    missing = [
        f"{doc.relative_to(ROOT)}: {name}" for doc in DOCS for name, path in named_paths(doc) if not path.exists()
    ]
    assert missing == []


def test_the_path_check_sees_a_missing_file(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("See [the notes](notes.md) and `pipeline/no_such_room/x.py`, not [a site](https://example.org).")
    assert [name for name, path in named_paths(doc) if not path.exists()] == ["notes.md", "pipeline/no_such_room/x.py"]
