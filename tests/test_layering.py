"""The package's layering rules, checked by reading its source with `ast`.

Nothing here imports flowsdk: the rules hold for the source as written,
including imports under `if TYPE_CHECKING:` and imports inside functions,
which an import-time check would miss. The rules (see STYLE.md):

- the import graph between flowsdk's modules has no cycle;
- the requester side (the store, the CLI, `Client`, the console) imports no runtime internals,
  and the store imports only records, phases, liveness, errors and itself;
- no module imports a private name from another module (a private *submodule* is fine);
- no module is longer than `MAX_LINES`, unless `LONG_MODULES` says why.

An import `from P import N` is an edge to the submodule `P.N` when there is
one, else to `P` itself (for a package, its `__init__`). Importing `P.Q.R`
is an edge to `P.Q.R` only, not to the packages above it: every module
would otherwise depend on `flowsdk/__init__.py`, which imports nearly
everything, and the graph would say nothing.
"""

from __future__ import annotations

import ast
import collections
import fnmatch
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# -- the rules -------------------------------------------------------------------------

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "flowsdk"

# Runtime internals: the action tree, the runner, and how a body is executed.
# fnmatch patterns over dotted module names (`*` also crosses dots). The
# `_core*`, `_action*`, `_delivery*`, `_outcome*` and `_execute*` names do not
# exist yet: they are the names the runtime's restructuring may introduce.
RUNTIME_INTERNALS: tuple[str, ...] = (
    "flowsdk._runtime",
    "flowsdk._run",
    "flowsdk._control",
    "flowsdk._task",
    "flowsdk._retry",
    "flowsdk._history",
    "flowsdk._group",
    "flowsdk._info",
    "flowsdk.executors",
    "flowsdk.executors.*",
    "flowsdk._core*",
    "flowsdk._action*",
    "flowsdk._delivery*",
    "flowsdk._outcome*",
    "flowsdk._execute*",
    "flowsdk._gather",
    "flowsdk._attempts",
    "flowsdk._limit",
)

# The requester side: it reaches a run only through the store, so it must work
# in a process that has no runtime at all (the CLI, a console, another host).
REQUESTER_SIDE: tuple[str, ...] = (
    "flowsdk.store",
    "flowsdk.store.*",
    "flowsdk.cli",
    "flowsdk.cli.*",
    "flowsdk._client",
    "flowsdk.ui",
    "flowsdk.ui.*",
)

STORE: tuple[str, ...] = ("flowsdk.store", "flowsdk.store.*")

# Everything of flowsdk the store may import: a second store (PostgreSQL) is
# written against records and phases, never against the runtime.
STORE_MAY_IMPORT: tuple[str, ...] = (
    "flowsdk.errors",
    "flowsdk._records",
    "flowsdk._phases",
    "flowsdk._liveness",
    "flowsdk._bodies",
    "flowsdk.store",
    "flowsdk.store.*",
)

# STYLE.md: "Aim for modules of ~200-400 lines; split past ~600."
MAX_LINES = 600

# Modules allowed past MAX_LINES, as {path relative to the repository: reason}.
# An entry without a reason, or for a module that no longer needs it, fails.
LONG_MODULES: dict[str, str] = {}


# -- the analyser ----------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One imported module (or name) of one import statement, resolved to a module.

    Attributes:
        importer: The dotted name of the importing module.
        where: `path:line` of the statement, the path relative to the package's parent.
        target: The dotted name of the module imported (a submodule when the
            imported name is one, else the module named after `from`).
        name: The name after `import` in a `from` import; `None` for `import X`.
        text: The statement as written, for one name (`from x import y as z`).
        context: `TYPE_CHECKING`, `in def f`, or empty for a module-level import.
    """

    importer: str
    where: str
    target: str
    name: str | None
    text: str
    context: str

    def describe(self) -> str:
        """Say where the import is and what it imports, for a failure message."""
        context = f"  [{self.context}]" if self.context else ""
        return f"{self.where}: {self.text}{context}"


@dataclass
class Package:
    """A package's modules, their lengths, and every import between them.

    Attributes:
        name: The top-level package's dotted name (`flowsdk`).
        paths: Each module's dotted name -> its file (`__init__.py` for a package).
        lines: Each module's dotted name -> its number of lines.
        imports: Every import whose target is a module of this package, in
            file then line order.
        display_root: The directory paths are shown relative to.
    """

    name: str
    paths: dict[str, Path]
    lines: dict[str, int]
    imports: list[Import] = field(default_factory=list)
    display_root: Path = Path()

    def show(self, module: str) -> str:
        """Return `module`'s file, relative to `display_root`, as a POSIX path."""
        return self.paths[module].relative_to(self.display_root).as_posix()


