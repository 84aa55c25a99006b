"""The layout rules of the developer guide, checked on the working tree: files of a few hundred
lines (hard limit 600), and no `sys.path` manipulation in tests/ or bench/ (they are packages:
`from tests.support import ...`, `from tests.integration import bed`)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE_FOLDERS = ("tun2socks", "dns", "bench", "tests")
SOURCE_SUFFIXES = frozenset({".py", ".js", ".html", ".css", ".sh"})
MAX_LINES = 600


def source_files(*folders: str) -> list[Path]:
    return sorted(
        path
        for folder in folders
        for path in (REPO / folder).rglob("*")
        if path.suffix in SOURCE_SUFFIXES and path.is_file() and "__pycache__" not in path.parts
    )


def line_count(path: Path) -> int:
    return len(path.read_text(errors="replace").splitlines())


def sys_path_uses(source: str, filename: str = "<source>") -> list[int]:
    """Lines that touch `sys.path` (through any name `sys` is imported as, or
    `from sys import path`)."""
    tree = ast.parse(source, filename)
    sys_names = {"sys"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            sys_names.update(
                alias.asname for alias in node.names if alias.name == "sys" and alias.asname
            )
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            touches = node.attr == "path" and node.value.id in sys_names
        elif isinstance(node, ast.ImportFrom):
            touches = node.module == "sys" and any(a.name == "path" for a in node.names)
        else:
            touches = False
        if touches:
            lines.append(node.lineno)
    return sorted(lines)


def test_no_source_file_is_over_600_lines() -> None:
    files = source_files(*SOURCE_FOLDERS)
    assert len(files) > 100  # the walk found the tree
    too_long = {str(p.relative_to(REPO)): n for p in files if (n := line_count(p)) > MAX_LINES}
    assert too_long == {}


def test_tests_and_bench_never_touch_sys_path() -> None:
    files = [p for p in source_files("tests", "bench") if p.suffix == ".py"]
    assert REPO / "tests" / "unit" / "test_layout.py" in files
    offenders = {
        str(p.relative_to(REPO)): lines
        for p in files
        if (lines := sys_path_uses(p.read_text(), str(p)))
    }
    assert offenders == {}


def test_sys_path_scanner_sees_each_form() -> None:
    source = (
        "import sys\n"
        "import sys as system\n"
        "from sys import path\n"
        "sys.path.insert(0, 'x')\n"
        "system.path.append('y')\n"
        "sys.path[:0] = ['z']\n"
        "print(sys.argv, sys.platform)\n"
    )
    assert sys_path_uses(source) == [3, 4, 5, 6]


def test_line_count_counts_lines(tmp_path: Path) -> None:
    path = tmp_path / "f.py"
    path.write_text("a\n" * 601)
    assert line_count(path) == 601 > MAX_LINES


def bare_sibling_imports(source: str, siblings: set[str]) -> list[int]:
    """Lines that import a module of tests/ or bench/ by its bare name (`import bed`), which
    works only with that folder on sys.path."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        else:
            continue
        if siblings.intersection(names):
            lines.append(node.lineno)
    return sorted(lines)


def test_tests_and_bench_import_their_helpers_through_the_package() -> None:
    files = [p for p in source_files("tests", "bench") if p.suffix == ".py"]
    siblings = {p.stem for p in files if p.stem != "__init__"}
    assert {"bed", "tcp_helpers", "httpserver"} <= siblings
    offenders = {
        str(p.relative_to(REPO)): lines
        for p in files
        if (lines := bare_sibling_imports(p.read_text(), siblings))
    }
    assert offenders == {}


def test_bare_import_scanner_sees_each_form() -> None:
    source = "import bed as bedlib\nfrom httpserver import X\nfrom tests.integration import bed\n"
    assert bare_sibling_imports(source, {"bed", "httpserver"}) == [1, 2]
