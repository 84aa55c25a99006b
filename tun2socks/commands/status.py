"""``tun2socks status``: the running instance's totals and busiest connections, as a table.

It asks the control API (GET /stats and GET /connections?sort=bytes) with the standard
library only. Where the API is and its token come from ``-c FILE`` (api.listen, api.token),
``--api HOST:PORT`` and the TUN2SOCKS_API_TOKEN environment variable; a token is never taken
from the command line, where other users could read it in the process list.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from tun2socks.errors import UserError

TOKEN_ENV = "TUN2SOCKS_API_TOKEN"
DEFAULT_API = "127.0.0.1:9090"
TIMEOUT = 5.0  # seconds for each request


class StatusError(UserError):
    """The API cannot be asked; str() is one line for the user."""


def add_parser(commands: Any) -> None:
    status = commands.add_parser(
        "status",
        help="show the running instance's stats and busiest connections",
        description="Ask the control API of a running tun2socks for its stats and its busiest "
        f"connections. The token, if the API wants one, comes from -c FILE or ${TOKEN_ENV}.",
    )
    status.add_argument("-c", "--config", metavar="FILE", help="read api.listen and api.token")
    status.add_argument(
        "--api", metavar="HOST:PORT", help=f"the API address (default {DEFAULT_API})"
    )
    status.add_argument(
        "-n", "--top", type=int, default=10, metavar="N", help="connections to list (default 10)"
    )


def run(args: argparse.Namespace) -> int:
    """Raises ConfigError for a bad -c FILE, StatusError when the API cannot be asked."""
    listen, token = DEFAULT_API, os.environ.get(TOKEN_ENV) or None
    if args.config is not None:
        from tun2socks.config import load_settings  # pydantic only when a file is given

        settings = load_settings(args.config)
        listen = settings.api.listen
        if token is None and settings.api.token is not None:
            token = settings.api.token.get_secret_value()
    if args.api:
        listen = args.api
    base = f"http://{_connectable(listen)}"
    stats = fetch(f"{base}/stats", token)
    found = fetch(f"{base}/connections?sort=bytes&limit={max(0, args.top)}", token)
    print(render(stats, found.get("connections", [])))
    return 0


def _connectable(listen: str) -> str:
    # A wildcard listen address is reached through loopback.
    for wildcard, local in (("0.0.0.0:", "127.0.0.1:"), ("[::]:", "[::1]:")):
        if listen.startswith(wildcard):
            return local + listen[len(wildcard) :]
    return listen


def fetch(url: str, token: str | None) -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            data = json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise StatusError(f"the API wants a token: set {TOKEN_ENV} or pass -c FILE") from None
        raise StatusError(f"{url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(
            f"cannot reach the API at {url}: {reason} (is tun2socks running?)"
        ) from None
    except ValueError:
        raise StatusError(f"{url}: the answer is not JSON") from None
    if not isinstance(data, dict):
        raise StatusError(f"{url}: unexpected answer")
    return data


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _counters(values: Mapping[str, Any]) -> str:
    shown = [f"{key} {value}" for key, value in sorted(values.items()) if value]
    return ", ".join(shown) if shown else "none"


def render(stats: Mapping[str, Any], connections: Sequence[Mapping[str, Any]]) -> str:
    """The report: totals, then one row per connection (busiest first, as given)."""
    tun, flows, relayed = stats["tun"], stats["flows"], stats["relayed"]
    lines = [
        f"up {human_duration(stats['uptime_s'])}; flows: {flows['open']} open, "
        f"{flows['half_open']} connecting, {flows['total']} since start",
        f"TUN:      in {human_bytes(tun['bytes_in'])} ({tun['packets_in']} packets), "
        f"out {human_bytes(tun['bytes_out'])} ({tun['packets_out']} packets)",
        f"relayed:  up {human_bytes(relayed['bytes_up'])}, "
        f"down {human_bytes(relayed['bytes_down'])}",
        f"drops:    {_counters(stats.get('drops', {}))}",
        f"upstream errors: {_counters(stats.get('upstream_errors', {}))}",
    ]
    for name, counters in sorted(stats.get("components", {}).items()):
        lines.append(f"{name + ':':<9} {_counters(counters)}")
    pcap = stats.get("pcap")
    if pcap and (pcap["running"] or pcap["packets"]):
        state = "running" if pcap["running"] else "stopped"
        lines.append(f"capture:  {state}, {pcap['packets']} packets to {pcap['target']}")
    lines.append("")
    if not connections:
        lines.append("no open connections")
        return "\n".join(lines)
    header = ("ID", "PROTO", "SOURCE", "DESTINATION", "ROUTE", "STATE", "UP", "DOWN", "AGE")
    rows = [header]
    for conn in connections:
        destination = conn["destination"]
        if conn.get("domain"):
            destination = f"{conn['domain']} ({destination})"
        age = conn.get("age_s")
        rows.append(
            (
                str(conn["id"]),
                conn["protocol"],
                conn["source"],
                destination,
                conn["route"],
                conn["state"],
                human_bytes(conn["bytes_up"]),
                human_bytes(conn["bytes_down"]),
                human_duration(age) if age is not None else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {0, 6, 7, 8}  # numbers line up on the right
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
