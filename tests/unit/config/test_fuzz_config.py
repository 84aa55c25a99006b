"""Property-based fuzzing of the configuration loader: only ConfigError, one line, no secret.

The same properties run for longer under atheris (tests/fuzz/fuzz_config.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.config_cases import model_keys, set_at
from tun2socks.config import ConfigError, Settings, hide_url_password, load_settings

PASSWORD = "pw-Zq8xK2mV"
URL = f"socks5://alice:{PASSWORD}@127.0.0.1:1080"


LEAF_KEYS = model_keys(Settings, leaves_only=True)


def _load(tmp_path: Path, document: object) -> str | None:
    """Load `document` as the config file; the error message, or None if it is valid."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_settings(str(path))
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message
        return message
    return None


def _nest(path: tuple[str, ...], value: object) -> dict[str, Any]:
    document: dict[str, Any] = {"proxy": {"url": URL}}
    node = document
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    return document


@pytest.mark.parametrize("key", [".".join(k) for k in LEAF_KEYS])
@pytest.mark.parametrize("shape", ["text", "list"])
def test_a_url_with_a_password_under_any_key_is_never_echoed(
    tmp_path: Path, key: str, shape: str
) -> None:
    # A proxy URL pasted under the wrong key: the error may quote the value, not the password.
    value: object = URL if shape == "text" else [URL]
    message = _load(tmp_path, _nest(tuple(key.split(".")), value))
    assert message is None or PASSWORD not in message, message


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.sampled_from([URL, "${NOT_SET}", "socks5://u:${X@h:1", "::", "0/0", "[::1]:80"]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
documents = st.lists(st.tuples(st.sampled_from(LEAF_KEYS), values), max_size=6).map(
    lambda items: _merge(items)
)


def _merge(items: list[tuple[tuple[str, ...], object]]) -> dict[str, Any]:
    document: dict[str, Any] = {"proxy": {"url": URL}}
    for path, value in items:
        set_at(document, path, value)
    return document


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(document=documents)
def test_random_documents_fail_only_with_one_line_config_errors(
    tmp_path: Path, document: dict[str, Any]
) -> None:
    message = _load(tmp_path, document)
    if message is not None:
        assert PASSWORD not in message, message


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_random_file_bytes_fail_only_with_config_errors(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "raw.yaml"
    path.write_bytes(raw)
    try:
        load_settings(str(path), [f"proxy.url={URL}"])
    except ConfigError as exc:
        assert "\n" not in str(exc)
        assert PASSWORD not in str(exc)


keys = st.sampled_from([".".join(k) for k in LEAF_KEYS]) | st.text(max_size=12)


@settings(max_examples=300, deadline=None)
@given(overrides=st.lists(st.tuples(keys, st.text(max_size=30) | st.just(URL)), max_size=4))
def test_random_overrides_fail_only_with_config_errors(overrides: list[tuple[str, str]]) -> None:
    items = [f"proxy.url={URL}"] + [f"{key}={value}" for key, value in overrides]
    try:
        load_settings(None, items)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        assert PASSWORD not in str(exc), str(exc)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (URL, "socks5://alice:***@127.0.0.1:1080"),
        ("https://u:p/a@ss@host/x", "https://u:***@host/x"),
        ("socks5://alice@host:1", "socks5://alice@host:1"),  # no password: nothing to hide
        ("tcp://9.9.9.9:53", "tcp://9.9.9.9:53"),
    ],
)
def test_hide_url_password(text: str, shown: str) -> None:
    assert hide_url_password(text) == shown
