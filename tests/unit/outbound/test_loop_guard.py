"""The loop guard of the host-route way (tun2socks.outbound.loop_guard): a flow to the proxy
itself that entered the TUN is refused, whether the proxy is given by address or by name
(matched by the name's addresses at the moment the flow comes: `localhost` here, which
/etc/hosts answers)."""

from __future__ import annotations

import asyncio
import socket
from ipaddress import ip_address

import pytest

from tun2socks.net.events import FlowRequested
from tun2socks.outbound.dialer import DialError, FirstDataOffer
from tun2socks.outbound.loop_guard import LoopGuard


class Passed:
    def __init__(self) -> None:
        self.flows: list[FlowRequested] = []
        self.offers: list[FirstDataOffer | None] = []

    async def dial(
        self, flow: FlowRequested, *, offer: FirstDataOffer | None = None
    ) -> socket.socket:
        self.flows.append(flow)
        self.offers.append(offer)
        return socket.socket()


def flow(dst: str, port: int) -> FlowRequested:
    return FlowRequested(1, ip_address("198.18.254.1"), 40000, ip_address(dst), port)


def dial(guard: LoopGuard, dst: str, port: int) -> None:
    async def main() -> None:
        (await guard.dial(flow(dst, port))).close()

    asyncio.run(main())


def test_a_flow_to_a_proxy_given_by_address_is_refused_others_pass() -> None:
    inner = Passed()
    guard = LoopGuard(inner, [("203.0.113.7", 1080)])
    with pytest.raises(DialError, match="entered the TUN"):
        dial(guard, "203.0.113.7", 1080)
    dial(guard, "203.0.113.7", 443)  # another port of that host: not the proxy
    dial(guard, "203.0.113.8", 1080)
    assert [(str(f.dst), f.dst_port) for f in inner.flows] == [
        ("203.0.113.7", 443),
        ("203.0.113.8", 1080),
    ]


def test_the_first_data_offer_is_passed_on_with_the_flow() -> None:
    # proxy.early_accept: the engine's offer must reach the SOCKS5 dialer behind the guard.
    inner = Passed()
    guard = LoopGuard(inner, [("203.0.113.7", 1080)])
    offer = FirstDataOffer()

    async def main() -> None:
        (await guard.dial(flow("203.0.113.8", 80), offer=offer)).close()
        (await guard.dial(flow("203.0.113.8", 81))).close()

    asyncio.run(main())
    assert inner.offers == [offer, None]


def test_a_flow_to_a_proxy_given_by_name_is_refused_by_the_names_addresses() -> None:
    inner = Passed()
    guard = LoopGuard(inner, [("localhost", 1080)])
    with pytest.raises(DialError, match="entered the TUN"):
        dial(guard, "127.0.0.1", 1080)
    dial(guard, "127.0.0.1", 8080)  # not the proxy's port: no lookup, passed on
    dial(guard, "192.0.2.1", 1080)  # the proxy's port, not its address
    assert len(inner.flows) == 2