def scan(package_dir: Path) -> Package:
    """Read every module under `package_dir` and resolve its imports of the package.

    Args:
        package_dir: The directory of a top-level package (it has `__init__.py`).

    Returns:
        The package's modules and imports, sorted so that messages are deterministic.
    """
    package = Package(name=package_dir.name, paths={}, lines={}, display_root=package_dir.parent)
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        module = ".".join(parts)
        package.paths[module] = path
    trees: dict[str, ast.Module] = {}
    for module, path in package.paths.items():
        source = path.read_text(encoding="utf-8")
        package.lines[module] = len(source.splitlines())
        trees[module] = ast.parse(source, filename=str(path))
    for module, tree in trees.items():
        package.imports.extend(_ImportCollector(package, module).collect(tree))
    return package


class _ImportCollector(ast.NodeVisitor):
    """Collect a module's imports of its own package, with the context of each."""

    def __init__(self, package: Package, module: str) -> None:
        self.package = package
        self.module = module
        self.is_package = package.paths[module].name == "__init__.py"
        self.context: list[str] = []
        self.found: list[Import] = []

    def collect(self, tree: ast.Module) -> list[Import]:
        self.visit(tree)
        return self.found

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.context.append("TYPE_CHECKING")
            for child in node.body:
                self.visit(child)
            self.context.pop()
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._visit_function(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._visit_function(node)

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.context.append(f"in def {node.name}")
        self.generic_visit(node)
        self.context.pop()

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            target = self._known(alias.name)
            if target is not None:
                text = f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else "")
                self._add(node, target, None, text)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._absolute(node.module, node.level)
        if base is None:
            return
        written = "." * node.level + (node.module or "")
        for alias in node.names:
            # `from P import N` loads the submodule P.N when there is one.
            target = self._known(f"{base}.{alias.name}") or self._known(base)
            if target is None:
                continue
            text = f"from {written} import {alias.name}" + (
                f" as {alias.asname}" if alias.asname else ""
            )
            self._add(node, target, alias.name, text)

    def _absolute(self, module: str | None, level: int) -> str | None:
        """Resolve a possibly relative `from` module to a dotted name."""
        if level == 0:
            return module
        parts = self.module.split(".")
        if not self.is_package:
            parts.pop()
        if level > 1:
            parts = parts[: len(parts) - (level - 1)]
        if not parts:
            return None
        return ".".join([*parts, module] if module else parts)

    def _known(self, dotted: str) -> str | None:
        """Return the longest prefix of `dotted` that is a module of the package, if any."""
        parts = dotted.split(".")
        while parts:
            candidate = ".".join(parts)
            if candidate in self.package.paths:
                return candidate
            parts.pop()
        return None

    def _add(self, node: ast.stmt, target: str, name: str | None, text: str) -> None:
        where = f"{self.package.show(self.module)}:{node.lineno}"
        context = ", ".join(self.context)
        self.found.append(Import(self.module, where, target, name, text, context))


