"""Settings: loading, defaults, layering, the proxy URL, and errors that name key and line."""

import re
import textwrap
from collections.abc import Callable, Iterator
from ipaddress import IPv4Interface, IPv6Interface
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from tun2socks.config import ConfigError, ProxyConfig, Settings, TunConfig, load_settings

REPO = Path(__file__).resolve().parents[3]
PASSWORD = "Zq7-sekret-Pw"

WriteConfig = Callable[[str], str]


@pytest.fixture
def write(tmp_path: Path) -> WriteConfig:
    """write(text) -> path of a config file holding the dedented text."""
    counter = iter(range(1000))

    def _write(text: str) -> str:
        path = tmp_path / f"config{next(counter)}.yaml"
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return str(path)

    return _write


def error_of(path: str | None, overrides: list[str] | None = None, **cli: object) -> ConfigError:
    flags = {key.replace("__", "."): value for key, value in cli.items()}
    with pytest.raises(ConfigError) as info:
        load_settings(path, overrides or [], flags)
    message = str(info.value)
    assert "\n" not in message
    return info.value


# --- valid files -------------------------------------------------------------------------------


def test_proxy_url_alone_gives_the_documented_defaults(write: WriteConfig) -> None:
    settings = load_settings(write("proxy: {url: 'socks5://127.0.0.1:1080'}"))
    assert settings.tun.name == "tun0"
    assert settings.tun.addresses == [IPv4Interface("198.18.0.1/15")]
    assert settings.tun.mtu == 1500
    assert settings.tun.offload is True
    assert settings.proxy.connect_timeout == 10.0
    assert (settings.log.level, settings.log.format) == ("warning", "text")
    assert settings.limits.max_flows == 10000
    assert settings.limits.max_half_open == 1000
    assert settings.limits.flow_buffer == 262144
    assert (settings.timeouts.idle, settings.timeouts.time_wait) == (600.0, 2.0)


def test_every_key_is_read_from_the_file(write: WriteConfig) -> None:
    path = write(
        """
        tun:
          name: t2s0
          addresses: [10.0.0.1/24, "fd00:7f::1/64"]
          mtu: 9000
          offload: false
        proxy:
          url: socks5://127.0.0.1:1080
          connect_timeout: 2.5
        log: {level: debug, format: json}
        limits: {max_flows: 5, max_half_open: 2, flow_buffer: 4096}
        timeouts: {idle: 30, time_wait: 0.5}
        """
    )
    settings = load_settings(path)
    assert settings.tun.name == "t2s0"
    assert settings.tun.addresses == [IPv4Interface("10.0.0.1/24"), IPv6Interface("fd00:7f::1/64")]
    assert settings.tun.mtu == 9000
    assert settings.tun.offload is False
    assert settings.proxy.connect_timeout == 2.5
    assert (settings.log.level, settings.log.format) == ("debug", "json")
    assert (settings.limits.max_flows, settings.limits.max_half_open) == (5, 2)
    assert settings.limits.flow_buffer == 4096
    assert settings.timeouts.idle == 30.0
    assert settings.timeouts.time_wait == 0.5


def test_log_level_is_case_insensitive(write: WriteConfig) -> None:
    path = write("proxy: {url: 'socks5://h:1'}\nlog: {level: INFO}\n")
    assert load_settings(path).log.level == "info"


def test_settings_are_frozen(write: WriteConfig) -> None:
    settings = load_settings(write("proxy: {url: 'socks5://h:1'}"))
    with pytest.raises(ValidationError):
        settings.tun.mtu = 9000


# --- the shipped files -------------------------------------------------------------------------


