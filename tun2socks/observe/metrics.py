"""Prometheus metrics, read from the engine's counters at scrape time.

A custom collector instead of Counter objects updated in the data path: the device, stack
and relays already count what matters, so a scrape costs one `snapshot.stats()` and the
packet path pays nothing. Components that register a `stats_sources` entry appear as
``tun2socks_<component>_<counter>`` (untyped: the engine does not know whether a component's
number is a counter or a gauge).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector

from tun2socks.observe import snapshot

if TYPE_CHECKING:
    from tun2socks.engine import Engine
    from tun2socks.observe.pcap import Capture

PREFIX = "tun2socks"
_NOT_NAME = re.compile(r"[^a-zA-Z0-9_]")


class EngineCollector(Collector):
    def __init__(
        self, engine: Engine, uptime: Callable[[], float], capture: Capture | None = None
    ) -> None:
        self.engine = engine
        self.uptime = uptime
        self.capture = capture

    def collect(self) -> Iterator[Metric]:
        stats = snapshot.stats(self.engine, uptime=self.uptime(), capture=self.capture)
        tun = stats["tun"]
        yield _by_label(
            CounterMetricFamily,
            "tun_packets",
            "IP packets through the TUN (in: from clients)",
            "direction",
            {"in": tun["packets_in"], "out": tun["packets_out"]},
        )
        yield _by_label(
            CounterMetricFamily,
            "tun_bytes",
            "bytes of IP packets through the TUN (in: from clients)",
            "direction",
            {"in": tun["bytes_in"], "out": tun["bytes_out"]},
        )
        yield _by_label(
            CounterMetricFamily,
            "tun_errors",
            "TUN read and write failures, and packets dropped from a full write queue",
            "kind",
            {
                "read": tun["read_errors"],
                "write": tun["write_errors"],
                "write_queue_full": tun["write_queue_drops"],
            },
        )
        relayed = stats["relayed"]
        yield _by_label(
            CounterMetricFamily,
            "relayed_bytes",
            "TCP payload bytes relayed (up: client to server)",
            "direction",
            {"up": relayed["bytes_up"], "down": relayed["bytes_down"]},
        )
        flows = stats["flows"]
        yield GaugeMetricFamily(f"{PREFIX}_flows_open", "TCP flows open", value=flows["open"])
        yield GaugeMetricFamily(
            f"{PREFIX}_flows_half_open",
            "TCP flows waiting for their upstream",
            value=flows["half_open"],
        )
        yield CounterMetricFamily(f"{PREFIX}_flows", "TCP flows opened", value=flows["total"])
        yield _by_label(
            CounterMetricFamily, "drops", "packets dropped by the stack", "reason", stats["drops"]
        )
        yield _by_label(
            CounterMetricFamily,
            "upstream_errors",
            "flows refused because the upstream failed, by SOCKS5 reply or cause",
            "kind",
            stats["upstream_errors"],
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_uptime_seconds", "seconds since start", value=stats["uptime_s"]
        )
        if "pcap" in stats:
            pcap = stats["pcap"]
            yield GaugeMetricFamily(
                f"{PREFIX}_pcap_running",
                "1 while a packet capture runs",
                value=int(pcap["running"]),
            )
            yield GaugeMetricFamily(
                f"{PREFIX}_pcap_bytes", "bytes in the current capture", value=pcap["bytes"]
            )
        for component, counters in stats["components"].items():
            for key, value in counters.items():
                if isinstance(value, int | float):
                    name = _NOT_NAME.sub("_", f"{PREFIX}_{component}_{key}")
                    yield UnknownMetricFamily(name, f"{component}: {key}", value=value)


def _by_label(
    family: Callable[..., Any], name: str, doc: str, label: str, values: dict[str, int]
) -> Metric:
    metric: Metric = family(f"{PREFIX}_{name}", doc, labels=[label])
    for key, value in sorted(values.items()):
        metric.add_metric([key], value)  # type: ignore[attr-defined]
    return metric


def registry(
    engine: Engine, uptime: Callable[[], float], capture: Capture | None = None
) -> CollectorRegistry:
    """A registry of our own (not the global one): the engine's metrics and the process's."""
    found = CollectorRegistry()
    found.register(EngineCollector(engine, uptime, capture))
    ProcessCollector(registry=found)  # CPU, memory, open fds: cheap, read from /proc
    return found


def exposition(found: CollectorRegistry) -> bytes:
    return generate_latest(found)
