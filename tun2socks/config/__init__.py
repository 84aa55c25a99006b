"""Settings: a YAML file turned into typed, validated settings whose errors name key and line.

Theory of operation
-------------------
``load_settings`` builds one plain dict from three layers, each winning over the one before:
the YAML file, then ``--set KEY=VALUE`` overrides, then explicit command-line flags. While it
builds the dict it records where each dotted key came from (``FILE:LINE``, ``--set KEY`` or
``command line``). pydantic then validates the dict against frozen models; every pydantic error
is rewritten as one friendly line located through that record, and the first one (by line) is
raised as a ``ConfigError``.

The proxy URL is kept as written (it may hold ``${VAR}``). Validation expands the variables
from the environment and parses the result into scheme, host, port and credentials, exposed as
properties of ``ProxyConfig``. The password is a ``SecretStr``; no error message, repr or str of
the settings shows it: error messages about the URL never quote any part of it.
"""

import difflib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_interface,
    ip_network,
)
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, Self
from urllib.parse import quote, unquote

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    SecretStr,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

try:
    from yaml import CSafeLoader as _YamlLoader
except ImportError:  # PyYAML built without libyaml
    from yaml import SafeLoader as _YamlLoader  # type: ignore[assignment]

__all__ = [
    "ApiConfig",
    "ConfigError",
    "DnsCacheConfig",
    "DnsConfig",
    "IcmpConfig",
    "LimitsConfig",
    "LogConfig",
    "PcapConfig",
    "ProxyConfig",
    "RouteConfig",
    "RuleConfig",
    "Settings",
    "TimeoutsConfig",
    "TunConfig",
    "UdpConfig",
    "load_settings",
]

IFNAMSIZ = 16  # linux/if.h: interface names hold at most 15 bytes plus the NUL
MAX_AUTH_FIELD = 255  # RFC 1929: UNAME and PASSWD are 1..255 bytes
URL_SHAPE = "socks5://[user[:password]@]host:port"


class ConfigError(Exception):
    """A configuration problem in one line: ``FILE:LINE: key.path: what is wrong``."""

    def __init__(self, message: str, *, key: str | None = None, line: int | None = None) -> None:
        # One line whatever the user typed: a --set value may hold a newline.
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))
        self.key = key
        self.line = line


# --- the models --------------------------------------------------------------------------------

_MODEL_CONFIG = ConfigDict(extra="forbid", frozen=True)


def _to_interface(value: object) -> IPv4Interface | IPv6Interface:
    if isinstance(value, IPv4Interface | IPv6Interface):
        return value
    if not isinstance(value, str) or "/" not in value:
        raise ValueError(
            f"must be an address with a prefix length, like 198.18.0.1/15{_got(value)}"
        )
    try:
        return ip_interface(value)
    except ValueError:
        raise ValueError(f"not an address with a prefix length{_got(value)}") from None


_DEFAULT_ADDRESS: IPv4Interface | IPv6Interface = IPv4Interface("198.18.0.1/15")

Interface = Annotated[IPv4Interface | IPv6Interface, PlainValidator(_to_interface)]
_FD_NAME = re.compile(r"fd://[0-9]{1,9}")


class TunConfig(BaseModel):
    model_config = _MODEL_CONFIG

    name: str = Field(default="tun0", strict=True)
    addresses: list[Interface] = Field(default_factory=lambda: [_DEFAULT_ADDRESS])
    mtu: int = Field(default=1500, ge=68, le=65535, strict=True)
    offload: bool = Field(default=True, strict=True)

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if _FD_NAME.fullmatch(name):  # a TUN descriptor handed over by a parent process
            return name
        # The kernel's dev_valid_name() rules.
        if not name or len(name.encode()) >= IFNAMSIZ:
            raise ValueError(f"must be 1 to {IFNAMSIZ - 1} bytes long{_got(name)}")
        if name in (".", "..") or any(c in "/:" or c.isspace() for c in name):
            raise ValueError(f"must not contain '/', ':' or spaces{_got(name)}")
        return name

    @property
    def fd(self) -> int | None:
        """The descriptor number of a ``fd://N`` name; None for a device name."""
        return int(self.name[5:]) if _FD_NAME.fullmatch(self.name) else None


@dataclass(frozen=True)
class _ProxyEndpoint:
    scheme: str
    host: str
    port: int
    username: str | None
    password: SecretStr | None = field(repr=False)


MAX_FAILOVER_PROXIES = 16


