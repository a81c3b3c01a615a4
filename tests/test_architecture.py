"""The rooms of sdt/ and pipeline/ and which way imports run between them (docs/architecture.md).

Read from the source with ast, so the test sees every import, also those inside functions; imports under
``if TYPE_CHECKING:`` are annotations only and never run, so they do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# pipeline's rooms, lowest first: a room imports only from the rooms before it (and from itself).
PIPELINE_ROOMS = ("compat", "storage", "tasks", "spec", "trial", "results", "sweep", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(path: Path, modules: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """The modules ``path`` imports when it runs: absolute names, relative ones resolved. ``from package import
    name`` imports the module ``package.name`` where ``modules`` has one, else ``package`` itself."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def project_graph(packages: tuple[str, ...]) -> dict[str, set[str]]:
    files = [path for package in packages for path in sorted((ROOT / package).rglob("*.py"))]
    modules = {module_name(path): path for path in files}
    return {
        name: {m for m in runtime_imports(path, set(modules)) if m in modules and m != name}
        for name, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 2 else None


def test_pipeline_is_only_rooms():
    loose = sorted(p.name for p in (ROOT / "pipeline").glob("*.py") if p.name != "__init__.py")
    rooms = sorted(p.name for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").exists())
    assert loose == []
    assert rooms == sorted(PIPELINE_ROOMS)


def test_every_room_says_what_it_owns_and_may_import():
    for room in PIPELINE_ROOMS:
        doc = ast.get_docstring(ast.parse((ROOT / "pipeline" / room / "__init__.py").read_text()))
        assert doc and "Imports" in doc, f"pipeline/{room}/__init__.py needs a docstring saying what it may import"


@pytest.mark.parametrize("package", ["sdt", "pipeline"])
def test_no_import_circles(package):
    assert cycles(project_graph((package,))) == []


def test_pipeline_imports_only_downward():
    upward = []
    for module, imported in project_graph(("pipeline",)).items():
        here = room_of(module)
        for target in imported:
            there = room_of(target)
            if here and there and PIPELINE_ROOMS.index(there) > PIPELINE_ROOMS.index(here):
                upward.append(f"{module} -> {target}")
    assert sorted(upward) == []


def test_sdt_never_imports_pipeline():
    imported = {m for path in (ROOT / "sdt").rglob("*.py") for m in runtime_imports(path)}
    assert sorted(m for m in imported if m.split(".")[0] in ("pipeline", "ray", "mlflow", "deepspeed")) == []


def test_the_checker_sees_a_circle_and_an_upward_import():
    # the checks above pass on a clean tree; this makes sure they would fail on a bad one
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert room_of("pipeline.sweep.tune") == "sweep" and room_of("pipeline") is None
    assert PIPELINE_ROOMS.index("sweep") > PIPELINE_ROOMS.index("trial")