def all_keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from all_keys(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_shipped_configs_load_to_the_defaults() -> None:
    reference = load_settings(str(REPO / "config" / "tun2socks.yaml"))
    minimal = load_settings(str(REPO / "config" / "minimal.yaml"))
    assert reference == minimal
    assert reference.proxy.redacted_url == "socks5://127.0.0.1:1080"


def test_reference_config_has_every_key_each_under_a_comment() -> None:
    lines = (REPO / "config" / "tun2socks.yaml").read_text().splitlines()
    data = yaml.safe_load("\n".join(lines))
    for key in all_keys(Settings):
        *sections, name = key.split(".")  # top-level lists, section keys, nested sections
        node = data
        for section in sections:
            node = node[section]
        assert name in node, f"{key} is missing from the reference config"
    for number, line in enumerate(lines):
        if re.match(r"\s+[a-z_]+:", line):  # a key inside a section
            assert lines[number - 1].lstrip().startswith("#"), f"line {number + 1} has no comment"


def test_reference_config_shows_auth_through_the_environment() -> None:
    text = (REPO / "config" / "tun2socks.yaml").read_text()
    assert re.search(r"^\s*# url: .*\$\{PROXY_PASSWORD\}@", text, re.MULTILINE)


# --- file-level errors -------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    assert str(error_of(path)) == f"{path}: no such file"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert str(error_of(str(tmp_path))) == f"{tmp_path}: is a directory, not a file"


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"proxy:\n  url: \xff\n")
    assert "not UTF-8" in str(error_of(str(path)))


def test_yaml_syntax_error_names_line_and_column(write: WriteConfig) -> None:
    path = write(
        """
        proxy:
          url: socks5://h:1
        tun: {mtu: 1500}
          name: x
        """
    )
    error = error_of(path)
    assert str(error) == f"{path}:4:3: invalid YAML: did not find expected key"
    assert error.line == 4


def test_unclosed_flow_list_is_a_syntax_error(write: WriteConfig) -> None:
    path = write("proxy: {url: 'socks5://h:1'}\ntun:\n  addresses: [10.0.0.1/24\n")
    assert re.match(rf"{re.escape(path)}:\d+:\d+: invalid YAML", str(error_of(path)))


def test_top_level_must_be_a_mapping(write: WriteConfig) -> None:
    path = write("- proxy\n- tun\n")
    message = str(error_of(path))
    assert message.startswith(f"{path}:1: the top level must be a mapping")
    assert "not a list" in message


def test_empty_file_asks_for_the_proxy_url(write: WriteConfig) -> None:
    message = str(error_of(write("# nothing here\n")))
    assert "proxy.url: missing" in message


def test_duplicate_key_is_refused(write: WriteConfig) -> None:
    path = write(
        """
        proxy: {url: 'socks5://h:1'}
        tun:
          mtu: 1500
          mtu: 9000
        """
    )
    assert str(error_of(path)) == f"{path}:4: tun.mtu: duplicate key (first at line 3)"


def test_unsafe_yaml_tags_are_refused(write: WriteConfig) -> None:
    path = write("proxy: !!python/object:os.system {url: x}\n")
    assert str(error_of(path)).startswith(f"{path}:1:")


# --- key errors with their lines ---------------------------------------------------------------


def test_mtu_out_of_range_names_key_line_and_value(write: WriteConfig) -> None:
    path = write(
        """
        # comment
        proxy:
          url: socks5://127.0.0.1:1080
        tun:
          name: tun0
          mtu: 70000
        """
    )
    error = error_of(path)
    assert str(error) == f"{path}:6: tun.mtu: must be between 68 and 65535 (got 70000)"
    assert (error.key, error.line) == ("tun.mtu", 6)


def test_unknown_key_suggests_the_near_one(write: WriteConfig) -> None:
    path = write("proxy: {url: 'socks5://h:1'}\ntun:\n  mtuu: 1400\n")
    assert str(error_of(path)) == f"{path}:3: tun.mtuu: unknown key (did you mean tun.mtu?)"


