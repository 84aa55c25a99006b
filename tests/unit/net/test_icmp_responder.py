"""ICMP answered by the stack: echo replies and the errors for refused traffic (sans-IO).

Requests are built by scapy and answers parsed by scapy, so both sides are checked against an
independent implementation; time is stepped for the rate limit.
"""

from __future__ import annotations

import ipaddress
import random

import pytest
from scapy.layers.inet import ICMP, IP, UDP, IPerror, UDPerror, defragment, fragment
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    ICMPv6PacketTooBig,
    ICMPv6ParamProblem,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    defragment6,
    fragment6,
)
from scapy.packet import Packet, Raw, raw

from tun2socks.net.events import DatagramReceived
from tun2socks.net.icmp import IcmpMessage
from tun2socks.net.icmp_responder import ERROR_BURST, IcmpResponder
from tun2socks.net.ip import IpPacket
from tun2socks.net.stack import Stack, StackConfig

CLIENT4, SERVER4 = "198.18.0.2", "192.0.2.80"
CLIENT6, SERVER6 = "fd00:7f::2", "2001:db8::80"


def make_stack(**config: object) -> Stack:
    return Stack(StackConfig(**config), random.Random(1))  # type: ignore[arg-type]


def answers(stack: Stack, request: Packet, now: float = 0.0) -> list[Packet]:
    stack.receive_packet(raw(request), now)
    return [(IP if p[0] >> 4 == 4 else IPv6)(p) for p in stack.packets_to_send(now)]


def echo_request(version: int, data: bytes = b"ping data", dst: str | None = None) -> Packet:
    if version == 4:
        return IP(src=CLIENT4, dst=dst or SERVER4) / ICMP(id=77, seq=3) / data
    return IPv6(src=CLIENT6, dst=dst or SERVER6) / ICMPv6EchoRequest(id=77, seq=3, data=data)


def checksum_ok(packet: Packet) -> bool:
    """The ICMP checksum verifies (our parser checks it; test_codec checks the parser
    against scapy)."""
    IcmpMessage.parse(IpPacket.parse(raw(packet)))
    return True


# ---------------------------------------------------------------- echo


def test_ipv4_echo_request_is_answered_from_the_pinged_address() -> None:
    [reply] = answers(make_stack(), echo_request(4))
    assert (reply[IP].src, reply[IP].dst) == (SERVER4, CLIENT4)
    assert (reply[ICMP].type, reply[ICMP].id, reply[ICMP].seq) == (0, 77, 3)
    assert bytes(reply[ICMP].payload) == b"ping data"
    assert checksum_ok(reply)


def test_icmpv6_echo_request_is_answered_from_the_pinged_address() -> None:
    [reply] = answers(make_stack(), echo_request(6))
    assert (reply[IPv6].src, reply[IPv6].dst) == (SERVER6, CLIENT6)
    echo = reply[ICMPv6EchoReply]
    assert (echo.id, echo.seq, echo.data) == (77, 3, b"ping data")
    assert checksum_ok(reply)


@pytest.mark.parametrize("version", [4, 6])
def test_echo_is_not_answered_when_configured_to_drop(version: int) -> None:
    stack = make_stack(icmp_echo=False)
    assert answers(stack, echo_request(version)) == []
    assert stack.drops == {"icmp_echo_disabled": 1}


@pytest.mark.parametrize(("version", "group"), [(4, "224.0.0.1"), (6, "ff02::1")])
def test_echo_to_a_multicast_group_is_not_answered(version: int, group: str) -> None:
    stack = make_stack()
    assert answers(stack, echo_request(version, dst=group)) == []
    assert stack.drops == {"icmp_echo_not_unicast": 1}


@pytest.mark.parametrize("version", [4, 6])
def test_large_echo_is_reassembled_and_its_reply_fragmented(version: int) -> None:
    data = bytes(range(256)) * 16
    stack = make_stack(mtu=1500)
    if version == 4:
        pieces = fragment(echo_request(4, data), 1480)
    else:
        request = IPv6(src=CLIENT6, dst=SERVER6) / IPv6ExtHdrFragment(id=5)
        pieces = fragment6(request / ICMPv6EchoRequest(id=77, seq=3, data=data), 1280)
    for piece in pieces:
        stack.receive_packet(raw(piece), 0.0)
    out = stack.packets_to_send(0.0)
    assert len(out) > 1 and all(len(p) <= 1500 for p in out)
    if version == 4:
        [reply] = defragment([IP(p) for p in out])
        assert bytes(reply[ICMP].payload) == data
    else:
        reply = defragment6([IPv6(p) for p in out])
        assert reply[ICMPv6EchoReply].data == data


def test_neighbour_discovery_is_counted_as_ipv6_control() -> None:
    stack = make_stack()
    assert answers(stack, IPv6(src=CLIENT6, dst=SERVER6) / ICMPv6ND_NS(tgt=SERVER6)) == []
    assert stack.drops == {"ipv6_control": 1}


