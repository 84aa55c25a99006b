"""0x20 case randomisation on the DNS-over-SOCKS-UDP upstream leg: the pure helpers, and the
exchange driven through an in-memory association (the test plays the proxy's relay)."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address
from typing import cast

from dnslib import QTYPE, RR, A, DNSRecord

from tun2socks.outbound.socks5_udp import UdpAssociation
from tun2socks_dns.case_0x20 import question_name, randomize_case, same_question
from tun2socks_dns.message import question_key, upstream_request
from tun2socks_dns.socks_udp import OnClose, OnDatagram, SocksUdpExchange

SERVER = IPv4Address("192.0.2.53")
NAME = "www.example-1.test"
ALTERNATE = 0b0101_0101_0101_0101  # a fixed "random" spelling: every other letter flipped


def request(name: str = NAME) -> bytes:
    return upstream_request(question_key(DNSRecord.question(name).q), 0)


def answer_to(query: bytes, address: str) -> bytes:
    record = DNSRecord.parse(query).reply()
    record.add_answer(RR(record.q.qname, QTYPE.A, ttl=60, rdata=A(address)))
    return bytes(record.pack())


def test_0x20_every_letter_of_the_question_name_may_flip_and_nothing_else() -> None:
    wire = request()
    flipped = randomize_case(wire, lambda n: (1 << n) - 1)
    assert str(DNSRecord.parse(flipped).q.qname) == "WWW.EXAMPLE-1.TEST."
    assert flipped.lower() == wire.lower() and flipped[:12] == wire[:12]
    end = 12 + len(question_name(wire) or b"")
    assert flipped[end:] == wire[end:]  # type, class and the OPT record untouched
    assert randomize_case(wire, lambda n: 0) == wire
    assert same_question(flipped, flipped) and not same_question(flipped, wire)


def test_0x20_messages_without_a_plain_name_are_left_alone() -> None:
    assert randomize_case(bytes(11), lambda n: 1) == bytes(11)
    pointer = bytes(12) + b"\xc0\x0c\x00\x01\x00\x01"
    assert question_name(pointer) is None and randomize_case(pointer, lambda n: 1) == pointer
    assert not same_question(pointer, pointer)


class RelayInMemory:
    """What SocksUdpExchange uses of a UdpAssociation: datagrams sent are kept in a list."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False

    def send(self, host: str, port: int, payload: bytes) -> bool:
        self.sent.append(bytes(payload))
        return True

    def close(self) -> None:
        self.closed = True


def test_0x20_socks_udp_answer_with_the_right_id_but_another_spelling_is_ignored() -> None:
    async def main() -> None:
        relay = RelayInMemory()
        receivers: list[OnDatagram] = []

        async def associate(on_datagram: OnDatagram, on_close: OnClose) -> UdpAssociation:
            receivers.append(on_datagram)
            return cast(UdpAssociation, relay)

        exchange = SocksUdpExchange(SERVER, 53, associate, random_bits=lambda n: ALTERNATE)
        pending = asyncio.ensure_future(exchange(request()))
        while not relay.sent:
            await asyncio.sleep(0)
        (sent,) = relay.sent
        assert sent[12:] != request()[12:] and sent.lower()[12:] == request()[12:]
        receive = receivers[0]
        # A spoofer who guessed the ID but not the spelling is ignored, and so is the right
        # spelling from another source; the query keeps waiting for the real answer.
        receive(str(SERVER), 53, answer_to(sent[:12] + request()[12:], "203.0.113.66"))
        receive(str(SERVER), 53, answer_to(sent[:12] + sent[12:].upper(), "203.0.113.66"))
        receive("192.0.2.99", 53, answer_to(sent, "203.0.113.66"))
        await asyncio.sleep(0)
        assert not pending.done() and exchange.rejected == 3
        receive(str(SERVER), 53, answer_to(sent, "192.0.2.1"))
        reply = DNSRecord.parse(await asyncio.wait_for(pending, 1.0))
        assert [str(rr.rdata) for rr in reply.rr] == ["192.0.2.1"]
        await exchange.close()

    asyncio.run(main())