def test_unknown_section(write: WriteConfig) -> None:
    path = write("proxy: {url: 'socks5://h:1'}\nwidgets: []\n")
    assert str(error_of(path)) == f"{path}:2: widgets: unknown key"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("tun: {mtu: '1500'}", "tun.mtu: must be a whole number (got '1500')"),
        ("tun: {mtu: 1500.5}", "tun.mtu: must be a whole number (got 1500.5)"),
        ("tun: {offload: 1}", "tun.offload: must be true or false (got 1)"),
        ("tun: {name: 7}", "tun.name: must be text (got 7)"),
        ("tun: {name: a-very-long-device-name}", "tun.name: must be 1 to 15 bytes long"),
        ("tun: {name: 'a b'}", "tun.name: must not contain '/', ':' or spaces"),
        ("tun: {addresses: 10.0.0.1/24}", "tun.addresses: must be a list (got '10.0.0.1/24')"),
        ("tun: {addresses: [10.0.0.1]}", "tun.addresses.0: must be an address with a prefix"),
        ("tun: 5", "tun: must be a mapping of keys (got 5)"),
        ("log: {level: loud}", "log.level: must be 'debug', 'info', 'warning' or 'error'"),
        ("log: {format: xml}", "log.format: must be 'text' or 'json' (got 'xml')"),
        ("limits: {max_flows: 0}", "limits.max_flows: must be at least 1 (got 0)"),
        ("limits: {max_half_open: -3}", "limits.max_half_open: must be at least 1 (got -3)"),
        ("limits: {flow_buffer: 1024}", "limits.flow_buffer: must be between 4096 and 16777216"),
        ("limits: {flow_buffer: 1e9}", "limits.flow_buffer: must be a whole number"),
        ("timeouts: {idle: 0}", "timeouts.idle: must be greater than 0 (got 0)"),
        ("timeouts: {time_wait: -1.0}", "timeouts.time_wait: must be greater than 0"),
        ("timeouts: {idle: .inf}", "timeouts.idle: must be a finite number (got inf)"),
        ("timeouts: {idle: }", "timeouts.idle: must be a number (got an empty value)"),
    ],
)
def test_bad_values_name_key_and_line(write: WriteConfig, line: str, expected: str) -> None:
    path = write(f"proxy: {{url: 'socks5://h:1'}}\n{line}\n")
    assert str(error_of(path)).startswith(f"{path}:2: {expected}")


def test_bad_list_item_names_its_own_line(write: WriteConfig) -> None:
    path = write(
        """
        proxy: {url: 'socks5://h:1'}
        tun:
          addresses:
            - 10.0.0.1/24
            - 10.0.0.300/24
        """
    )
    assert str(error_of(path)) == (
        f"{path}:5: tun.addresses.1: not an address with a prefix length (got '10.0.0.300/24')"
    )


def test_missing_url_points_at_the_proxy_mapping(write: WriteConfig) -> None:
    path = write("tun: {mtu: 1500}\nproxy:\n  connect_timeout: 3\n")
    error = error_of(path)
    assert str(error).startswith(f"{path}:2: proxy.url: missing: a proxy URL is required")
    assert error.line == 2


def test_missing_proxy_section_points_at_the_top(write: WriteConfig) -> None:
    path = write("# one\n# two\ntun: {mtu: 1500}\n")
    assert str(error_of(path)).startswith(f"{path}:3: proxy.url: missing")


def test_no_file_and_no_url() -> None:
    assert str(error_of(None)).startswith("proxy.url: missing: a proxy URL is required")


def test_several_errors_report_the_first_by_line_and_count_the_rest(write: WriteConfig) -> None:
    path = write(
        """
        timeouts:
          idle: -1
        proxy: {url: 'socks5://h:1'}
        tun:
          mtu: 1
          bogus: 2
        """
    )
    assert (
        str(error_of(path))
        == f"{path}:2: timeouts.idle: must be greater than 0 (got -1) (and 2 more)"
    )