def test_icmp_errors_from_the_client_are_not_answered() -> None:
    stack = make_stack()
    error = IP(src=CLIENT4, dst=SERVER4) / ICMP(type=3, code=3) / IPerror() / UDPerror()
    assert answers(stack, error) == []
    assert stack.drops == {"icmp_ignored": 1}


# ---------------------------------------------------------------- errors for refused traffic


def refused(version: int, payload: bytes = b"hello", dst: str | None = None) -> DatagramReceived:
    client, server = (CLIENT4, SERVER4) if version == 4 else (CLIENT6, SERVER6)
    return DatagramReceived(
        ipaddress.ip_address(client),
        40000,
        ipaddress.ip_address(dst or server),
        7000,
        payload,
    )


def sent(stack: Stack) -> list[Packet]:
    return [(IP if p[0] >> 4 == 4 else IPv6)(p) for p in stack.packets_to_send(0.0)]


def test_ipv4_port_unreachable_quotes_the_datagram() -> None:
    stack = make_stack()
    stack.refuse_datagram(refused(4), 0.0)
    [error] = sent(stack)
    assert (error[IP].src, error[IP].dst) == (SERVER4, CLIENT4)
    assert (error[ICMP].type, error[ICMP].code) == (3, 3)
    quoted = error[IPerror]
    assert (quoted.src, quoted.dst, quoted[UDPerror].sport, quoted[UDPerror].dport) == (
        CLIENT4,
        SERVER4,
        40000,
        7000,
    )
    assert checksum_ok(error)


def test_ipv6_port_unreachable_quotes_the_datagram() -> None:
    stack = make_stack()
    stack.refuse_datagram(refused(6), 0.0)
    [error] = sent(stack)
    assert (error[IPv6].src, error[IPv6].dst) == (SERVER6, CLIENT6)
    unreach = error[ICMPv6DestUnreach]
    assert unreach.code == 4
    assert unreach.payload.src == CLIENT6  # the quoted packet
    assert checksum_ok(error)


def test_ipv4_fragmentation_needed_names_the_mtu() -> None:
    stack = make_stack()
    stack.refuse_datagram(refused(4), 0.0, mtu=65000)
    [error] = sent(stack)
    assert (error[ICMP].type, error[ICMP].code, error[ICMP].nexthopmtu) == (3, 4, 65000)
    assert len(error) <= 576


def test_ipv6_packet_too_big_names_the_mtu() -> None:
    stack = make_stack()
    stack.refuse_datagram(refused(6, payload=bytes(5000)), 0.0, mtu=65000)
    [error] = sent(stack)
    assert error[ICMPv6PacketTooBig].mtu == 65000
    assert len(raw(error)) <= 1280  # RFC 4443 2.4 c
    assert checksum_ok(error)


@pytest.mark.parametrize(("version", "group"), [(4, "239.255.255.250"), (6, "ff02::fb")])
def test_no_error_about_multicast(version: int, group: str) -> None:
    stack = make_stack()
    stack.refuse_datagram(refused(version, dst=group), 0.0)
    assert sent(stack) == []


def test_errors_are_rate_limited() -> None:
    stack = make_stack()
    for _ in range(int(ERROR_BURST) + 20):
        stack.refuse_datagram(refused(4), 0.0)
    assert len(sent(stack)) == ERROR_BURST
    assert stack.icmp.errors_limited == 20
    stack.refuse_datagram(refused(4), 0.0005)  # half a token: still nothing
    assert sent(stack) == []
    stack.refuse_datagram(refused(4), 0.002)  # the bucket refills at 1000 per second
    assert len(sent(stack)) == 1


def test_unknown_ipv4_protocol_gets_protocol_unreachable() -> None:
    stack = make_stack()
    [error] = answers(stack, IP(src=CLIENT4, dst=SERVER4, proto=132) / Raw(b"sctp"))
    assert (error[ICMP].type, error[ICMP].code) == (3, 2)
    assert stack.drops == {"unsupported_protocol": 1}


@pytest.mark.parametrize(("extension", "pointer"), [(False, 6), (True, 40)])
def test_unknown_ipv6_next_header_gets_parameter_problem(extension: bool, pointer: int) -> None:
    """RFC 8200 4: code 1, the pointer names the Next Header field that held the value."""
    packet = IPv6(src=CLIENT6, dst=SERVER6)
    if extension:
        packet = packet / IPv6ExtHdrDestOpt(nh=132)
    else:
        packet.nh = 132
    stack = make_stack()
    [error] = answers(stack, packet / Raw(b"sctpsctp"))
    problem = error[ICMPv6ParamProblem]
    assert (problem.code, problem.ptr) == (1, pointer)
    assert checksum_ok(error)


def test_responder_alone_answers_echo_for_udp_and_icmp_callers() -> None:
    # The class is usable without a stack (the DNS forwarder or tests may use it).
    responder = IcmpResponder(echo_reply=True)
    original = raw(IP(src=CLIENT4, dst=SERVER4) / UDP(sport=1, dport=2) / b"x")
    error = responder.port_unreachable(original, 0.0)
    assert error is not None and IP(error)[ICMP].code == 3