class ProxyConfig(BaseModel):
    model_config = _MODEL_CONFIG

    # As written, may hold ${VAR}; never log it. A list: failover, the first that works
    # (tun2socks.outbound.failover).
    url: StrictStr | list[StrictStr]
    connect_timeout: float = Field(default=10.0, gt=0, strict=True, allow_inf_nan=False)
    pipeline: bool = Field(default=False, strict=True)  # greeting, auth, request in one write

    _endpoint: _ProxyEndpoint = PrivateAttr()

    @field_validator("url", mode="before")
    @classmethod
    def _url_shape(cls, url: object) -> object:
        if isinstance(url, str) or (isinstance(url, list) and all(isinstance(u, str) for u in url)):
            return url
        raise ValueError(f"must be a proxy URL or a list of them{_got(url)}")

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str | list[str]) -> str | list[str]:
        # Parsed here so that errors carry the location of proxy.url, and again below to keep
        # the result: a field validator cannot store it on the instance.
        if isinstance(url, list):
            if not 1 <= len(url) <= MAX_FAILOVER_PROXIES:
                raise ValueError(f"must list 1 to {MAX_FAILOVER_PROXIES} proxy URLs")
            for number, item in enumerate(url):
                try:
                    _parse_proxy_url(item, os.environ)
                except ValueError as exc:
                    raise ValueError(f"entry {number}: {exc}") from None
        else:
            _parse_proxy_url(url, os.environ)
        return url

    @model_validator(mode="after")
    def _keep_endpoint(self) -> Self:
        self._endpoint = _parse_proxy_url(self.urls[0], os.environ)
        return self

    @property
    def urls(self) -> list[str]:
        """The URLs as written, in failover order."""
        return list(self.url) if isinstance(self.url, list) else [self.url]

    def entries(self) -> list["ProxyConfig"]:
        """One ProxyConfig per URL, in failover order (just this one for a single URL)."""
        if isinstance(self.url, str):
            return [self]
        return [
            ProxyConfig(url=url, connect_timeout=self.connect_timeout, pipeline=self.pipeline)
            for url in self.url
        ]

    @property
    def scheme(self) -> str:
        return self._endpoint.scheme

    @property
    def host(self) -> str:
        """Host name or IP address, without brackets."""
        return self._endpoint.host

    @property
    def port(self) -> int:
        return self._endpoint.port

    @property
    def username(self) -> str | None:
        return self._endpoint.username

    @property
    def password(self) -> SecretStr | None:
        return self._endpoint.password

    @property
    def redacted_url(self) -> str:
        """The URL after ``${VAR}`` expansion with the password shown as ``***``."""
        auth = ""
        if self.username is not None:
            secret = ":***" if self.password is not None else ""
            auth = f"{quote(self.username, safe='')}{secret}@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{auth}{host}:{self.port}"

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        # repr() and str() show the redacted URL: the written one may hold the password.
        for name, value in super().__repr_args__():
            yield name, (self.redacted_url if name == "url" else value)