def _is_type_checking(test: ast.expr) -> bool:
    """Whether an `if` test is `TYPE_CHECKING` or `typing.TYPE_CHECKING`."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _matches(module: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns)


def _edges(package: Package) -> dict[str, dict[str, list[Import]]]:
    """Return importer -> target -> the imports making that edge; no self-edges.

    A module importing a name from itself creates no ordering between modules,
    so it cannot be part of a cycle.
    """
    edges: dict[str, dict[str, list[Import]]] = {m: {} for m in package.paths}
    for imp in package.imports:
        if imp.target != imp.importer:
            edges[imp.importer].setdefault(imp.target, []).append(imp)
    return edges


def _strongly_connected(graph: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative so a deep package cannot hit the recursion limit."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _shortest_cycle(
    graph: dict[str, dict[str, list[Import]]], start: str, within: set[str]
) -> list[str]:
    """Breadth-first: the shortest path from `start` back to itself inside `within`."""
    previous: dict[str, str] = {}
    queue = collections.deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node]):
            if child not in within:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    return []


def _edge(graph: dict[str, dict[str, list[Import]]], importer: str, target: str) -> str:
    """Describe one edge by its first statement, and how many more make it."""
    first, *more = graph[importer][target]
    also = f"  (+{len(more)} more)" if more else ""
    return f"{importer} -> {target}: {first.describe()}{also}"


def find_cycles(package: Package) -> list[str]:
    """Describe each cycle: per set of modules importing each other, the shortest cycle per member.

    Returns:
        One block of lines per distinct cycle, each edge with the statement
        that makes it; empty when the graph is acyclic.
    """
    graph = _edges(package)
    blocks: list[str] = []
    for component in _strongly_connected(graph):
        if len(component) < 2:
            continue
        seen: set[tuple[str, ...]] = set()
        cycles: list[list[str]] = []
        for member in component:
            cycle = _shortest_cycle(graph, member, set(component))
            # The same cycle found from another member: rotate it to a canonical start.
            ring = cycle[:-1]
            turn = ring.index(min(ring))
            canonical = tuple(ring[turn:] + ring[:turn])
            if canonical not in seen:
                seen.add(canonical)
                cycles.append([*canonical, canonical[0]])
        lines = [f"modules importing each other: {', '.join(component)}"]
        for cycle in cycles:
            lines.append("  cycle: " + " -> ".join(cycle))
            for importer, target in itertools.pairwise(cycle):
                lines.append(f"    {_edge(graph, importer, target)}")
        # Every edge inside the set, since breaking the cycles listed may leave others.
        lines.append("  every import between these modules:")
        for importer in component:
            lines.extend(
                f"    {_edge(graph, importer, target)}"
                for target in sorted(graph[importer])
                if target in component
            )
        blocks.append("\n".join(lines))
    return blocks


def forbidden_imports(
    package: Package, importers: Sequence[str], forbidden: Sequence[str]
) -> list[str]:
    """List the imports by a module matching `importers` of a module matching `forbidden`."""
    return [
        f"{imp.describe()}  -> {imp.target}"
        for imp in package.imports
        if _matches(imp.importer, importers) and _matches(imp.target, forbidden)
    ]


def imports_outside(
    package: Package, importers: Sequence[str], allowed: Sequence[str]
) -> list[str]:
    """List the imports by a module matching `importers` of a module not matching `allowed`."""
    return [
        f"{imp.describe()}  -> {imp.target}"
        for imp in package.imports
        if _matches(imp.importer, importers) and not _matches(imp.target, allowed)
    ]


def private_name_imports(package: Package) -> list[str]:
    """List each `from M import _x` of a package module where `_x` is not a submodule of `M`.

    Dunders (`__version__`) are public by convention and allowed.
    """
    found = []
    for imp in package.imports:
        name = imp.name
        if name is None or not name.startswith("_") or name.startswith("__"):
            continue
        # A private submodule resolves to itself; a private name resolves to its module.
        if not imp.target.endswith(f".{name}"):
            found.append(f"{imp.describe()}  (private name {name!r} of {imp.target})")
    return found


def oversized_modules(package: Package, limit: int, allowed: dict[str, str]) -> list[str]:
    """List modules longer than `limit` lines not in `allowed`, and stale or unexplained entries."""
    found = []
    lengths = {package.show(m): n for m, n in package.lines.items()}
    for path, n in sorted(lengths.items()):
        if n > limit and path not in allowed:
            found.append(f"{path}: {n:,} lines (limit {limit})")
    for path, reason in sorted(allowed.items()):
        if not reason.strip():
            found.append(f"{path}: listed as allowed without a reason")
        elif lengths.get(path, 0) <= limit:
            found.append(f"{path}: listed as allowed but is {lengths.get(path, 0)} lines now")
    return found


def _fail_on(rule: str, violations: Sequence[str]) -> None:
    """Fail with every violation on its own line, without pytest's repr of the list."""
    if violations:
        pytest.fail(f"{rule}: {len(violations)}\n" + "\n".join(violations), pytrace=False)


# -- flowsdk's rules -------------------------------------------------------------------


def test_flowsdk_imports_form_no_cycle() -> None:
    _fail_on("sets of flowsdk modules that import each other", find_cycles(scan(PACKAGE_DIR)))


def test_store_cli_and_client_import_no_runtime_internals() -> None:
    found = forbidden_imports(scan(PACKAGE_DIR), REQUESTER_SIDE, RUNTIME_INTERNALS)
    _fail_on("imports of runtime internals by the store, the CLI or Client", found)