# --- the proxy URL -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host", "port", "username", "password", "redacted"),
    [
        ("socks5://127.0.0.1:1080", "127.0.0.1", 1080, None, None, "socks5://127.0.0.1:1080"),
        ("socks5h://proxy.example:1", "proxy.example", 1, None, None, "socks5://proxy.example:1"),
        ("SOCKS5://h:65535/", "h", 65535, None, None, "socks5://h:65535"),
        ("socks5://[::1]:1080", "::1", 1080, None, None, "socks5://[::1]:1080"),
        ("socks5://bob@h:9", "h", 9, "bob", None, "socks5://bob@h:9"),
        ("socks5://bob:pw@h:9", "h", 9, "bob", "pw", "socks5://bob:***@h:9"),
        (
            "socks5://b%40b:p%3Aw%25@[fd00::2]:9",
            "fd00::2",
            9,
            "b@b",
            "p:w%",
            "socks5://b%40b:***@[fd00::2]:9",
        ),
        ("socks5://bob:@h:9", "h", 9, "bob", "", "socks5://bob:***@h:9"),
        ("http://10.0.0.1:3128", "10.0.0.1", 3128, None, None, "http://10.0.0.1:3128"),
        ("HTTP://al:pw@[fd00::2]:8", "fd00::2", 8, "al", "pw", "http://al:***@[fd00::2]:8"),
        ("socks5://bob:p@ss@h:9", "h", 9, "bob", "p@ss", "socks5://bob:***@h:9"),
    ],
)
def test_proxy_url_parts(
    url: str, host: str, port: int, username: str | None, password: str | None, redacted: str
) -> None:
    proxy = ProxyConfig(url=url)
    assert proxy.url == url
    assert proxy.scheme == redacted.partition(":")[0]
    assert (proxy.host, proxy.port, proxy.username) == (host, port, username)
    secret = proxy.password.get_secret_value() if proxy.password is not None else None
    assert secret == password
    assert proxy.redacted_url == redacted


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://h:1", "scheme must be socks5://, socks5h:// or http://"),
        ("socks4://h:1", "scheme must be socks5://, socks5h:// or http://"),
        ("http://a%3Ab:c@h:1", "cannot contain ':' (RFC 7617)"),
        ("127.0.0.1:1080", "must look like socks5://"),
        ("socks5://h", "has no port"),
        ("socks5://h:", "port must be a number from 1 to 65535"),
        ("socks5://h:0", "port must be a number from 1 to 65535"),
        ("socks5://h:65536", "port must be a number from 1 to 65535"),
        ("socks5://h:http", "port must be a number from 1 to 65535"),
        ("socks5://:1080", "has no host"),
        ("socks5://::1:1080", "IPv6 address outside brackets"),
        ("socks5://[::1:1080", "'[' without its closing ']'"),
        ("socks5://[nope]:1080", "not an IPv6 address"),
        ("socks5://[::1]", "has no port"),
        ("socks5://h:1/path", "must not have a path"),
        ("socks5://h:1?x=1", "must not have a path"),
        ("socks5://bad host:1", "neither an IP address nor a DNS name"),
        ("socks5://:pw@h:1", "user name is empty"),
        ("socks5://" + "u" * 256 + "@h:1", "user name is longer than 255 bytes"),
        ("socks5://u:" + "p" * 256 + "@h:1", "password is longer than 255 bytes"),
        ("socks5://u:${OOPS@h:1", "'${' without its closing '}'"),
        ("socks5://u:${1X}@h:1", "not ${NAME}"),
    ],
)
def test_bad_proxy_urls(write: WriteConfig, url: str, expected: str) -> None:
    path = write(f"proxy:\n  url: '{url}'\n")
    message = str(error_of(path))
    assert message.startswith(f"{path}:2: proxy.url: ")
    assert expected in message


