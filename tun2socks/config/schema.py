"""The settings models: frozen pydantic models, one per section of the YAML file.

Validators raise ValueError with a message in words (``must be ... (got X)``); the loader
(loader.py) turns them into one ``FILE:LINE: key: message`` line.
"""

import os
import re
from collections.abc import Iterable
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
from typing import Annotated, Any, Literal, Self
from urllib.parse import quote

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    SecretStr,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tun2socks.config.echo import echo
from tun2socks.config.proxy_options import EarlyAcceptTtl, PipelineSetting, ProxyPoolConfig
from tun2socks.config.proxy_url import (
    ParsedProxyUrl,
    expand_variables,
    parse_host_port,
    parse_proxy_url,
)
from tun2socks.config.uid_ranges import to_uid_range

IFNAMSIZ = 16  # linux/if.h: interface names hold at most 15 bytes plus the NUL

_MODEL_CONFIG = ConfigDict(extra="forbid", frozen=True)


def _to_interface(value: object) -> IPv4Interface | IPv6Interface:
    if isinstance(value, IPv4Interface | IPv6Interface):
        return value
    if not isinstance(value, str) or "/" not in value:
        raise ValueError(
            f"must be an address with a prefix length, like 198.18.0.1/15{echo(value)}"
        )
    try:
        return ip_interface(value)
    except ValueError:
        raise ValueError(f"not an address with a prefix length{echo(value)}") from None


_DEFAULT_ADDRESS: IPv4Interface | IPv6Interface = IPv4Interface("198.18.0.1/15")

Interface = Annotated[IPv4Interface | IPv6Interface, PlainValidator(_to_interface)]
_FD_NAME = re.compile(r"fd://[0-9]{1,9}")


class TunConfig(BaseModel):
    model_config = _MODEL_CONFIG

    name: str = Field(default="tun0", strict=True)
    addresses: list[Interface] = Field(default_factory=lambda: [_DEFAULT_ADDRESS])
    mtu: int = Field(default=1500, ge=68, le=65535, strict=True)
    offload: bool = Field(default=True, strict=True)
    txqueuelen: int | None = Field(default=None, ge=1, le=1_000_000, strict=True)
    write_thread: bool = Field(default=False, strict=True)  # large TUN writes on a thread

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if _FD_NAME.fullmatch(name):  # a TUN descriptor handed over by a parent process
            return name
        # The kernel's dev_valid_name() rules.
        if not name or len(name.encode()) >= IFNAMSIZ:
            raise ValueError(f"must be 1 to {IFNAMSIZ - 1} bytes long{echo(name)}")
        if name in (".", "..") or any(c in "/:" or c.isspace() for c in name):
            raise ValueError(f"must not contain '/', ':' or spaces{echo(name)}")
        return name

    @property
    def fd(self) -> int | None:
        """The descriptor number of a ``fd://N`` name; None for a device name."""
        return int(self.name[5:]) if _FD_NAME.fullmatch(self.name) else None


MAX_FAILOVER_PROXIES = 16


class ProxyConfig(BaseModel):
    model_config = _MODEL_CONFIG

    # As written, may hold ${VAR}; never log it. A list: failover, the first that works
    # (tun2socks.outbound.failover).
    url: StrictStr | list[StrictStr]
    connect_timeout: float = Field(default=10.0, gt=0, strict=True, allow_inf_nan=False)
    # Greeting, auth and request in one write: true, false, or auto (probed on first use).
    pipeline: PipelineSetting = "auto"
    fast_open: bool = Field(default=False, strict=True)  # TCP Fast Open to the proxy
    pool: ProxyPoolConfig = Field(default_factory=ProxyPoolConfig)
    early_accept: bool = Field(default=False, strict=True)  # SYN-ACK at once to known ones
    early_accept_ttl: EarlyAcceptTtl = 60.0

    _endpoint: ParsedProxyUrl = PrivateAttr()

    @field_validator("url", mode="before")
    @classmethod
    def _url_shape(cls, url: object) -> object:
        if isinstance(url, str) or (isinstance(url, list) and all(isinstance(u, str) for u in url)):
            return url
        raise ValueError(f"must be a proxy URL or a list of them{echo(url)}")

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
                    parsed = parse_proxy_url(item, os.environ)
                except ValueError as exc:
                    raise ValueError(f"entry {number}: {exc}") from None
                if parsed.scheme == "direct" and len(url) > 1:  # it has nothing to fail over
                    raise ValueError(f"entry {number}: direct:// stands alone, not in a list")
        else:
            parse_proxy_url(url, os.environ)
        return url

    @model_validator(mode="after")
    def _keep_endpoint(self) -> Self:
        self._endpoint = parse_proxy_url(self.urls[0], os.environ)
        return self

    @property
    def urls(self) -> list[str]:
        """The URLs as written, in failover order."""
        return list(self.url) if isinstance(self.url, list) else [self.url]

    def entries(self) -> list["ProxyConfig"]:
        """One ProxyConfig per URL, in failover order (just this one for a single URL)."""
        if isinstance(self.url, str):
            return [self]
        shared = {name: getattr(self, name) for name in type(self).model_fields if name != "url"}
        return [ProxyConfig(url=url, **shared) for url in self.url]

    @property
    def scheme(self) -> str:
        """ "socks5", "http", or "direct" (direct://, the bypass mode: no proxy at all)."""
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
        if self.scheme == "direct":
            return "direct://"
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
    keepalive_interval: float = Field(default=75.0, gt=0, strict=True, allow_inf_nan=False)
    keepalive_probes: int = Field(default=9, ge=1, strict=True)
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
            token = expand_variables(token, os.environ, verbatim=False)
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
        host, port = parse_host_port(listen)
    except ValueError as exc:
        shape = "must be HOST:PORT, like 127.0.0.1:9090 or [::1]:9090"
        raise ValueError(f"{shape}{echo(listen)}") from exc
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
        raise ValueError(f"must be an address or a prefix, like 10.0.0.0/8{echo(value)}")
    try:
        return ip_network(value)  # a bare address is its /32 or /128
    except ValueError:
        pass
    try:
        ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"not an address or a prefix{echo(value)}") from None
    raise ValueError(f"has host bits set: write the network address{echo(value)}")


