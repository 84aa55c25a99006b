"""The stack's flow API as the relay uses it: its contract, and the one error of misuse.

The relay asks the stack, never the connection behind it: how much the client sent that is
not taken yet (`buffered`), whether its stream ended (`at_eof`, after FIN, RFC 9293 3.10.7.4
"eighth, check the FIN bit"), and a closed flow answers as closed. Misuse (a flow id the
stack never issued, `send` after `shutdown`) raises `FlowStateError`.
"""

from __future__ import annotations

import random
from ipaddress import ip_address

import pytest

from tun2socks.net.events import FlowRequested
from tun2socks.net.ip import IpPacket
from tun2socks.net.stack import FlowStateError, Stack, StackConfig
from tun2socks.net.tcp import ACK, FIN, RST, SYN, TcpSegment

CLIENT = ip_address("198.18.0.2").packed
SERVER = ip_address("192.0.2.80").packed
CLIENT_PORT, SERVER_PORT = 49152, 80
ISS = 1000


class Flow:
    """One client connection driven to ESTABLISHED through the stack."""

    def __init__(self) -> None:
        self.stack = Stack(StackConfig(), random.Random(9293))
        self.now = 0.0
        self.seq = ISS
        self.ack = 0
        self.send(SYN)
        event = self.stack.next_event()
        assert isinstance(event, FlowRequested)
        self.flow_id = event.flow_id
        self.stack.accept(self.flow_id, self.now)
        [syn_ack] = self.output()
        self.ack = (syn_ack.seq + 1) & 0xFFFFFFFF
        self.send(ACK)

    def send(self, flags: int, payload: bytes = b"") -> None:
        ack = self.ack if flags & ACK else 0
        segment = TcpSegment(CLIENT_PORT, SERVER_PORT, self.seq, ack, flags, 65535, payload)
        self.stack.receive_packet(segment.build(4, CLIENT, SERVER), self.now)
        self.seq += len(payload) + (1 if flags & (SYN | FIN) else 0)

    def output(self) -> list[TcpSegment]:
        return [TcpSegment.parse(IpPacket.parse(p)) for p in self.stack.packets_to_send(self.now)]


def test_buffered_counts_what_the_client_sent_until_receive_takes_it() -> None:
    flow = Flow()
    assert flow.stack.buffered(flow.flow_id) == 0
    flow.send(ACK, b"hello")
    assert flow.stack.buffered(flow.flow_id) == 5
    assert flow.stack.receive(flow.flow_id) == b"hello"
    assert flow.stack.buffered(flow.flow_id) == 0


def test_at_eof_only_after_fin_and_every_byte_before_it_taken() -> None:
    # RFC 9293 3.10.7.4: the FIN is "received" after the data before it.
    flow = Flow()
    flow.send(ACK | FIN, b"last")
    assert not flow.stack.at_eof(flow.flow_id)  # "last" is still waiting
    assert flow.stack.receive(flow.flow_id) == b"last"
    assert flow.stack.at_eof(flow.flow_id)


def test_a_closed_flow_answers_as_closed_and_changes_nothing() -> None:
    flow = Flow()
    flow.send(RST | ACK)
    stack, flow_id = flow.stack, flow.flow_id
    assert stack.connection(flow_id) is None
    assert (stack.receive(flow_id), stack.at_eof(flow_id), stack.buffered(flow_id)) == (
        b"",
        False,
        0,
    )
    assert stack.send(flow_id, b"late") == 0
    stack.shutdown(flow_id)
    stack.abort(flow_id)
    stack.accept(flow_id, 1.0)
    stack.reject(flow_id)
    assert stack.packets_to_send(1.0) == []


@pytest.mark.parametrize("flow_id", [0, 2, -1, 10**9])
def test_a_flow_id_the_stack_never_issued_is_misuse(flow_id: int) -> None:
    stack = Flow().stack  # issued flow 1 only
    calls = [
        lambda: stack.send(flow_id, b"x"),
        lambda: stack.receive(flow_id),
        lambda: stack.at_eof(flow_id),
        lambda: stack.buffered(flow_id),
        lambda: stack.shutdown(flow_id),
        lambda: stack.abort(flow_id),
        lambda: stack.accept(flow_id, 0.0),
        lambda: stack.reject(flow_id),
    ]
    for call in calls:
        with pytest.raises(FlowStateError, match=f"no flow {flow_id}"):
            call()


def test_send_after_shutdown_is_misuse() -> None:
    flow = Flow()
    flow.stack.shutdown(flow.flow_id)
    flow.stack.shutdown(flow.flow_id)  # repeating it is fine
    with pytest.raises(FlowStateError, match="send after shutdown"):
        flow.stack.send(flow.flow_id, b"more")