def test_env_variables_are_expanded_at_load(
    write: WriteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("T2S_USER", "alice")
    monkeypatch.setenv("T2S_PASSWORD", "p@ss:w/rd%41")
    monkeypatch.setenv("T2S_HOST", "10.1.2.3")
    path = write("proxy: {url: 'socks5://${T2S_USER}:${T2S_PASSWORD}@${T2S_HOST}:1080'}\n")
    proxy = load_settings(path).proxy
    assert proxy.url == "socks5://${T2S_USER}:${T2S_PASSWORD}@${T2S_HOST}:1080"
    assert (proxy.username, proxy.host, proxy.port) == ("alice", "10.1.2.3", 1080)
    # Taken verbatim: no percent-decoding of a value that came from the environment.
    assert proxy.password is not None
    assert proxy.password.get_secret_value() == "p@ss:w/rd%41"
    assert proxy.redacted_url == "socks5://alice:***@10.1.2.3:1080"


def test_whole_url_from_one_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2S_PROXY_URL", "socks5://u:p%40w@[::1]:1080")
    proxy = load_settings(None, ["proxy.url=${T2S_PROXY_URL}"]).proxy
    assert proxy.password is not None
    assert (proxy.username, proxy.password.get_secret_value()) == ("u", "p@w")
    assert (proxy.host, proxy.port) == ("::1", 1080)


def test_unset_env_variable_names_it_and_hides_the_password(
    write: WriteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("T2S_UNSET_VAR", raising=False)
    path = write(f"# auth\nproxy:\n  url: 'socks5://alice:{PASSWORD}@${{T2S_UNSET_VAR}}:1080'\n")
    message = str(error_of(path))
    assert message == f"{path}:3: proxy.url: environment variable T2S_UNSET_VAR is not set"


# --- --set and the command line ----------------------------------------------------------------


def test_precedence_defaults_file_set_flags(write: WriteConfig) -> None:
    path = write(
        """
        tun: {name: from-file, mtu: 1400}
        proxy: {url: 'socks5://file:1'}
        log: {level: info, format: json}
        """
    )
    settings = load_settings(
        path,
        ["tun.name=from-set", "tun.mtu=9000", "proxy.url=socks5://set:2", "log.level=error"],
        {"tun.name": "from-flag", "proxy.url": "socks5://flag:3", "log.level": "debug"},
    )
    assert settings.tun.name == "from-flag"  # flag > --set > file
    assert settings.tun.mtu == 9000  # --set > file
    assert settings.proxy.host == "flag"
    assert settings.log.level == "debug"
    assert settings.log.format == "json"  # file > default
    assert settings.limits.max_flows == 10000  # default


def test_later_set_wins_and_none_flags_are_skipped(write: WriteConfig) -> None:
    path = write("proxy: {url: 'socks5://file:1'}\ntun: {name: keep}\n")
    settings = load_settings(path, ["tun.mtu=2000", "tun.mtu=3000"], {"tun.name": None})
    assert (settings.tun.mtu, settings.tun.name) == (3000, "keep")


def test_set_values_are_parsed_as_yaml() -> None:
    settings = load_settings(
        None,
        [
            "proxy.url=socks5://127.0.0.1:1080",
            "tun.addresses=[10.0.0.1/24, 'fd00::1/64']",
            "tun.offload=true",
            "timeouts.idle=1.5",
            "limits.max_flows=7",
        ],
    )
    assert settings.tun.addresses == [IPv4Interface("10.0.0.1/24"), IPv6Interface("fd00::1/64")]
    assert settings.tun.offload is True
    assert settings.timeouts.idle == 1.5
    assert settings.limits.max_flows == 7


def test_set_keeps_text_for_text_keys() -> None:
    settings = load_settings(None, ["proxy.url=socks5://h:1", "tun.name=1234"])
    assert settings.tun.name == "1234"


def test_set_a_whole_section() -> None:
    settings = load_settings(None, ["proxy={url: 'socks5://h:1', connect_timeout: 4}"])
    assert settings.proxy.connect_timeout == 4.0


def test_set_unknown_key() -> None:
    error = error_of(None, ["proxy.url=socks5://h:1", "tun.mtuu=1"])
    assert str(error) == "--set tun.mtuu=1: unknown key tun.mtuu (did you mean tun.mtu?)"
    assert error.key == "tun.mtuu"


def test_set_below_a_plain_value_is_unknown() -> None:
    message = str(error_of(None, ["tun.mtu.x=1"]))
    assert message == "--set tun.mtu.x=1: unknown key tun.mtu.x (tun.mtu has no sub-keys)"


def test_set_without_equals() -> None:
    assert (
        str(error_of(None, ["tun.mtu"])) == "--set tun.mtu: expected KEY=VALUE, like tun.mtu=9000"
    )


def test_set_bad_value_names_the_set() -> None:
    message = str(error_of(None, ["proxy.url=socks5://h:1", "tun.mtu=99999"]))
    assert message == "--set tun.mtu: must be between 68 and 65535 (got 99999)"


def test_set_invalid_yaml_value() -> None:
    message = str(error_of(None, ["proxy.url=socks5://h:1", "tun.addresses=[10.0.0.1/24"]))
    assert message.startswith("--set tun.addresses: the value is not valid YAML")


def test_set_replacing_a_file_list_reports_the_set_not_the_old_line(write: WriteConfig) -> None:
    path = write(
        "proxy: {url: 'socks5://h:1'}\ntun:\n  addresses:\n    - 10.0.0.1/24\n    - 10.0.0.2/24\n"
    )
    message = str(error_of(path, ["tun.addresses=[10.0.0.1/24, nonsense/8]"]))
    assert message.startswith("--set tun.addresses: tun.addresses.1: not an address")


def test_file_errors_come_before_set_errors(write: WriteConfig) -> None:
    path = write("proxy: {url: 'socks5://h:1'}\ntun: {offload: maybe}\n")
    message = str(error_of(path, ["tun.mtu=1"]))
    assert message.startswith(f"{path}:2: tun.offload: must be true or false")
    assert message.endswith("(and 1 more)")


def test_flag_errors_say_command_line() -> None:
    message = str(error_of(None, proxy__url="socks5://h:0"))
    assert message == "command line: proxy.url: port must be a number from 1 to 65535"


def test_unknown_flag_key_is_refused() -> None:
    assert "unknown key tun.nmae" in str(error_of(None, tun__nmae="x"))


# --- the password stays secret -----------------------------------------------------------------


def test_password_appears_in_no_message_repr_or_str(
    write: WriteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("T2S_PW", PASSWORD)
    url = f"socks5://alice:{PASSWORD}@127.0.0.1:1080"
    messages = [
        str(error_of(write(f"proxy: {{url: '{url}'}}\ntun: {{mtu: 1}}\n"))),
        str(error_of(write(f"proxy: {{url: '{url}', bogus: {PASSWORD}}}\n"))),
        str(error_of(write(f"proxy: '{url}'\n"))),  # a string where a mapping belongs
        str(error_of(write(f"proxy: {{url: '{url[:-5]}'}}\n"))),  # no port
        str(error_of(write(f"proxy: {{url: 'https://alice:{PASSWORD}@h:1'}}\n"))),
        str(error_of(write(f"proxy: {{url: 'socks5://alice:{PASSWORD}'}}\n"))),  # host forgotten
        str(
            error_of(write(f"proxy: {{url: 'socks5://alice:{PASSWORD}@h:1', connect_timeout: 0}}"))
        ),
        str(error_of(write(f"proxy: {{url: 'socks5://alice:{PASSWORD}@${{T2S_NOT_SET}}:1'}}\n"))),
        str(error_of(None, [f"proxy.url={url}", "tun.mtuu=1"])),
        str(error_of(None, [f"proxy.urll={url}"])),
        str(error_of(None, [f"proxy.url=socks5://alice:{PASSWORD}@h:99999"])),
        str(error_of(None, [f"proxy={{url: 'socks5://alice:{PASSWORD}'}}"])),
        str(error_of(None, proxy__url=f"socks5://alice:{PASSWORD}@h")),
    ]
    for message in messages:
        assert PASSWORD not in message, message
        assert "proxy" in message or "tun" in message

    for url_as_written in (url, "socks5://alice:${T2S_PW}@127.0.0.1:1080"):
        settings = load_settings(None, [f"proxy.url={url_as_written}"])
        assert settings.proxy.password is not None
        assert settings.proxy.password.get_secret_value() == PASSWORD
        for text in (repr(settings), str(settings), repr(settings.proxy), str(settings.proxy)):
            assert PASSWORD not in text
            assert "socks5://alice:***@127.0.0.1:1080" in text


def test_settings_can_be_built_in_python() -> None:
    settings = Settings(proxy=ProxyConfig(url="socks5://h:1"), tun=TunConfig(mtu=9000))
    assert (settings.tun.mtu, settings.proxy.port) == (9000, 1)
