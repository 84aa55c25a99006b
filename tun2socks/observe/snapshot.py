"""What the API, the metrics and the dashboard show: plain-data views of the running engine.

Everything is read from counters the data path keeps anyway (the device's, the stack's, the
relays', the engine's, and each component's `stats_sources` entry), at the moment it is asked
for: nothing here costs anything per packet.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tun2socks.outbound.socks5 import format_host_port

if TYPE_CHECKING:
    from tun2socks.config import Settings
    from tun2socks.engine import Engine
    from tun2socks.observe.pcap import Capture
    from tun2socks.relay import Relay

log = logging.getLogger(__name__)

REDACTED = "***"
# scheme://user:PASSWORD@host: the password part of any URL-shaped setting.
_URL_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*:)[^@]*(@)")


def stats(engine: Engine, *, uptime: float, capture: Capture | None = None) -> dict[str, Any]:
    """Totals since the start; `tun.*_in` is what clients sent into the TUN, `*_out` replies."""
    stack = engine.stack
    relays = engine.relays.values()
    result: dict[str, Any] = {
        "uptime_s": round(uptime, 3),
        "tun": dataclasses.asdict(engine.device.stats),
        "flows": {
            "open": stack.flow_count,
            "half_open": stack.half_open_count,
            "total": stack.flows_total,
        },
        "relayed": {
            "bytes_up": engine.finished_bytes_up + sum(r.bytes_up for r in relays),
            "bytes_down": engine.finished_bytes_down + sum(r.bytes_down for r in relays),
        },
        "drops": dict(stack.drops),
        "upstream_errors": dict(engine.upstream_errors),
        "components": component_stats(engine),
    }
    if capture is not None:
        result["pcap"] = capture.status()
    return result


def component_stats(engine: Engine) -> dict[str, dict[str, int]]:
    """Each `stats_sources` entry's counters; a failing source is left out (and logged)."""
    found: dict[str, dict[str, int]] = {}
    for name, source in list(engine.stats_sources.items()):
        try:
            found[name] = dict(source())
        except Exception:
            log.exception("stats source %s failed", name)
    return found


def connection(engine: Engine, relay: Relay, now: float) -> dict[str, Any]:
    flow = relay.flow
    conn = engine.stack.connection(relay.flow_id)
    route = relay.route_label
    return {
        "id": relay.flow_id,
        "protocol": "tcp",
        "source": format_host_port(flow.src, flow.src_port),
        "destination": format_host_port(flow.dst, flow.dst_port),
        "domain": engine.domain_lookup(flow.dst),
        "route": route,
        "proxy": engine.proxy_address if route.startswith("proxy") else None,
        "bytes_up": relay.bytes_up,
        "bytes_down": relay.bytes_down,
        "age_s": round(now - conn.created, 3) if conn is not None else None,
        # LISTEN: the SYN is held until the upstream connects (then SYN_RECEIVED).
        "state": conn.state.name if conn is not None else "CLOSED",
    }


def connections(
    engine: Engine, *, sort: str = "id", limit: int | None = None
) -> list[dict[str, Any]]:
    """The open TCP flows; sort "bytes" puts the busiest first, "age" the oldest."""
    now = engine.loop.time()
    relays = list(engine.relays.values())
    if sort == "bytes":
        relays.sort(key=lambda r: r.bytes_up + r.bytes_down, reverse=True)
    elif sort == "age":
        relays.sort(key=lambda r: r.flow_id)
    if limit is not None:
        relays = relays[:limit]
    return [connection(engine, relay, now) for relay in relays]


def redacted_settings(settings: Settings) -> dict[str, Any]:
    """The settings as JSON data with every secret replaced by ``***``."""
    data = settings.model_dump(mode="json")
    entries = [entry.redacted_url for entry in settings.proxy.entries()]
    data["proxy"]["url"] = entries[0] if isinstance(settings.proxy.url, str) else entries
    scrubbed = _scrub(data)
    assert isinstance(scrubbed, dict)
    return scrubbed


def _scrub(value: object) -> object:
    # SecretStr fields already dump as "**********"; URL passwords in other sections do not.
    if isinstance(value, Mapping):
        return {
            key: REDACTED if _secret_key(key) and item not in (None, "") else _scrub(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_scrub(item) for item in value]
    if isinstance(value, str):
        return _URL_PASSWORD.sub(rf"\g<1>{REDACTED}\g<2>", value)
    return value


def _secret_key(key: object) -> bool:
    name = str(key).lower()
    return any(word in name for word in ("password", "token", "secret"))