def test_store_imports_only_records_phases_liveness_and_errors() -> None:
    found = imports_outside(scan(PACKAGE_DIR), STORE, STORE_MAY_IMPORT)
    _fail_on(f"imports by the store of modules outside {', '.join(STORE_MAY_IMPORT)}", found)


def test_no_module_imports_a_private_name_of_another() -> None:
    _fail_on("private names imported from another module", private_name_imports(scan(PACKAGE_DIR)))


def test_no_module_is_longer_than_the_limit() -> None:
    found = oversized_modules(scan(PACKAGE_DIR), MAX_LINES, LONG_MODULES)
    _fail_on(f"modules longer than {MAX_LINES} lines and not in LONG_MODULES", found)


def test_flowsdk_scan_sees_every_module_and_guarded_imports() -> None:
    package = scan(PACKAGE_DIR)
    assert {"flowsdk", "flowsdk.errors", "flowsdk.store", "flowsdk.cli"} <= set(package.paths)
    # The analyser must read TYPE_CHECKING blocks, or (a) and (b) would miss half the graph.
    assert any(imp.context == "TYPE_CHECKING" for imp in package.imports)
    errors = [imp for imp in package.imports if imp.text == "from flowsdk import errors"]
    assert errors
    assert {imp.target for imp in errors} == {"flowsdk.errors"}


# -- the analyser on a package made for it, so it is known to be able to fail ------------


def _write(root: Path, files: dict[str, list[str]]) -> Path:
    for name, lines in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return root / "pkg"


# Each file as a list of lines: one import per line, so the expected `path:line`s read off here.
SYNTHETIC = {
    "pkg/__init__.py": ["from pkg.a import thing", "__version__ = '1'"],
    "pkg/a.py": ["from pkg.b import other", "thing = 1"],
    "pkg/b.py": [
        "from typing import TYPE_CHECKING",
        "if TYPE_CHECKING:",
        "    from pkg import a",
        "other = 2",
    ],
    "pkg/c.py": [
        "from pkg import __version__, _sub",
        "from . import a",
        "def f() -> int:",
        "    from .a import _hidden",
        "    return _hidden",
    ],
    "pkg/_sub.py": [],
    "pkg/inner/__init__.py": ["from ..b import other", "from .. import _sub"],
}


def test_analyser_finds_a_cycle_through_a_type_checking_import(tmp_path: Path) -> None:
    cycles = find_cycles(scan(_write(tmp_path, SYNTHETIC)))
    assert len(cycles) == 1
    assert "cycle: pkg.a -> pkg.b -> pkg.a" in cycles[0]
    assert "pkg/b.py:3: from pkg import a  [TYPE_CHECKING]" in cycles[0]


def test_analyser_finds_a_private_name_but_not_a_private_submodule(tmp_path: Path) -> None:
    found = private_name_imports(scan(_write(tmp_path, SYNTHETIC)))
    assert found == [
        "pkg/c.py:4: from .a import _hidden  [in def f]  (private name '_hidden' of pkg.a)"
    ]


def test_analyser_resolves_relative_and_submodule_imports(tmp_path: Path) -> None:
    package = scan(_write(tmp_path, SYNTHETIC))
    targets = {(imp.importer, imp.text): imp.target for imp in package.imports}
    assert targets[("pkg.c", "from pkg import __version__")] == "pkg"
    assert targets[("pkg.c", "from pkg import _sub")] == "pkg._sub"
    assert targets[("pkg.c", "from . import a")] == "pkg.a"
    assert targets[("pkg.inner", "from ..b import other")] == "pkg.b"
    assert targets[("pkg.inner", "from .. import _sub")] == "pkg._sub"


def test_analyser_applies_layer_and_length_rules(tmp_path: Path) -> None:
    package = scan(_write(tmp_path, SYNTHETIC))
    assert forbidden_imports(package, ["pkg.inner*"], ["pkg.b"]) == [
        "pkg/inner/__init__.py:1: from ..b import other  -> pkg.b"
    ]
    assert imports_outside(package, ["pkg.a"], ["pkg.a"]) == [
        "pkg/a.py:1: from pkg.b import other  -> pkg.b"
    ]
    assert oversized_modules(package, 4, {"pkg/a.py": ""}) == [
        "pkg/c.py: 5 lines (limit 4)",
        "pkg/a.py: listed as allowed without a reason",
    ]
