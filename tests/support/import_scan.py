"""The sans-IO boundary check shared by the tests of every pure package: which top-level
modules a source file imports, and the ones a pure module must not."""

from __future__ import annotations

import ast
from pathlib import Path

IO_MODULES = frozenset({"asyncio", "socket", "os", "time", "select", "threading"})


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every absolute import in `path`, at any depth of the file."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module.split(".")[0])
    return modules
