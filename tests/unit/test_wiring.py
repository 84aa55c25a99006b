"""The shape of the wiring, read from the source with `ast` (issue 11):

- no import cycle between the modules of `tun2socks/` and `dns/tun2socks_dns/`;
- no attribute of the engine assigned from outside `engine.py` (it gets its parts through
  its constructor, nobody rewrites them);
- no `getattr(..., "inner")` / `getattr(..., "default")` walks over chains of wrappers;
- the stack's drop counters are bumped only inside `tun2socks/net/`.

Every import counts, also those under `if TYPE_CHECKING:` and inside functions: the old
cycle (app <-> observe.api, metrics, snapshot) ran through type-only imports, and a cycle
that only the type checker or a late call sees is still one module knowing another that
knows it. A module that needs another's types names a narrow Protocol instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# (folder that holds the top-level package, package name)
PACKAGES = [(ROOT, "tun2socks"), (ROOT / "dns", "tun2socks_dns")]


def source_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the two packages by dotted name (a package by its own name)."""
    found: dict[str, Path] = {}
    for base, package in [(root / b.relative_to(ROOT), p) for b, p in PACKAGES]:
        for path in sorted((base / package).rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that `name` (at `path`) imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        # The longest prefix that is one of our modules (`import a.b.c` runs a, a.b, a.b.c;
        # the ones that matter for a cycle between our modules are the deepest we have).
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in modules else base)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of names (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = source_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def source_files(root: Path = ROOT) -> list[Path]:
    return list(source_modules(root).values())


# ------------------------------------------------------------------ the rules


def test_no_import_cycle_between_modules() -> None:
    graph = import_graph()
    assert len(graph) > 40, "the scan found too few modules"
    assert "tun2socks.observe.api" in graph["tun2socks.app"]  # the scan sees plain imports
    assert "tun2socks_dns.install" in graph["tun2socks.app"]
    assert "tun2socks_dns.forwarder" in graph["tun2socks_dns.install"]  # and relative ones
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def engine_assignments(path: Path) -> list[str]:
    """`engine.X = ...` or `<anything>.engine.X = ...` (also +=, setattr) in `path`."""

    def names_engine(value: ast.expr) -> bool:
        return (isinstance(value, ast.Name) and value.id == "engine") or (
            isinstance(value, ast.Attribute) and value.attr == "engine"
        )

    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "setattr"
            and node.args
            and names_engine(node.args[0])
        ):
            found.append(f"{path.name}:{node.lineno}: setattr on the engine")
        for target in targets:
            while isinstance(target, ast.Subscript):  # engine.X[key] = ... changes X too
                target = target.value
            if isinstance(target, ast.Attribute) and names_engine(target.value):
                found.append(f"{path.name}:{node.lineno}: engine.{target.attr} assigned")
    return found


def test_no_engine_attribute_is_assigned_from_outside_engine_py() -> None:
    found = [
        line
        for path in source_files()
        if path.name != "engine.py"
        for line in engine_assignments(path)
    ]
    assert found == []


def test_the_engine_assignment_scan_sees_assignments(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f(engine, x):\n"
        "    engine.dialer = x\n"
        "    x.engine.stats_sources['dns'] = x\n"
        "    setattr(engine, 'domain_lookup', x)\n"
        "    engine.stack.send(1, b'')\n"
    )
    assert [line.split(": ", 1)[1] for line in engine_assignments(sample)] == [
        "engine.dialer assigned",
        "engine.stats_sources assigned",
        "setattr on the engine",
    ]


WRAPPER_NAMES = frozenset({"inner", "default"})


def wrapper_walks(path: Path) -> list[str]:
    """`getattr(x, "inner" | "default", ...)` calls in `path`."""
    return [
        f"{path.name}:{node.lineno}: getattr(..., {node.args[1].value!r})"
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "getattr"
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and node.args[1].value in WRAPPER_NAMES
    ]


def test_no_getattr_walk_over_wrapper_chains() -> None:
    assert [line for path in source_files() for line in wrapper_walks(path)] == []


def test_the_wrapper_walk_scan_sees_one(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f(d):\n    return getattr(d, 'inner', None)\n")
    assert wrapper_walks(sample) == ["sample.py:2: getattr(..., 'inner')"]


def drop_counts(path: Path) -> list[str]:
    """`<x>.drops[...] += / =` in `path`: bumping the stack's drop counters."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        target = node.target if isinstance(node, ast.AugAssign) else None
        if isinstance(node, ast.Assign):
            target = node.targets[0]
        if (
            isinstance(target, ast.Subscript)
            and isinstance(target.value, ast.Attribute)
            and target.value.attr == "drops"
        ):
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_drop_counters_are_bumped_only_inside_the_stack() -> None:
    net = ROOT / "tun2socks" / "net"
    outside = [path for path in source_files() if net not in path.parents]
    assert [line for path in outside for line in drop_counts(path)] == []
    assert any(drop_counts(path) for path in net.glob("*.py"))  # the scan sees them
