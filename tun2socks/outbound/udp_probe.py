"""Can the proxy carry UDP? One UDP ASSOCIATE (RFC 1928 section 7) made with the data path's own
client (``socks5_udp.associate``), and, given a target, one datagram's round trip through it.

``tun2socks check`` prints the verdict in one line, and the start-up summary says it too, so a
user learns before the first datagram what UDP will do: go through the proxy, or be refused as
``udp.when_unsupported`` says (``udp_relay.py``). The probe is the same code as the data path,
so the answer is the data path's: microsocks answers "command not supported", ``ssh -D`` closes
the connection (it knows CONNECT only), an HTTP proxy carries TCP only.

``UdpVerdict`` and ``describe`` are pure; ``probe_udp`` is the I/O.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass

from tun2socks.outbound.socks5 import (
    ProxyEndpoint,
    SocketHook,
    Socks5AuthFailed,
    Socks5Error,
    Socks5ProxyUnreachable,
    Socks5ReplyError,
    format_host_port,
)
from tun2socks.outbound.socks5_udp import UdpAssociation, associate


@dataclass(frozen=True)
class UdpVerdict:
    """``carried``: True (yes), False (no) or None (unknown); ``reason`` says why or how.

    ``lost``: the proxy accepted the association but the datagram got no answer, so the data
    path would send datagrams into it (not refuse them) and they would be lost."""

    carried: bool | None
    reason: str
    lost: bool = False


def refusal(when_unsupported: str) -> str:
    """What the UDP relay does with datagrams it cannot carry (udp.when_unsupported)."""
    if when_unsupported == "unreachable":
        return "answered with ICMP port unreachable"
    return "dropped silently"


def describe(verdict: UdpVerdict, when_unsupported: str) -> str:
    """One line: ``UDP: yes, ...``, ``UDP: no, <reason>; UDP datagrams will be ...`` or
    ``UDP: unknown, <reason>``."""
    if verdict.carried is None:
        return f"UDP: unknown, {verdict.reason}"
    if verdict.carried:
        return f"UDP: yes, {verdict.reason}"
    if verdict.lost:
        fate = "sent to the proxy's relay and get no answer"
    else:
        fate = f"{refusal(when_unsupported)} (udp.when_unsupported: {when_unsupported})"
    return f"UDP: no, {verdict.reason}; UDP datagrams will be {fate}"


async def probe_udp(
    proxy: ProxyEndpoint,
    *,
    timeout: float,
    prepare_socket: SocketHook | None,
    target: tuple[str, int] | None = None,
) -> UdpVerdict:
    """Ask ``proxy`` for a UDP association; with ``target``, send one datagram to it through
    the relay and wait ``timeout`` for the same bytes back (an echo server). Never raises
    for network errors."""
    if proxy.scheme == "http":
        return UdpVerdict(False, "an HTTP proxy's CONNECT carries TCP only")
    answers: asyncio.Queue[bytes] = asyncio.Queue()
    try:
        association = await associate(
            proxy,
            timeout=timeout,
            prepare_socket=prepare_socket,
            on_datagram=lambda _host, _port, data: answers.put_nowait(data),
        )
    except (Socks5ProxyUnreachable, Socks5AuthFailed) as exc:
        return UdpVerdict(None, f"the proxy could not be asked: {exc.reason}")
    except Socks5ReplyError as exc:
        return UdpVerdict(
            False, f"the proxy refuses UDP ASSOCIATE: {exc.reason} (reply {exc.reply_code})"
        )
    except Socks5Error as exc:
        return UdpVerdict(False, f"UDP ASSOCIATE failed: {exc.reason}")
    except OSError as exc:
        return UdpVerdict(None, f"the proxy could not be asked: {exc.strerror or exc}")
    try:
        if target is None:
            relay = format_host_port(*association.relay)
            return UdpVerdict(True, f"UDP ASSOCIATE accepted, relay {relay}")
        return await _round_trip(association, answers, target, timeout)
    finally:
        association.close()


async def _round_trip(
    association: UdpAssociation,
    answers: asyncio.Queue[bytes],
    target: tuple[str, int],
    timeout: float,
) -> UdpVerdict:
    relay = format_host_port(*association.relay)
    where = format_host_port(*target)
    payload = b"tun2socks check " + secrets.token_hex(8).encode()
    started = time.monotonic()
    try:
        association.send(target[0], target[1], payload)
        async with asyncio.timeout(timeout):
            while await answers.get() != payload:
                pass  # a stray datagram: keep waiting for ours
    except ValueError as exc:  # a bad target name
        return UdpVerdict(None, f"cannot send to {where}: {exc}")
    except TimeoutError:
        reason = f"relay {relay} accepted, but no answer from {where} within {timeout:g} s"
        return UdpVerdict(False, reason, lost=True)
    elapsed = (time.monotonic() - started) * 1000
    return UdpVerdict(True, f"relay {relay}, round trip to {where} in {elapsed:.1f} ms")