class LogConfig(BaseModel):
    model_config = _MODEL_CONFIG

    level: Literal["debug", "info", "warning", "error"] = "warning"
    format: Literal["text", "json"] = "text"

    @field_validator("level", "format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


class LimitsConfig(BaseModel):
    model_config = _MODEL_CONFIG

    max_flows: int = Field(default=10000, ge=1, strict=True)
    max_half_open: int = Field(default=1000, ge=1, strict=True)
    flow_buffer: int = Field(default=262144, ge=4096, le=16 * 1024 * 1024, strict=True)
    reassembly_memory: int = Field(default=4 * 1024 * 1024, ge=65536, strict=True)
    reassembly_timeout: float = Field(default=30.0, gt=0, le=120, strict=True, allow_inf_nan=False)


class TimeoutsConfig(BaseModel):
    model_config = _MODEL_CONFIG

    idle: float = Field(default=600.0, gt=0, strict=True, allow_inf_nan=False)
    time_wait: float = Field(default=2.0, gt=0, strict=True, allow_inf_nan=False)


class UdpConfig(BaseModel):
    model_config = _MODEL_CONFIG

    enabled: bool = Field(default=True, strict=True)
    idle_timeout: float = Field(default=120.0, gt=0, strict=True, allow_inf_nan=False)
    max_sessions: int = Field(default=1024, ge=1, strict=True)
    when_unsupported: Literal["unreachable", "drop"] = "unreachable"


class IcmpConfig(BaseModel):
    model_config = _MODEL_CONFIG

    echo: Literal["reply", "drop"] = "reply"


class PcapConfig(BaseModel):
    model_config = _MODEL_CONFIG

    file: str | None = Field(default=None, strict=True)  # set: capture from the start
    max_bytes: int = Field(default=100 * 1024 * 1024, ge=4096, strict=True)


class ApiConfig(BaseModel):
    model_config = _MODEL_CONFIG

    enabled: bool = Field(default=True, strict=True)
    listen: str = Field(default="127.0.0.1:9090", strict=True)
    # validate_default: the check that a token is present must also run when it is left out.
    token: SecretStr | None = Field(default=None, validate_default=True)
    pcap: PcapConfig = Field(default_factory=PcapConfig)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, listen: str) -> str:
        api_listen_address(listen)
        return listen

    @field_validator("token", mode="before")
    @classmethod
    def _check_token(cls, token: object, info: ValidationInfo) -> object:
        # Messages never quote the token. ${VAR} is read from the environment.
        if isinstance(token, SecretStr):
            token = token.get_secret_value()
        if isinstance(token, str):
            token = _expand(token, os.environ, verbatim=False)
            if not token:
                raise ValueError("must not be empty (leave it out for no token)")
        elif token is not None:
            raise ValueError("must be text")
        listen = info.data.get("listen")
        if token is None and isinstance(listen, str) and not _is_loopback(listen):
            raise ValueError(f"required when api.listen ({listen}) is not a loopback address")
        return token


