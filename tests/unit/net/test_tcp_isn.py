"""Unpredictable initial sequence numbers (RFC 6528, RFC 9293 3.4.1) and fragment IDs
(RFC 7739), with the stack's default generator (no seed)."""

from __future__ import annotations

import ipaddress
import itertools
import random

from tests.support.tcp_helpers import Client, syn_received
from tun2socks.net.ip import IpPacket
from tun2socks.net.stack import Stack, StackConfig

MT_STATE = 624  # words of Mersenne Twister state
TICKS_PER_SECOND = 250_000  # RFC 9293 3.4.1: the ISN clock ticks every 4 microseconds


def _untemper(y: int) -> int:
    """Invert MT19937's output tempering: the word of state behind one 32-bit output."""
    y ^= y >> 18
    y ^= (y << 15) & 0xEFC60000
    x = y
    for _ in range(5):
        x = y ^ ((x << 7) & 0x9D2C5680)
    y = x & 0xFFFFFFFF
    for _ in range(2):
        x = y ^ (x >> 11)
    return x & 0xFFFFFFFF


def _server_isns(stack: Stack, count: int) -> list[int]:
    isns = []
    for i in range(count):
        c = syn_received(Client(stack, port=1024 + i))
        assert c.server_iss is not None
        isns.append(c.server_iss)
    return isns


def test_isn_not_predictable_from_624_observed_isns() -> None:
    # RFC 9293 3.4.1 / RFC 6528: an observer of many SYN-ACKs must not predict the next ISN.
    # Against a Mersenne Twister, 624 outputs give its whole state.
    stack = Stack(StackConfig(max_half_open=1000, max_flows=1000))
    observed = _server_isns(stack, MT_STATE + 1)
    clone = random.Random()
    clone.setstate((3, (*(_untemper(v) for v in observed[:MT_STATE]), MT_STATE), None))
    assert clone.getrandbits(32) != observed[MT_STATE]


def test_isn_on_one_four_tuple_grows_with_the_clock() -> None:
    # RFC 6528 3: ISN = M + F(4-tuple, secret); M ticks every 4 microseconds, so a new
    # incarnation of a 4-tuple starts above the old one.
    stack = Stack(StackConfig())
    first = syn_received(Client(stack, now=100.0))
    stack.abort(first.flow_id)
    first.output()  # the RST
    second = syn_received(Client(stack, now=101.0))
    assert first.server_iss is not None and second.server_iss is not None
    assert (second.server_iss - first.server_iss) & 0xFFFFFFFF == TICKS_PER_SECOND


def test_isn_differs_between_four_tuples_and_between_stacks() -> None:
    # F is keyed: another port or another stack (another secret) gives an unrelated ISN.
    a, b = Stack(StackConfig()), Stack(StackConfig())
    isn_a = syn_received(Client(a)).server_iss
    assert syn_received(Client(a, port=50000)).server_iss != isn_a
    assert syn_received(Client(b)).server_iss != isn_a


def test_fragment_identifications_are_not_a_counter() -> None:
    # RFC 7739 (RFC 6274 3.5.1.1): predictable IPv4 IDs allow blind fragment injection.
    stack = Stack(StackConfig(mtu=576))
    src, dst = ipaddress.ip_address("192.0.2.80"), ipaddress.ip_address("198.18.0.2")
    ids = []
    for _ in range(3):
        stack.send_datagram(src, 53, dst, 40000, bytes(2000))
        packets = stack.packets_to_send(0.0)
        assert len(packets) > 1
        ids.append(int.from_bytes(packets[0][4:6], "big"))
        assert IpPacket.parse(packets[0]).fragment
    assert [b - a for a, b in itertools.pairwise(ids)] != [1, 1]
