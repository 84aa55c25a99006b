"""YAML syntax errors are reported where the problem starts, not where the parser gave up."""

from pathlib import Path

import pytest

from tun2socks.config import ConfigError, load_settings


def error_of(tmp_path: Path, text: str) -> ConfigError:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(str(path))
    assert "\n" not in str(info.value)
    return info.value


def test_unclosed_quote_on_line_2_of_3_is_reported_at_line_2(tmp_path: Path) -> None:
    # The scanner only notices at the end of the stream (line 4): the quote opened on line 2.
    error = error_of(tmp_path, 'tun:\n  name: "tun0\n  mtu: 1500\n')
    assert error.line == 2
    assert str(error) == (
        f"{tmp_path / 'config.yaml'}:2:9: invalid YAML: found unexpected end of stream, "
        "while scanning a quoted scalar that starts here"
    )


def test_unclosed_quote_without_final_newline_is_reported_at_its_line(tmp_path: Path) -> None:
    error = error_of(tmp_path, "proxy:\n  url: 'socks5://h:1\ntun:\n  mtu: 1500")
    assert error.line == 2
    assert ":2:8: invalid YAML:" in str(error)


def test_unclosed_flow_list_is_reported_at_its_bracket(tmp_path: Path) -> None:
    error = error_of(tmp_path, "proxy: {url: 'socks5://h:1'}\ntun:\n  addresses: [10.0.0.1/24\n")
    assert error.line == 3
    assert ":3:14: invalid YAML: did not find expected ',' or ']'" in str(error)
    assert "flow sequence that starts here" in str(error)


def test_misplaced_key_keeps_the_line_of_the_key_not_of_its_mapping(tmp_path: Path) -> None:
    # The context here is the whole block mapping (line 1): the problem mark is the useful one.
    error = error_of(tmp_path, "proxy:\n  url: socks5://h:1\ntun: {mtu: 1500}\n  name: x\n")
    assert error.line == 4
    assert str(error).endswith(":4:3: invalid YAML: did not find expected key")


def test_key_without_colon_is_reported_where_the_key_starts(tmp_path: Path) -> None:
    # The scanner looks for the ':' up to the next line; the stray key is on line 3.
    error = error_of(tmp_path, "tun:\n  name: x\n  'mtu'\n  y: 1\n")
    assert error.line == 3
    assert str(error).endswith(
        ":3:3: invalid YAML: could not find expected ':' at line 4, "
        "while scanning a simple key that starts here"
    )
