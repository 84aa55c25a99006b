"""Settings documents shared by the atheris harness (tests/fuzz/fuzz_config.py) and the
hypothesis tests (tests/unit/config/test_fuzz_config.py): the key paths of the settings models,
and a value set at a key path of a nested document."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def model_keys(
    model: type[BaseModel], *, leaves_only: bool, prefix: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    """Every key path of `model`'s fields, a section before its own keys; with `leaves_only`,
    only the keys that are no section."""
    keys: list[tuple[str, ...]] = []
    for name, info in model.model_fields.items():
        path = (*prefix, name)
        sub = info.annotation
        section = sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None
        if section is None or not leaves_only:
            keys.append(path)
        if section is not None:
            keys += model_keys(section, leaves_only=leaves_only, prefix=path)
    return keys


def set_at(document: dict[str, Any], path: tuple[str, ...], value: object) -> None:
    """`value` at `path`, making each section on the way a dict (replacing whatever else is
    there)."""
    node = document
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value
