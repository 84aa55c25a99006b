"""Zero windows held for as long as the client answers (RFC 9293 3.8.6.1, MUST-26)."""

from __future__ import annotations

from tests.support.tcp_helpers import Client, check, established, make_stack, wrap
from tun2socks.net.events import FlowReset
from tun2socks.net.tcp import ACK, FIN, RST
from tun2socks.net.tcp_conn import TcpState

DATA = bytes(range(256)) * 400  # 100 KiB


def _answer_with_zero_window(c: Client, until: float) -> int:
    """Step the clock to `until`, answering everything the stack sends with window 0 (the
    client keeps what it has, takes nothing new); the number of answers."""
    answers = 0
    for _ in range(10_000):
        segments = c.next_timer_output(limit=until)
        if not segments:
            break
        assert not any(s.flags & RST for s in segments)
        c.send(window=0)
        assert c.output() == []
        answers += 1
    c.now = until
    return answers


def _receive_all(c: Client, limit: int = 1000) -> bytes:
    """The client opens its window and reads until the stack has nothing more."""
    received = bytearray()
    for _ in range(limit):
        c.send(window=65535)
        segments = c.output() or c.next_timer_output(limit=c.now + 10.0)
        if not segments:
            break
        received += c.absorb(segments)
    return bytes(received)


def test_zero_window_fin_waits_for_window_and_is_probed() -> None:
    # RFC 9293 3.8.6.1: the FIN occupies sequence space; it waits for window like data.
    c = established()
    c.send(window=0)
    c.stack.shutdown(c.flow_id)
    assert c.output() == []
    (probe,) = c.next_timer_output()
    check(probe, flags=ACK, seq=wrap(c.rcv_nxt - 1))
    c.send(window=100)
    check(c.output_one(), flags=FIN | ACK, seq=c.rcv_nxt)


def test_zero_window_for_ten_minutes_with_answered_probes_keeps_flow_and_every_byte() -> None:
    # RFC 9293 3.8.6.1 (MUST-26): a receiver that answers probes is kept indefinitely, even
    # when its window closed with data in flight; the bytes all arrive when it opens.
    c = established(mss=1000)
    c.stack.send(c.flow_id, DATA)
    in_flight = c.output()
    assert len(in_flight) > 2
    received = c.absorb(in_flight[:2])  # the rest is dropped: the client's buffer is full
    c.send(window=0)
    assert c.output() == []
    start = c.now
    answers = _answer_with_zero_window(c, start + 600.0)
    assert answers >= 50  # probed all along, at most persist_max (10 s) apart
    assert c.state is TcpState.ESTABLISHED
    assert c.events() == []
    received += _receive_all(c)
    assert received == DATA


def test_zero_window_rto_expiry_does_not_count_toward_the_retransmission_limit() -> None:
    # Nothing can be retransmitted into a closed window: only the persist timer probes.
    c = established(Client(make_stack(), mss=1000))
    c.stack.send(c.flow_id, DATA[:5000])
    c.output()
    c.send(window=0)  # acknowledges nothing, closes the window
    answers = _answer_with_zero_window(c, c.now + 300.0)
    assert answers > 8  # more than max_retransmissions expiries' worth
    assert c.state is TcpState.ESTABLISHED
    assert _receive_all(c) == DATA[:5000]


def test_zero_window_client_that_stops_answering_is_reset_by_keepalive() -> None:
    # Held indefinitely only while probes are answered: a client gone behind a closed window
    # is found by the keep-alive rule (RFC 9293 3.8.4) and reset.
    c = established(Client(make_stack(idle_timeout=60.0, keepalive_interval=5.0), mss=1000))
    c.stack.send(c.flow_id, DATA[:5000])
    c.output()
    c.send(window=0)
    segments = c.run_timers(c.now + 60.0 + 9 * 5.0)
    assert segments[-1].flags & RST
    assert c.events() == [FlowReset(c.flow_id, "keep-alive timeout")]
