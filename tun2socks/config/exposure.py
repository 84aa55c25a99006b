"""Warnings about secrets that other local users can read: the config file and the command line.

A config file that holds a literal secret (a proxy password in a URL, an API token) should be
readable by its owner only. ``${VAR}`` references are fine: the value then lives in the
environment, which only the process owner and root can read. Likewise a password written in
``--proxy`` shows in the process list (``/proc/PID/cmdline`` is world-readable).

The warnings name the file, its mode and the key, never the secret.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator, Sequence
from typing import Any

import yaml

_VAR_REF = re.compile(r"\$\{[^}]*\}")
_URL_PASSWORD = re.compile(r"://[^/@:]*:(.*)@")
_SECRET_KEYS = frozenset({"password", "token", "secret"})


def has_literal_url_password(text: str) -> bool:
    """Whether ``text`` is a URL whose password is written out (not only ``${VAR}``)."""
    match = _URL_PASSWORD.search(text)
    return match is not None and bool(_VAR_REF.sub("", match.group(1)))


def _literal_secrets(node: Any, path: tuple[str, ...] = ()) -> Iterator[str]:
    """Dotted keys under ``node`` that hold a secret written out in the file."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _literal_secrets(value, (*path, str(key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _literal_secrets(value, (*path, str(index)))
    elif isinstance(node, str):
        named_secret = bool(path) and path[-1] in _SECRET_KEYS and bool(_VAR_REF.sub("", node))
        if named_secret or has_literal_url_password(node):
            yield ".".join(path)


def config_file_warnings(path: str) -> list[str]:
    """One warning line if the file at ``path`` is readable by group or others and holds a
    literal secret; an empty list otherwise (also when it cannot be read)."""
    try:
        mode = os.stat(path).st_mode
        if not mode & (stat.S_IRGRP | stat.S_IROTH):
            return []
        with open(path, encoding="utf-8") as file:
            document = yaml.safe_load(file)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    keys = list(_literal_secrets(document))
    if not keys:
        return []
    return [
        f"config file {path} is readable by other users (mode {stat.S_IMODE(mode):04o}) and "
        f"holds a secret at {', '.join(keys)}: run chmod 600 on it, or write ${{VAR}} and "
        "set VAR in the environment"
    ]


def command_line_warnings(argv: Sequence[str]) -> list[str]:
    """One warning line if a URL on the command line carries a literal password."""
    if any(has_literal_url_password(arg) for arg in argv):
        return [
            "a password given on the command line is visible to every local user in the "
            "process list: write ${VAR} instead and set VAR in the environment"
        ]
    return []