def api_listen_address(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` as (host, port); raises ValueError."""
    try:
        host, port = _parse_host_port(listen)
    except ValueError as exc:
        shape = "must be HOST:PORT, like 127.0.0.1:9090 or [::1]:9090"
        raise ValueError(f"{shape}{_got(listen)}") from exc
    return host, port


def _is_loopback(listen: str) -> bool:
    host = api_listen_address(listen)[0]
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


_RESERVED_TABLES = (253, 254, 255)  # linux/rtnetlink.h: default, main, local


def _to_network(value: object) -> IPv4Network | IPv6Network:
    if isinstance(value, IPv4Network | IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be an address or a prefix, like 10.0.0.0/8{_got(value)}")
    try:
        return ip_network(value)  # a bare address is its /32 or /128
    except ValueError:
        pass
    try:
        ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"not an address or a prefix{_got(value)}") from None
    raise ValueError(f"has host bits set: write the network address{_got(value)}")


Network = Annotated[IPv4Network | IPv6Network, PlainValidator(_to_network)]


def _as_list(value: object) -> object:
    """Lets a rule or route key take one item where a list is expected."""
    return [value] if isinstance(value, str | int) and not isinstance(value, bool) else value


class RouteConfig(BaseModel):
    model_config = _MODEL_CONFIG

    auto: bool = Field(default=False, strict=True)
    exclude: list[Network] = Field(default_factory=list)
    mark: int = Field(default=0, ge=0, le=0xFFFFFFFF, strict=True)  # 0: off
    bind_interface: str | None = Field(default=None, strict=True)
    table: int = Field(default=7280, ge=1, le=0xFFFFFFFF, strict=True)
    system_dns: bool = Field(default=False, strict=True)
    state_dir: str = Field(default="/run/tun2socks", min_length=1, strict=True)
    strict: bool = Field(default=False, strict=True)  # the kill switch: tun2socks.host.strict

    @model_validator(mode="after")
    def _strict_needs_auto(self) -> Self:
        if self.strict and not self.auto:
            raise ValueError("strict: true needs auto: true (it guards the routes auto makes)")
        return self

    @field_validator("exclude", mode="before")
    @classmethod
    def _one_or_more(cls, value: object) -> object:
        return _as_list(value)

    @field_validator("table")
    @classmethod
    def _check_table(cls, table: int) -> int:
        if table in _RESERVED_TABLES:
            raise ValueError(f"must not be one of the kernel's tables 253, 254, 255{_got(table)}")
        return table

    @field_validator("bind_interface")
    @classmethod
    def _check_interface(cls, name: str | None) -> str | None:
        if name is not None and (
            not name or len(name.encode()) >= IFNAMSIZ or any(c in "/: \t" for c in name)
        ):
            raise ValueError(f"must be an interface name (1 to {IFNAMSIZ - 1} bytes){_got(name)}")
        return name


_DOMAIN_PATTERN = re.compile(r"[A-Za-z0-9_*?-]+(\.[A-Za-z0-9_*?-]+)*\.?")
_PORT_RANGE = re.compile(r"([0-9]{1,5})\s*-\s*([0-9]{1,5})")


def _to_port_range(value: object) -> tuple[int, int]:
    low = high = -1
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str) and (match := _PORT_RANGE.fullmatch(value.strip())):
        low, high = int(match.group(1)), int(match.group(2))
    elif isinstance(value, str) and value.strip().isdigit():
        low = high = int(value)
    else:
        raise ValueError(f"must be a port or a range like 8000-8100{_got(value)}")
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"must be ports 1..65535, the first not above the last{_got(value)}")
    return low, high


PortRange = Annotated[tuple[int, int], PlainValidator(_to_port_range)]


class RuleConfig(BaseModel):
    model_config = _MODEL_CONFIG

    dst: list[Network] = Field(default_factory=list)
    port: list[PortRange] = Field(default_factory=list)
    protocol: Literal["tcp", "udp"] | None = None
    domain: list[str] = Field(default_factory=list)
    action: Literal["proxy", "direct", "block"]
    proxy: str | None = Field(default=None, strict=True)

    @field_validator("dst", "port", "domain", mode="before")
    @classmethod
    def _one_or_more(cls, value: object) -> object:
        return _as_list(value)

    @field_validator("domain")
    @classmethod
    def _check_domains(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if not _DOMAIN_PATTERN.fullmatch(pattern) or len(pattern) > 253:
                raise ValueError(
                    f"must be a name with optional wildcards, like *.example.com{_got(pattern)}"
                )
        return patterns

    @model_validator(mode="after")
    def _proxy_only_with_proxy_action(self) -> Self:
        if self.proxy is not None and self.action != "proxy":
            raise ValueError(f"'proxy: {self.proxy}' needs 'action: proxy'")
        return self


class DnsCacheConfig(BaseModel):
    model_config = _MODEL_CONFIG

    size: int = Field(default=4096, ge=0, le=1_000_000, strict=True)  # 0: no cache
    min_ttl: int = Field(default=0, ge=0, le=604800, strict=True)
    max_ttl: int = Field(default=86400, ge=0, le=604800, strict=True)
    negative_ttl: int = Field(default=300, ge=0, le=86400, strict=True)

    @model_validator(mode="after")
    def _ttl_order(self) -> Self:
        if self.min_ttl > self.max_ttl:
            raise ValueError(f"min_ttl ({self.min_ttl}) must not exceed max_ttl ({self.max_ttl})")
        return self


_DEFAULT_FAKE_RANGE: tuple[IPv4Network | IPv6Network, ...] = (
    # Inside the TUN's default prefix (198.18.0.0/15), away from its own address.
    IPv4Network("198.18.128.0/18"),
    IPv6Network("fd00:7f:f::/112"),
)
_DNS_NAME = re.compile(r"(\*\.|\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")


def _check_dns_name(name: str, *, suffix: bool) -> str:
    if not _DNS_NAME.fullmatch(name) or len(name) > 253 or (not suffix and name[0] in "*."):
        shape = "a domain like example.com" if suffix else "a host name like printer.lan"
        raise ValueError(f"must be {shape}{_got(name)}")
    return name


class DnsConfig(BaseModel):
    model_config = _MODEL_CONFIG

    enabled: bool = Field(default=True, strict=True)
    mode: Literal["forward", "fake-ip"] = "forward"
    upstreams: list[str] = Field(default_factory=list)
    fake_range: list[Network] = Field(default_factory=lambda: list(_DEFAULT_FAKE_RANGE))
    fake_ttl: int = Field(default=10, ge=1, le=3600, strict=True)
    fake_persist: bool | None = Field(default=None, strict=True)  # None: with route.auto
    real_domains: list[str] = Field(default_factory=list)
    hosts: dict[str, list[IPv4Address | IPv6Address]] = Field(default_factory=dict)
    cache: DnsCacheConfig = Field(default_factory=DnsCacheConfig)
    timeout: float = Field(default=5.0, gt=0, le=60, strict=True, allow_inf_nan=False)
    upstream_timeout: float = Field(default=2.0, gt=0, le=60, strict=True, allow_inf_nan=False)
    max_pending: int = Field(default=1024, ge=1, le=65535, strict=True)
    ca_file: str | None = Field(default=None, min_length=1, strict=True)

    @field_validator("upstreams", "real_domains", "fake_range", mode="before")
    @classmethod
    def _one_or_more(cls, value: object) -> object:
        return _as_list(value)

    @field_validator("upstreams")
    @classmethod
    def _check_upstreams(cls, urls: list[str]) -> list[str]:
        from tun2socks_dns.urls import parse_upstream  # the dns package owns the URL forms

        for url in urls:
            parse_upstream(url)
        return urls

    @field_validator("fake_range")
    @classmethod
    def _check_fake_range(
        cls, networks: list[IPv4Network | IPv6Network]
    ) -> list[IPv4Network | IPv6Network]:
        versions = [network.version for network in networks]
        if len(set(versions)) != len(versions):
            raise ValueError("takes at most one IPv4 and one IPv6 prefix")
        for network in networks:
            if network.num_addresses < 4:
                raise ValueError(f"{network} is too small: use a /30 (IPv4), /126 (IPv6) or wider")
        return networks

    @field_validator("real_domains")
    @classmethod
    def _check_domains(cls, names: list[str]) -> list[str]:
        return [_check_dns_name(name, suffix=True) for name in names]

    @field_validator("hosts", mode="before")
    @classmethod
    def _check_hosts(cls, hosts: object) -> object:
        if isinstance(hosts, dict):
            for name in hosts:
                _check_dns_name(str(name), suffix=False)
            return {name: _as_list(addresses) for name, addresses in hosts.items()}
        return hosts


class Settings(BaseModel):
    model_config = _MODEL_CONFIG

    tun: TunConfig = Field(default_factory=TunConfig)
    proxy: ProxyConfig
    proxies: dict[str, ProxyConfig] = Field(default_factory=dict)  # more, named for rules
    log: LogConfig = Field(default_factory=LogConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    udp: UdpConfig = Field(default_factory=UdpConfig)
    icmp: IcmpConfig = Field(default_factory=IcmpConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    route: RouteConfig = Field(default_factory=RouteConfig)
    rules: list[RuleConfig] = Field(default_factory=list)
    dns: DnsConfig = Field(default_factory=DnsConfig)

    @field_validator("rules")
    @classmethod
    def _check_rules(cls, rules: list[RuleConfig], info: ValidationInfo) -> list[RuleConfig]:
        # Checked against the sections validated before this one (field order matters).
        proxies = info.data.get("proxies", {})
        route = info.data.get("route")
        for number, rule in enumerate(rules):
            if rule.proxy is not None and rule.proxy not in proxies:
                known = ", ".join(sorted(proxies)) or "none"
                raise ValueError(f"rule {number}: no proxy named {rule.proxy!r} (proxies: {known})")
            looping = route is not None and route.auto and not (route.mark or route.bind_interface)
            if rule.action == "direct" and looping:
                raise ValueError(
                    f"rule {number}: action direct with route.auto needs route.mark or "
                    "route.bind_interface, or its socket would loop back into the TUN"
                )
        return rules


# --- the proxy URL ---------------------------------------------------------------------------
# Messages raised here never quote the URL: any part of it might be the password.

_VAR_REF = re.compile(r"\$\{([^}]*)\}")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_PORT = re.compile(r"[0-9]{1,5}")


def _expand(text: str, environ: Mapping[str, str], *, verbatim: bool) -> str:
    """Replace each ``${NAME}``; with ``verbatim`` the value is percent-encoded so that the
    percent-decoding which follows gives it back unchanged."""
    if "${" in _VAR_REF.sub("", text):
        raise ValueError("has a '${' without its closing '}'")

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if not _VAR_NAME.fullmatch(name):
            raise ValueError("has a ${...} that is not ${NAME} (letters, digits, '_')")
        value = environ.get(name)
        if value is None:
            raise ValueError(f"environment variable {name} is not set")
        return quote(value, safe="") if verbatim else value

    return _VAR_REF.sub(substitute, text)


def _credential(text: str, what: str) -> str:
    try:
        value = unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not percent-encoded UTF-8") from None
    if not value and what == "user name":
        raise ValueError("user name is empty")
    if len(value.encode()) > MAX_AUTH_FIELD:
        raise ValueError(f"{what} is longer than {MAX_AUTH_FIELD} bytes (RFC 1929)")
    return value


def _valid_host_name(host: str) -> bool:
    name = host.removesuffix(".")
    return 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(p) for p in name.split("."))


def _parse_host_port(host_port: str) -> tuple[str, int]:
    if host_port.startswith("["):
        host, bracket, rest = host_port[1:].partition("]")
        if not bracket:
            raise ValueError("has a '[' without its closing ']'")
        try:
            IPv6Address(host)
        except ValueError:
            raise ValueError("has something in [...] that is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise ValueError(f"has no port: {URL_SHAPE}")
        port_text = rest[1:]
    else:
        host, colon, port_text = host_port.rpartition(":")
        if not colon:
            raise ValueError(f"has no port: {URL_SHAPE}")
        if ":" in host:
            raise ValueError("has an IPv6 address outside brackets: write [::1]:1080")
        if not host:
            raise ValueError(f"has no host: {URL_SHAPE}")
        try:
            ip_address(host)
        except ValueError:
            if not _valid_host_name(host):
                raise ValueError(
                    "has a host that is neither an IP address nor a DNS name"
                ) from None
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError("port must be a number from 1 to 65535")
    return host, int(port_text)


def _parse_proxy_url(url: str, environ: Mapping[str, str]) -> _ProxyEndpoint:
    """Expand ``${VAR}`` and parse ``socks5://[user[:password]@]host:port``.

    A variable inside the user name or password is taken verbatim (no percent-decoding), so a
    password holding '@' or ':' can come from the environment as it is. A URL written with no
    '://' (a whole ``${PROXY_URL}``) is expanded first and must then be a percent-encoded URL.
    """

    def expand(text: str, *, verbatim: bool = False) -> str:
        return _expand(text, environ, verbatim=verbatim)

    def as_is(text: str, *, verbatim: bool = False) -> str:
        return text

    if "://" in url:
        return _split_url(url, expand)
    expanded = expand(url)
    if "://" not in expanded:
        raise ValueError(f"must look like {URL_SHAPE}")
    return _split_url(expanded, as_is)


class _Expander(Protocol):
    def __call__(self, text: str, *, verbatim: bool = False) -> str: ...


def _split_url(url: str, expand: _Expander) -> _ProxyEndpoint:
    # Split on the text as written: a variable's value cannot move the delimiters.
    scheme_raw, _, rest = url.partition("://")
    if expand(scheme_raw).lower() not in ("socks5", "socks5h"):
        raise ValueError("scheme must be socks5:// or socks5h://")
    # rpartition: a password with an unencoded '@' still splits at the host.
    user_info, at, host_port_raw = rest.removesuffix("/").rpartition("@")
    username = password = None
    if at:
        user_raw, colon, password_raw = user_info.partition(":")
        username = _credential(expand(user_raw, verbatim=True), "user name")
        if colon:
            password = SecretStr(_credential(expand(password_raw, verbatim=True), "password"))
    host_port = expand(host_port_raw)
    if any(c in host_port for c in "/?#%@"):
        raise ValueError(f"must not have a path, query or fragment: {URL_SHAPE}")
    host, port = _parse_host_port(host_port)
    return _ProxyEndpoint("socks5", host, port, username, password)


# --- loading -----------------------------------------------------------------------------------

KeyPath = tuple[str, ...]


@dataclass(frozen=True)
class _Origin:
    """Where a key's value came from, and how errors there sort (file lines first)."""

    label: str  # "FILE:LINE", "--set KEY" or "command line"
    rank: int
    order: int
    line: int | None = None


@dataclass
class _Layers:
    data: dict[str, Any] = field(default_factory=dict)
    origins: dict[KeyPath, _Origin] = field(default_factory=dict)

    def put(self, path: KeyPath, value: object, origin: _Origin) -> None:
        node = self.data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = value
        # Locations of what the new value replaced would point at the wrong place.
        self.origins = {p: o for p, o in self.origins.items() if p[: len(path)] != path}
        self.origins[path] = origin

    def locate(self, path: KeyPath) -> _Origin | None:
        for end in range(len(path), -1, -1):
            origin = self.origins.get(path[:end])
            if origin is not None:
                return origin
        return None


def load_settings(
    path: str | None,
    overrides: Sequence[str] = (),
    cli: Mapping[str, object] | None = None,
) -> Settings:
    """Load settings: defaults < the YAML file at ``path`` < ``overrides`` < ``cli``.

    ``overrides`` are ``KEY=VALUE`` strings with a dotted key; the value is parsed as YAML
    (``tun.addresses=[10.0.0.1/24]``), except that a text setting keeps the text as typed when
    YAML would make it something else. ``cli`` maps dotted keys to values of explicit flags;
    ``None`` values are skipped. Raises ConfigError, whose str() is one line.
    """
    layers = _read_file(path) if path is not None else _Layers()
    for index, item in enumerate(overrides):
        _apply_override(layers, item, index)
    for index, (key, value) in enumerate((cli or {}).items()):
        if value is not None:
            layers.put(_known_key(key, "command line"), value, _Origin("command line", 2, index))
    try:
        return Settings.model_validate(layers.data)
    except ValidationError as exc:
        raise _config_error(exc, layers) from None


def _read_file(path: str) -> _Layers:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a file") from None
    except PermissionError:
        raise ConfigError(f"{path}: cannot read it: permission denied") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None

    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        layers = _Layers()
        if node is not None:
            # Walk before constructing: construction flattens merge keys ('<<') in place.
            _record_lines(node, (), path, layers.origins)
            layers.data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        if mark is None:
            raise ConfigError(f"{path}: invalid YAML: {problem}") from None
        line = mark.line + 1
        raise ConfigError(
            f"{path}:{line}:{mark.column + 1}: invalid YAML: {problem}", line=line
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    finally:
        loader.dispose()

    if layers.data is None:  # an empty file
        layers.data = {}
    if not isinstance(layers.data, dict):
        line = node.start_mark.line + 1 if node is not None else 1
        raise ConfigError(
            f"{path}:{line}: the top level must be a mapping of sections "
            f"({', '.join(Settings.model_fields)}), not {_kind(layers.data)}",
            line=line,
        )
    return layers


def _record_lines(
    node: yaml.Node,
    path: KeyPath,
    file: str,
    origins: dict[KeyPath, _Origin],
    seen: set[int] | None = None,
) -> None:
    """Map each key path under ``node`` to the line of its key; reject duplicate keys."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias met again (possibly a cycle)
        return
    seen.add(id(node))
    if not path:
        line = node.start_mark.line + 1
        origins[()] = _Origin(f"{file}:{line}", 0, line, line)
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            line = key_node.start_mark.line + 1
            if key == "<<":
                continue
            if key in first_line:
                dotted = ".".join((*path, key))
                raise ConfigError(
                    f"{file}:{line}: {dotted}: duplicate key (first at line {first_line[key]})",
                    key=dotted,
                    line=line,
                )
            first_line[key] = line
            origins[(*path, key)] = _Origin(f"{file}:{line}", 0, line, line)
            _record_lines(value_node, (*path, key), file, origins, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            line = item.start_mark.line + 1
            origins[(*path, str(index))] = _Origin(f"{file}:{line}", 0, line, line)
            _record_lines(item, (*path, str(index)), file, origins, seen)


def _apply_override(layers: _Layers, item: str, index: int) -> None:
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"--set {_shown(item)}: expected KEY=VALUE, like tun.mtu=9000")
    path = _known_key(key, f"--set {_shown(item)}")
    is_text = _field_annotation(path) is str
    try:
        value = yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as exc:
        if not is_text:
            problem = getattr(exc, "problem", None) or "syntax error"
            raise ConfigError(
                f"--set {key}: the value is not valid YAML: {problem}", key=key
            ) from None
        value = text
    if is_text and not isinstance(value, str):
        value = text
    layers.put(path, value, _Origin(f"--set {key}", 1, index))


def _shown(item: str) -> str:
    """A --set argument fit for an error message: values that may hold credentials are hidden."""
    key, eq, _ = item.partition("=")
    if "@" in item or key.strip().startswith("proxy"):
        return f"{key}{eq}***" if eq else "***"
    return item


def _known_key(key: str, where: str) -> KeyPath:
    path = tuple(key.split("."))
    model: type[BaseModel] = Settings
    for depth, part in enumerate(path):
        fields = model.model_fields
        if part not in fields:
            prefix = ".".join(path[:depth])
            hint = _suggest(part, fields, prefix)
            raise ConfigError(f"{where}: unknown key {key}{hint}", key=key)
        annotation = fields[part].annotation
        if depth < len(path) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise ConfigError(
                    f"{where}: unknown key {key} ({'.'.join(path[: depth + 1])} has no sub-keys)",
                    key=key,
                )
            model = annotation
    return path


def _suggest(word: str, choices: Iterable[str], prefix: str) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    if not close:
        return ""
    return f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)"


def _model_at(path: KeyPath) -> type[BaseModel] | None:
    """The model holding the key at ``path``, if there is one."""
    model: type[BaseModel] = Settings
    for part in path[:-1]:
        info = model.model_fields.get(part)
        annotation = info.annotation if info is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _field_annotation(path: KeyPath) -> object:
    model = _model_at(path)
    info = model.model_fields.get(path[-1]) if model is not None and path else None
    return info.annotation if info is not None else None


# --- errors ------------------------------------------------------------------------------------


def _config_error(exc: ValidationError, layers: _Layers) -> ConfigError:
    found: list[tuple[tuple[int, int], str, str, int | None]] = []
    for error in exc.errors(include_url=False):
        path = tuple(str(part) for part in error["loc"])
        origin = layers.locate(path)
        key, message = _describe(error, path)
        if origin is None:
            text, sort_key = f"{key}: {message}", (3, 0)
        elif origin.label == f"--set {key}":  # do not name the key twice
            text, sort_key = f"{origin.label}: {message}", (origin.rank, origin.order)
        else:
            text, sort_key = f"{origin.label}: {key}: {message}", (origin.rank, origin.order)
        found.append((sort_key, text, key, origin.line if origin else None))
    found.sort(key=lambda item: item[0])
    _, text, key, line = found[0]
    if len(found) > 1:
        text += f" (and {len(found) - 1} more)"
    return ConfigError(text, key=key, line=line)


def _describe(error: Mapping[str, Any], path: KeyPath) -> tuple[str, str]:
    """The dotted key and a friendly message for one pydantic error."""
    kind = error["type"]
    key = ".".join(path)
    secret = path[:1] in (("proxy",), ("proxies",)) or path == ("api", "token")
    got = "" if secret else _got(error.get("input"))
    ctx = error.get("ctx") or {}
    if kind == "missing":
        if path in (("proxy",), ("proxy", "url")):
            return "proxy.url", "missing: a proxy URL is required, like socks5://127.0.0.1:1080"
        return key, "missing: this key is required"
    if kind == "extra_forbidden":
        model = _model_at(path)
        hint = _suggest(path[-1], model.model_fields, ".".join(path[:-1])) if model else ""
        return key, f"unknown key{hint}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return key, f"{_range(path)}{got}"
    if kind == "value_error":
        return key, str(ctx.get("error", error["msg"]))
    if kind == "literal_error":
        return key, f"must be {ctx.get('expected', 'one of the allowed values')}{got}"
    simple = {
        "int_type": "must be a whole number",
        "int_from_float": "must be a whole number",
        "float_type": "must be a number",
        "finite_number": "must be a finite number",
        "bool_type": "must be true or false",
        "string_type": "must be text",
        "list_type": "must be a list",
        "model_type": "must be a mapping of keys",
        "dict_type": "must be a mapping of keys",
    }
    return key, f"{simple.get(kind, error['msg'])}{got}"


def _range(path: KeyPath) -> str:
    """The full allowed range of a numeric key, from its Field constraints."""
    model = _model_at(path)
    info = model.model_fields.get(path[-1]) if model is not None else None
    bounds: dict[str, object] = {}
    for item in info.metadata if info is not None else ():
        for name in ("ge", "gt", "le", "lt"):
            if getattr(item, name, None) is not None:
                bounds[name] = getattr(item, name)
    if "ge" in bounds and "le" in bounds:
        return f"must be between {bounds['ge']} and {bounds['le']}"
    words = {"ge": "at least", "gt": "greater than", "le": "at most", "lt": "less than"}
    parts = [f"{words[name]} {bound}" for name, bound in bounds.items()]
    return "must be " + " and ".join(parts) if parts else "is out of range"


def _got(value: object) -> str:
    """`` (got X)`` for a scalar worth echoing; empty for anything else."""
    if value is None:
        return " (got an empty value)"
    if isinstance(value, bool):
        return f" (got {str(value).lower()})"
    if isinstance(value, int | float):
        return f" (got {value})"
    if isinstance(value, str):
        value = hide_url_password(value)  # a proxy URL put under the wrong key, say
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f" (got {shown!r})"
    return f" (got {_kind(value)})"


_USERINFO_PASSWORD = re.compile(r"(://[^/@:]*:).*@")


def hide_url_password(text: str) -> str:
    """``text`` with the password of any ``scheme://user:password@`` in it shown as ``***``:
    for error messages that echo a value."""
    return _USERINFO_PASSWORD.sub(r"\1***@", text)


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        return "text"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    return "nothing" if value is None else type(value).__name__
