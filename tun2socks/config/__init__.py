"""Settings: a YAML file turned into typed, validated settings whose errors name key and line.

One concept per module: ``schema`` (the pydantic models), ``proxy_url`` (``${VAR}`` expansion
and the proxy URL parser), ``loader`` (the YAML file, ``--set`` overrides and flags, and the
one-line errors). Their public names are re-exported here: importers write
``from tun2socks.config import Settings, load_settings``.
"""

from tun2socks.config.loader import ConfigError, load_settings
from tun2socks.config.proxy_url import hide_url_password
from tun2socks.config.schema import (
    ApiConfig,
    DnsCacheConfig,
    DnsConfig,
    IcmpConfig,
    LimitsConfig,
    LogConfig,
    PcapConfig,
    ProxyConfig,
    RouteConfig,
    RuleConfig,
    Settings,
    TimeoutsConfig,
    TunConfig,
    UdpConfig,
    api_listen_address,
)

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
    "api_listen_address",
    "hide_url_password",
    "load_settings",
]