Network = Annotated[IPv4Network | IPv6Network, PlainValidator(_to_network)]


def _to_uid_range(value: object) -> tuple[int, int]:
    try:
        return to_uid_range(value)
    except ValueError as exc:
        raise ValueError(f"{exc}{echo(value)}") from None


UidRangeField = Annotated[tuple[int, int], PlainValidator(_to_uid_range)]


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
    # Per-user routing (uid_ranges.py): only these users' traffic goes into the TUN, or all
    # but theirs. One or the other.
    include_uids: list[UidRangeField] = Field(default_factory=list)
    exclude_uids: list[UidRangeField] = Field(default_factory=list)

    @field_validator("exclude", "include_uids", "exclude_uids", mode="before")
    @classmethod
    def _one_or_more(cls, value: object) -> object:
        return _as_list(value)

    @model_validator(mode="after")
    def _one_way_of_choosing_users(self) -> Self:
        if self.include_uids and self.exclude_uids:
            raise ValueError("include_uids and exclude_uids cannot be used together")
        if (self.include_uids or self.exclude_uids) and not self.auto:
            raise ValueError("include_uids and exclude_uids choose whom route.auto routes: set it")
        return self

    @model_validator(mode="after")
    def _strict_needs_auto(self) -> Self:
        if self.strict and not self.auto:
            raise ValueError("strict: true needs auto: true (it guards the routes auto makes)")
        return self

    @field_validator("table")
    @classmethod
    def _check_table(cls, table: int) -> int:
        if table in _RESERVED_TABLES:
            raise ValueError(f"must not be one of the kernel's tables 253, 254, 255{echo(table)}")
        return table

    @field_validator("bind_interface")
    @classmethod
    def _check_interface(cls, name: str | None) -> str | None:
        if name is not None and (
            not name or len(name.encode()) >= IFNAMSIZ or any(c in "/: \t" for c in name)
        ):
            raise ValueError(f"must be an interface name (1 to {IFNAMSIZ - 1} bytes){echo(name)}")
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
        raise ValueError(f"must be a port or a range like 8000-8100{echo(value)}")
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"must be ports 1..65535, the first not above the last{echo(value)}")
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
                    f"must be a name with optional wildcards, like *.example.com{echo(pattern)}"
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
        raise ValueError(f"must be {shape}{echo(name)}")
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
    dns: DnsConfig = Field(default_factory=DnsConfig, validate_default=True)

    @field_validator("route")
    @classmethod
    def _check_route(cls, route: RouteConfig, info: ValidationInfo) -> RouteConfig:
        configs = [info.data.get("proxy"), *info.data.get("proxies", {}).values()]
        direct = any(c is not None and c.scheme == "direct" for c in configs)
        if direct and route.auto and not (route.mark or route.bind_interface):
            raise ValueError(
                "direct:// with route.auto needs route.mark or route.bind_interface, or its "
                "sockets would loop back into the TUN"
            )
        return route

    @field_validator("dns")
    @classmethod
    def _check_dns(cls, dns: DnsConfig, info: ValidationInfo) -> DnsConfig:
        # A fake address stands for a name that only a proxy resolves; direct:// would have to
        # look it up here, and the lookup would be answered with the fake address again. The
        # system_dns address is in the TUN: asked directly, it would be the forwarder again.
        proxy, route = info.data.get("proxy"), info.data.get("route")
        if proxy is None or proxy.scheme != "direct" or not dns.enabled:
            return dns
        if dns.mode == "fake-ip":
            raise ValueError("mode fake-ip needs a proxy that resolves names, not direct://")
        if route is not None and route.system_dns and not dns.upstreams:  # no server there
            raise ValueError("direct:// with route.system_dns needs dns.upstreams")
        return dns

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
